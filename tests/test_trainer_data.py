"""SFT selection and PPM pair construction on hand-built trees with known Q values."""

from __future__ import annotations

import pytest

from rstar import steps as stepfmt
from trainer import data

T1 = "<code>\n# Step 1: compute the sum of the two numbers\nx = 2 + 3\nprint(x)\n<end_of_code>"
T2 = "<code>\n# Step 1: add them up directly now\nz = 3 - 2\n<end_of_step>"          # 1 edit from T13
T3 = "\n<answer>From the result, the answer is \\boxed{5}.<end_of_answer>"
T4 = "\n<answer>From the result, the answer is \\boxed{7}.<end_of_answer>"          # 1 edit from T3
T5 = "\n<answer>From the result, the answer is \\boxed{1}.<end_of_answer>"
T6 = "<code>\n# Step 1: this one crashes badly\nq = 1 / 0\n<end_of_step>"
T7 = "<code>\n# Step 1: use a loop over a range of values\ns = sum([2, 3])\n<end_of_step>"
T8 = "\n<answer>Summing gives \\boxed{5} as the final result.<end_of_answer>"
T9 = "<code>\n# Step 1: never explored\n<end_of_step>"
T13 = "<code>\n# Step 1: add them up directly now\nz = 3 + 2\n<end_of_step>"
T14 = "\n<answer>So the total is \\boxed{5}, which we printed above.<end_of_answer>"


def node(i, parent, text="", q=0.0, visits=1, answer=None, correct=None, failure="", ends_code=False,
         output="", terminal=None, children=()):
    return {"id": i, "parent": parent, "depth": 0, "text": text, "code": "", "output": output,
            "ends_code": ends_code, "failure": failure, "finish_reason": "stop", "num_tokens": 0,
            "visits": visits, "value_sum": q * visits, "q": q, "ppm_score": None,
            "terminal": bool(answer is not None or failure) if terminal is None else terminal,
            "answer": answer, "correct": correct, "children": list(children)}


def hand_tree():
    nodes = [
        node(0, None, visits=12, children=[1, 2, 6, 7, 9, 13]),
        node(1, 0, T1, q=0.8, visits=5, ends_code=True, output="5", children=[3, 4]),
        node(2, 0, T2, q=-0.6, visits=3, children=[5]),
        node(3, 1, T3, q=1.0, answer="5", correct=True),
        node(4, 1, T4, q=-1.0, answer="7", correct=False),
        node(5, 2, T5, q=-1.0, answer="1", correct=False),
        node(6, 0, T6, q=-1.0, failure="error"),
        node(7, 0, T7, q=0.5, visits=2, children=[8]),
        node(8, 7, T8, q=1.0, answer="5", correct=True),
        node(9, 0, T9, q=0.0, visits=0),
        node(10, 13, "unused", q=0.0, visits=0),   # a leaf of 13 never expanded
        node(11, 7, "<code>\nx=1\n<end_of_step>", q=0.0, visits=0),
        node(12, 13, "dup", q=0.0, visits=0),
        node(13, 0, T13, q=0.6, visits=2, children=[14, 10, 12]),
        node(14, 13, T14, q=0.9, answer="5", correct=True),
    ]
    nodes[7]["children"] = [8, 11]
    return {"schema": "rstar.tree/1", "problem_id": "p1", "question": "What is 2 + 3?", "gold": "5", "nodes": nodes}


def test_prefix_steps_add_the_output_after_a_code_block():
    tree = hand_tree()
    assert data.prefix_steps(tree, 3) == [T1, stepfmt.output_step("5"), T3]
    assert data.prefix_steps(tree, 2) == [T2]


def test_sft_top2_by_mean_q_ties_broken_by_min_q():
    tree = hand_tree()
    # correct paths: [1,3] mean .9; [7,8] mean .75 min .5; [13,14] mean .75 min .6 -> [1,3] and [13,14]
    chosen = data.select_sft(tree, top_k=2)
    assert [ex.steps for ex in chosen] == [(T1, stepfmt.output_step("5"), T3), (T13, T14)]
    assert chosen[0].mean_q == pytest.approx(0.9) and chosen[1].min_q == pytest.approx(0.6)
    assert len(data.select_sft(tree, top_k=5)) == 3


def test_sft_skips_paths_with_a_failed_step_and_dedups_across_trees():
    tree = hand_tree()
    tree["nodes"][13]["failure"] = "error"   # [13,14] now has a failed step
    assert [ex.steps[-1] for ex in data.select_sft(tree)] == [T3, T8]
    examples, stats = data.build_sft([("a", hand_tree()), ("b", hand_tree())], top_k=2)
    assert stats.problems == 2 and stats.solved == 2 and stats.kept == 2 and stats.duplicates == 2
    assert "2 trajectories kept" in stats.line()


