"""PPM prefix reuse: siblings scored on a shared KV cache give the scores of scoring each alone."""

from __future__ import annotations

import pytest

from rstar.ppm import PPMScorer, _common_prefix_len

Q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
DEEP = ("<code>\n# Step 1: clips sold in April\napril = 48\n<end_of_step>",
        "\n# Step 2: clips sold in May\nmay = april / 2\n<end_of_step>",
        "\n# Step 3: the total\ntotal = april + may\nprint(total)\n<end_of_code>",
        "<output>72.0\n<end_of_output>")
SIBLINGS = ["<answer>The answer is \\boxed{72}.<end_of_answer>", "<answer>So \\boxed{72.0}<end_of_answer>",
            "<answer>Natalia sold \\boxed{70} clips.<end_of_answer>", "x", "<code>\nprint(1)\n<end_of_code>"]


@pytest.fixture(scope="module")
def scorers(tiny_model_dir):
    return (PPMScorer(tiny_model_dir, "t", head_seed=3, batch_size=2, prefix_reuse=True, min_shared_tokens=4),
            PPMScorer(tiny_model_dir, "t", head_seed=3, batch_size=2, prefix_reuse=False))


def test_sibling_scores_with_reuse_equal_scores_without(scorers):
    reuse, plain = scorers
    prefixes = [(Q, DEEP + (s,)) for s in SIBLINGS]
    # a mixed call: a sibling group, an unrelated prefix, and a lone prefix of another question
    prefixes += [(Q, DEEP[:1]), ("What is 2 + 2?", ("<code>\nprint(2 + 2)\n<end_of_code>",))]
    a, b = reuse.score(prefixes), plain.score(prefixes)
    assert len(a) == len(b) == len(prefixes)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert len(set(round(x, 6) for x in a)) > 2, "the scores are not all the same (the test could not fail)"
    # each alone, one call per prefix, is the reference too
    alone = [plain.score([p])[0] for p in prefixes[:3]]
    assert max(abs(x - y) for x, y in zip(a[:3], alone)) < 1e-4


def test_common_prefix_len():
    assert _common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert _common_prefix_len([[5], [6]]) == 0 and _common_prefix_len([[1, 2], [1, 2]]) == 2
