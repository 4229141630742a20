"""`rstar eval`: grading with the project grader, step-wise rollouts, majority vote, report and plot."""

from __future__ import annotations

import json

import pytest

from rstar_testing.fakes import InProcessExecutor, ScriptedPolicy
from trainer import evaluate

Q_OK, Q_BAD, Q_FAIL = "What is 2 + 3?", "What is 4 + 4?", "Divide 1 by 0."
S1 = "<code>\n# Step 1: add\nx = 2 + 3\n<end_of_step>"
S2 = "\n# Now print the final answer\nprint(x)\n<end_of_code>"
ANS5 = "\n<answer>From the result, the answer is \\boxed{5}.<end_of_answer>"
ANS7 = "\n<answer>From the result, the answer is \\boxed{7}.<end_of_answer>"
BAD = "<code>\n# Step 1: divide\nx = 1 / 0\n<end_of_step>"


class QuestionPolicy:
    """Routes each item to a scripted policy per question (ScriptedPolicy keys on steps only)."""

    def __init__(self, scripts):
        self.by_q = {q: ScriptedPolicy(s) for q, s in scripts.items()}

    def generate(self, items, params, scope=None):
        out = []
        for it in items:
            out.extend(self.by_q[it.question].generate([it], params))
        return out


def policy():
    return QuestionPolicy({
        Q_OK: {(): [(S1, 1.0)], (S1,): [(S2, 1.0)], (S1, S2): [(ANS5, 1.0)]},
        # greedy says 7 (wrong); sampling gives 8 (right) about half the time
        Q_BAD: {(): [("<code>\n# Step 1: y\ny = 4 + 4\nprint(y)\n<end_of_code>", 1.0)],
                ("<code>\n# Step 1: y\ny = 4 + 4\nprint(y)\n<end_of_code>",): [(ANS7, 0.5), (ANS5.replace("5", "8"), 0.45)]},
        Q_FAIL: {(): [(BAD, 1.0)]},
    })


@pytest.mark.parametrize("pred,gold,ok", [
    ("72", "72", True), ("72.0", "72", True), ("\\frac{1}{2}", "0.5", True), ("1/2", "\\frac12", True),
    ("8", "72", False), (None, "72", False), ("", "1", False), ("x^2+2x", "2x + x^2", True),
])
def test_grade_uses_the_project_grader(pred, gold, ok):
    from rstar import grading

    correct, how = evaluate.grade(pred, gold)
    assert correct is ok
    assert (correct, how) == (grading.grade(pred, gold).equal, grading.grade(pred, gold).method)
    if pred:
        assert how in (grading.EXACT, grading.NUMERIC, grading.SYMBOLIC)


def test_vote_groups_equivalent_answers():
    assert evaluate._vote(["7", "8", "8.0", None, "7"]) in ("8", "7")
    assert evaluate._vote(["7", "8", "8.0"]) == "8"
    assert evaluate._vote([None, None]) is None


def test_greedy_rollouts_follow_the_step_loop():
    rs = evaluate.run_rollouts(policy(), InProcessExecutor(), [Q_OK, Q_BAD, Q_FAIL])
    ok, bad, fail = rs
    assert ok.steps == [S1, S2, "\n<output>5<end_of_output>", ANS5] and ok.answer == "5" and ok.format_ok
    assert bad.answer == "7" and bad.format_ok
    assert fail.failure == "exec:error" and fail.answer is None and not fail.format_ok
    # the system-written output step is not counted as the policy's
    assert (ok.generated, ok.well_formed) == (3, 3) and (fail.generated, fail.well_formed) == (1, 1)


def test_step_format_rate_counts_a_step_with_no_stop_string_as_malformed():
    ramble = "Which is 5. Which is 5. Which is 5."
    pol = QuestionPolicy({Q_OK: {(): [(S1, 1.0)], (S1,): [(ramble, 1.0)]}})
    report = evaluate.evaluate([{"id": "a", "problem": Q_OK, "answer": "5"}], pol, InProcessExecutor(),
                               evaluate.EvalConfig(greedy=True))
    g = report["greedy"]
    assert g["per_problem"][0]["failure"] in ("incomplete", "length")
    assert (g["per_problem"][0]["generated_steps"], g["per_problem"][0]["well_formed_steps"]) == (2, 1)
    assert g["step_format_rate"] == pytest.approx(0.5) and g["format_rate"] == 0
    assert evaluate.summary(report)["step_format_rate"] == pytest.approx(0.5)