def test_step_pairs_top2_vs_bottom2_with_filters_and_weights():
    stats = data.PairStats()
    pairs = data.build_pairs(hand_tree(), data.PairConfig(final_pairs=False), stats)
    got = {(p.pos[0], p.neg[0]) for p in pairs}
    # positives at the root: 1 (.8), 13 (.6) [7 (.5) is third]; negatives: 6 (-1), 2 (-.6);
    # (13, 2) differ by one character -> dropped by the edit-distance filter
    assert got == {(T1, T6), (T1, T2), (T13, T6)}
    assert all(p.kind == "step" and p.group == "p1/0" for p in pairs)
    assert all(p.weight == pytest.approx(1 / 3) for p in pairs)
    assert stats.filtered_edit == 1 and stats.filtered_margin == 0
    pair = next(p for p in pairs if p.neg[0] == T6 and p.pos[0] == T1)
    assert pair.q_pos == pytest.approx(0.8) and pair.q_neg == pytest.approx(-1.0)
    assert pair.pos == (T1, stepfmt.output_step("5"))   # the PPM sees the output of a closed code block


def test_q_margin_filter():
    pairs = data.build_pairs(hand_tree(), data.PairConfig(final_pairs=False, min_q_margin=1.5))
    # margins: (1,6) 1.8, (1,2) 1.4, (13,6) 1.6
    assert {(p.pos[0], p.neg[0]) for p in pairs} == {(T1, T6), (T13, T6)}
    assert all(p.weight == pytest.approx(0.5) for p in pairs)


def test_final_answer_pairs_use_whole_trajectories():
    pairs = [p for p in data.build_pairs(hand_tree()) if p.kind == "final"]
    a = (T1, stepfmt.output_step("5"), T3)
    c = (T13, T14)
    w1 = (T2, T5)                                  # mean -0.8
    w2 = (T1, stepfmt.output_step("5"), T4)        # mean -0.1; one character from `a`
    assert {(p.pos, p.neg) for p in pairs} == {(a, w1), (c, w1), (c, w2)}
    assert all(p.group == "p1/final" and p.weight == pytest.approx(1 / 3) for p in pairs)


def test_pairs_roundtrip_and_dedup():
    pairs, stats = data.build_all_pairs([hand_tree(), hand_tree()])
    assert len(pairs) == 6 and stats.trees == 2
    assert data.Pair.from_dict(pairs[0].to_dict()) == pairs[0]
    blob = data.encode_jsonl_gz(p.to_dict() for p in pairs)
    assert [data.Pair.from_dict(d) for d in data.decode_jsonl_gz(blob)] == pairs


@pytest.mark.parametrize("a,b,k,expected", [
    ("kitten", "sitting", 3, True), ("kitten", "sitting", 4, False), ("", "x" * 20, 20, True),
    ("same", "same", 1, False), ("a" * 30, "b" * 30, 20, True), ("abc" * 10, "abd" * 10, 11, False),
])
def test_edit_distance(a, b, k, expected):
    assert data.edit_distance_at_least(a, b, k) is expected


def test_sft_text_is_the_policy_prompt_plus_steps_with_loss_only_on_generated_steps():
    steps = (T1, stepfmt.output_step("5"), T3)
    text, spans = data.sft_text("What is 2 + 3?", steps)
    prompt = stepfmt.render_prompt("What is 2 + 3?", [], few_shot=False)
    assert text == stepfmt.render_prompt("What is 2 + 3?", list(steps), few_shot=False)
    assert text.startswith(prompt) and prompt.endswith("<code>\n")
    trained = [text[a:b] for a, b in spans]
    assert trained == [T1[len("<code>\n"):], T3]
    assert "<output>" not in "".join(trained)
    with pytest.raises(ValueError):
        data.sft_text("q", ("# no code block\n<end_of_step>",))


def test_load_problems_excludes_ids_and_checks_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "problem": "1+1?", "answer": 2}\n\n{"id": "b", "problem": "2+2?", "answer": "4"}\n')
    rows = data.load_problems(f, exclude_ids=["a"])
    assert [(r["id"], r["answer"]) for r in rows] == [("b", "4")]
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "question": "x"}\n')
    with pytest.raises(ValueError, match="lacks"):
        data.load_problems(tmp_path / "bad.jsonl")


def test_load_problems_offset_gives_disjoint_slices_after_exclusion(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'{{"id": "p{i}", "problem": "q{i}", "answer": {i}}}\n' for i in range(7)))
    first = [r["id"] for r in data.load_problems(f, limit=3, exclude_ids=["p1"])]
    second = [r["id"] for r in data.load_problems(f, limit=3, exclude_ids=["p1"], offset=3)]
    assert first == ["p0", "p2", "p3"] and second == ["p4", "p5", "p6"]
    assert data.load_problems(f, offset=10) == []
