"""Shared fixtures: an isolated RSTAR_HOME, the converted default model, a tiny random model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Model caches survive between runs (conversion takes ~45 s); everything else is per-test tmp.
TEST_HOME = Path(os.environ.get("RSTAR_TEST_HOME", ROOT / ".rstar-test"))
# Nothing a test runs may touch the user's own $RSTAR_HOME (their store, models, last solve):
# every test sees the test home unless it sets its own (and its cache is the model fixtures' cache).
os.environ["RSTAR_HOME"] = str(TEST_HOME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def test_home() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return TEST_HOME


@pytest.fixture(scope="session")
def default_model_dir(test_home) -> Path:
    """The embedded fast model (SmolLM2-135M-Instruct), converted once into the test cache.

    The tests use it (and tiny models with its tokenizer) because it is the real model
    that loads quickly; the laptop default (Qwen2.5-Coder-0.5B) is not needed to test the path.
    """
    from rstar.models import FAST, ensure_model

    return ensure_model(FAST.name, test_home / "cache" / "base" / FAST.name)


@pytest.fixture(scope="session")
def tiny_model_dir(test_home, default_model_dir) -> Path:
    """A randomly initialised 2-layer Llama with the default tokenizer: vLLM loads it in seconds."""
    from rstar_testing.tinymodel import make_tiny_model

    return make_tiny_model(test_home / "cache" / "tiny-llama-h128", default_model_dir)


@pytest.fixture(scope="session")
def tiny_format_model_dir(test_home, default_model_dir) -> Path:
    """The tiny Llama fitted for a few seconds to solutions in the step format (so it ends steps
    with the markers and writes runnable code), for the cross-service tests. Serve it with
    few-shot examples off (it was fitted without them)."""
    from rstar import steps
    from rstar_testing.tinymodel import make_tiny_model

    texts = [steps.render_prompt(q, [], few_shot=False) + "".join(s)[len(steps.CODE_START) + 1:]
             for q, s in TINY_SOLUTIONS]
    return make_tiny_model(test_home / "cache" / "tiny-llama-fmt3", default_model_dir, train_on=texts)


# (question, steps) the tiny test model is fitted to; the integration tests ask these questions.
TINY_SOLUTIONS = [
    ("Tom has 3 boxes with 12 apples each. How many apples does he have?", [
        "<code>\n# Step 1: Multiply boxes by apples per box.\ntotal = 3 * 12\n<end_of_step>",
        "\n# Now print the final answer\nprint(total)\n<end_of_code>",
        "\n<output>36<end_of_output>",
        "\n<answer>From the result, the answer is \\boxed{36}.<end_of_answer>",
    ]),
    ("What is 12 times 3?", [
        "<code>\n# Step 1: Multiply.\nx = 12 * 3\n<end_of_step>",
        "\n# Now print the final answer\nprint(x)\n<end_of_code>",
        "\n<output>36<end_of_output>",
        "\n<answer>From the result, the answer is \\boxed{36}.<end_of_answer>",
    ]),
]