def test_evaluate_report_majority_curve_and_plot(tmp_path):
    problems = [{"id": "a", "problem": Q_OK, "answer": "5"}, {"id": "b", "problem": Q_BAD, "answer": "8"},
                {"id": "c", "problem": Q_FAIL, "answer": "0"}]
    cfg = evaluate.EvalConfig(greedy=True, samples=5, temperature=1.0)
    report = evaluate.evaluate(problems, policy(), InProcessExecutor(), cfg, meta={"dataset": "t"})
    g = report["greedy"]
    assert g["accuracy"] == pytest.approx(1 / 3) and g["format_rate"] == pytest.approx(2 / 3)
    assert g["failures"] == {"none": 2, "exec:error": 1}
    assert [r["correct"] for r in g["per_problem"]] == [True, False, False]
    curve = report["majority"]["curve"]
    assert sorted(curve) == [1, 2, 3, 4, 5] and all(0 <= v <= 1 for v in curve.values())
    assert curve[1] >= 1 / 3   # problem a is always right
    assert evaluate.summary(report)["greedy_accuracy"] == pytest.approx(1 / 3)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    evaluate.write_report(report, out, png)
    assert json.loads(out.read_text())["problems"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mcts_needs_a_search_address():
    with pytest.raises(ValueError, match="search service"):
        evaluate.evaluate([{"problem": Q_OK, "answer": "5"}], None, InProcessExecutor(),
                          evaluate.EvalConfig(greedy=False, mcts=(1,)))


@pytest.mark.timeout(180)
def test_rstar_eval_cli_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    from trainer.cli import main

    ds = tmp_path / "dev.jsonl"
    ds.write_text("".join(json.dumps({"id": str(i), "problem": q, "answer": a}) + "\n"
                          for i, (q, a) in enumerate([(Q_OK, "5"), (Q_BAD, "8")])))
    out = tmp_path / "report.json"
    rc = main(["eval", "--dataset", str(ds), "--model", str(tiny_model_dir), "--max-tokens", "12",
               "--max-depth", "2", "--samples", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 2 and 0 <= report["greedy"]["accuracy"] <= 1
    assert report["majority"]["samples"] == 2
    assert out.with_suffix(".png").is_file()
    assert "greedy_accuracy" in capsys.readouterr().out


class AnswerScorer:
    """A PPM that likes trajectories ending in a given answer (and reports its version)."""

    def __init__(self, liked: str):
        self.liked, self.calls = liked, 0

    def score(self, prefixes, scope=None):
        from rstar.protocols import Versioned

        self.calls += 1
        return Versioned([0.9 if f"boxed{{{self.liked}}}" in "".join(s) else -0.5 for _, s in prefixes], "ppm-test")


def test_ppm_best_of_n_picks_the_top_scored_final_step_on_the_majority_samples():
    problems = [{"id": "b", "problem": Q_BAD, "answer": "8"}]
    cfg = evaluate.EvalConfig(greedy=False, samples=8, temperature=1.0)
    report = evaluate.evaluate(problems, policy(), InProcessExecutor(), cfg, scorer=AnswerScorer("8"))
    answers = report["majority"]["answers"][0]
    assert "8" in answers, "the fixed seeds give at least one right sample"
    best = report["best_of"]
    assert best["accuracy"] == 1.0 and best["ppm_version"] == "ppm-test"
    # best-of-k is right exactly when a right answer is among the first k samples
    assert best["curve"] == {k: float("8" in answers[:k]) for k in range(1, 9)}
    assert evaluate.summary(report)["ppm_best_of@8"] == 1.0
    # tokens per problem grow with k and the last point is the method's cost
    tc = report["majority"]["tokens_curve"]
    assert all(tc[k] < tc[k + 1] for k in range(1, 8)) and report["majority"]["tokens_per_problem"] == tc[8]
    wrong = evaluate.evaluate(problems, policy(), InProcessExecutor(), cfg, scorer=AnswerScorer("7"))
    assert wrong["best_of"]["accuracy"] == float("7" == "8")   # a PPM that likes the wrong answer picks it
