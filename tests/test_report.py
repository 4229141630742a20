"""`rstar report`: rounds and eval reports -> one self-contained HTML page of PNG plots.

The round fixture (tests/fixtures/report/) was made by really running two rounds and their
evaluations on the tiny model (`python -m rstar_testing.round_fixture`, see its README).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rstar import rounds
from rstar.store import open_store
from rstar.trees import NodeRecord, TreeRecord
from trainer import report
from trainer.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "report"
EVALS = [FIXTURE / "evals" / f"{label}.json.gz" for label in ("base", "r1", "r2")]
PNG = b"\x89PNG\r\n\x1a\n"
MEASURED = sorted((REPO / "docs" / "measurements").glob("round1-eval-*.json.gz"))


def figures(page: str) -> dict[str, str]:
    """section id -> the figure's HTML."""
    return dict(re.findall(r"<figure id='([^']+)'>(.*?)</figure>", page, flags=re.S))


def embedded_png(fig_html: str) -> bytes | None:
    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", fig_html)
    return base64.b64decode(m.group(1)) if m else None


@pytest.fixture
def rstar_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RSTAR_STORE_URL", raising=False)
    return tmp_path / "home"


@pytest.mark.timeout(120)
def test_rstar_report_on_the_round_fixture_has_every_plot(tmp_path, rstar_home):
    """The issue's test: `rstar report` (forwarded to the trainer) writes one page with every plot."""
    out, pngs = tmp_path / "report.html", tmp_path / "png"
    proc = subprocess.run([sys.executable, "-m", "rstar_cli", "report", "--store", str(FIXTURE / "store"),
                           *[a for f in EVALS for a in ("--eval", str(f))], "--out", str(out), "--png-dir", str(pngs)],
                          cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out}" in proc.stdout
    page = out.read_text()
    figs = figures(page)
    assert list(figs) == [*report.ROUND_SECTIONS, *report.EVAL_SECTIONS]
    for sid, fig in figs.items():
        png = embedded_png(fig)
        assert png is not None and png.startswith(PNG), f"{sid} has no plot"
        assert "class='absent'" not in fig, sid
        assert (pngs / f"{sid}.png").read_bytes() == png        # --png-dir writes the same plots
    # self-contained: nothing is fetched when the page opens
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)


def _inputs() -> report.ReportInputs:
    return report.collect(open_store(str(FIXTURE / "store")), None, [report.parse_eval_arg(str(f)) for f in EVALS])


def test_the_page_shows_what_the_round_fixture_holds(rstar_home):
    """The numbers behind the plots are the stored ones, read independently here."""
    from trainer.data import iter_round_trees

    store = open_store(str(FIXTURE / "store"))
    inp = _inputs()
    assert [r.number for r in inp.rounds] == rounds.known_rounds(store) == [1, 2]
    assert report.positions(inp) == ["base", "r1", "r2"]
    for n in (1, 2):
        stage_eval = json.loads(store.get(rounds.summary_key(n, "eval")))
        got = report.eval_summary_at(inp, f"r{n}")
        assert got["greedy"] == stage_eval["candidate"]["greedy_accuracy"]   # the gate's number
        ev = report.read_eval_report(FIXTURE / "evals" / f"r{n}.json.gz")
        n_max = max(ev["mcts"], key=int)
        assert got[f"majority@{ev['majority']['samples']}"] == ev["majority"]["accuracy"]
        assert got[f"MCTS+PPM@{n_max}"] == ev["mcts"][n_max]["accuracy"]
        # solved per method = the stored shard manifests
        by_method = report.synthesis_by_method(inp.rounds[n - 1])
        manifests = [json.loads(store.get(k)) for k in store.list(f"trajectories/round-{n}/")
                     if k.endswith(".manifest.json")]
        assert sum(c["solved"] for c in by_method.values()) == sum(m["solved"] for m in manifests)
        # stage times = the tasks' recorded times
        st = rounds.load_state(store, n)
        assert report.stage_seconds(inp.rounds[n - 1])["eval"] == pytest.approx(
            st.tasks["eval"].finished_at - st.tasks["eval"].started_at)
    assert set(report.synthesis_by_method(inp.rounds[0])) == {"reference", "policy"}
    # round 2 searched with round 1's PPM: its trees' scores give pairs and calibration bins
    r2 = inp.rounds[1]
    assert r2.ppm.ppm_version == "r1" and r2.ppm.scored_nodes > 0
    scored = [n for _, t in iter_round_trees(store, 2) for n in t.nodes if n.ppm_score is not None]
    assert r2.ppm.scored_nodes == len(scored)
    assert [b[1] for b in r2.ppm.bins] == [sum(report._bin(n.ppm_score) == i for n in scored)
                                           for i in range(report.CALIBRATION_BINS)]
    assert inp.rounds[0].ppm.scored_nodes == 0                           # round 1 was terminal-guided
    assert report.train_pair_accuracy(inp.rounds[0]) is not None         # ppm_mode=head records it
    page = report.render_html(inp, report.sections(inp))
    assert "round 1" in page and "reference" in page and "policy@r2" in page


def _tree() -> TreeRecord:
    """root -> a (leads to the correct answer c) | b (leads to the wrong answer d); all scored."""
    steps = {1: "<code>\n# Step 1: multiply the boxes by the apples in each box\nx = 3 * 12\n<end_of_step>",
             2: "<code>\n# Step 1: add them up\ny = 3 + 12 + 100\n<end_of_step>",
             3: "\n<answer>The answer is \\boxed{36}.<end_of_answer>",
             4: "\n<answer>So the total is \\boxed{115}, I think.<end_of_answer>"}
    nodes = [NodeRecord(0, None, children=[1, 2], visits=4),
             NodeRecord(1, 0, 1, steps[1], children=[3], visits=2, q=0.9, ppm_score=0.6),
             NodeRecord(2, 0, 1, steps[2], children=[4], visits=2, q=-0.9, ppm_score=-0.2),
             NodeRecord(3, 1, 2, steps[3], visits=1, q=1.0, ppm_score=0.1, terminal=True, answer="36", correct=True),
             NodeRecord(4, 2, 2, steps[4], visits=1, q=-1.0, ppm_score=0.5, terminal=True, answer="115",
                        correct=False)]
    return TreeRecord("Tom has 3 boxes with 12 apples each. How many apples?", nodes, "t0", "36",
                      model_versions={"policy": "r1", "ppm": "r1"})


def test_ppm_pair_accuracy_and_calibration_from_stored_scores():
    from trainer.data import build_pairs

    tree = _tree()
    assert [p.kind for p in build_pairs(tree)] == ["step", "final"]     # the pairs training would use
    s = report.ppm_tree_stats([tree, TreeRecord("unscored", [NodeRecord(0, None)])])
    # step pair a (0.6) > b (-0.2): right; final pair c (0.1) < d (0.5): wrong
    assert (s.pairs, s.pairs_right, s.ppm_version) == (2, 1, "r1")
    assert s.scored_nodes == 4
    filled = {i: (b[1], b[2]) for i, b in enumerate(s.bins) if b[1]}
    # bins of width 0.2 over [-1, 1]: -0.2 -> 4, 0.1 -> 5, 0.5 -> 7, 0.6 -> 8; correct below a and c
    assert filled == {4: (1, 0), 5: (1, 1), 7: (1, 0), 8: (1, 1)}
    assert report._bin(1.0) == report.CALIBRATION_BINS - 1 and report._bin(-1.0) == 0


def test_absent_quantities_are_named_not_fatal(tmp_path, rstar_home, capsys):
    """A round state written before task times were recorded, no trees, no eval: the page says so."""
    store = tmp_path / "store"
    (store / "rounds" / "round-1").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "fixtures" / "rounds" / "evolve-succeeded.json", store / "rounds/round-1/state.json")
    out = tmp_path / "r.html"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    figs = figures(out.read_text())
    assert list(figs) == list(report.ROUND_SECTIONS)
    assert embedded_png(figs["synthesis-solved"]) is not None            # the state's synthesis summary
    for sid in ("accuracy-by-round", "accuracy-vs-trajectories", "ppm-pair-accuracy", "ppm-calibration", "stage-time"):
        assert embedded_png(figs[sid]) is None and "not in the input" in figs[sid], sid
    assert "stage-time: not in the input" in capsys.readouterr().err


def test_eval_reports_alone_make_a_comparison_page(tmp_path, rstar_home):
    """Several `rstar eval` reports (.json.gz as committed, and plain .json) -> one comparison page."""
    plain = tmp_path / "r1-3ep.json"
    plain.write_bytes(gzip.decompress(MEASURED[1].read_bytes()))
    out = tmp_path / "cmp.html"
    args = ["report", "--out", str(out), "--eval", f"base={MEASURED[0]}", "--eval", str(plain)]
    assert main(args) == 0
    page = out.read_text()
    figs = figures(page)
    assert list(figs) == list(report.EVAL_SECTIONS)                      # no store read: no round sections
    assert all(embedded_png(f) for f in figs.values())
    assert "<td>base</td>" in page and "<td>r1-3ep</td>" in page
    # the measured reports hold greedy only, which records its tokens: one point per report, nothing missing
    assert "not recorded" not in figs["eval-accuracy-vs-tokens"]
    for f in MEASURED[:2]:
        rep = report.read_eval_report(f)
        assert report.token_curves(rep) == ({"greedy": [(rep["greedy"]["tokens"] / rep["problems"],
                                                         rep["greedy"]["accuracy"])]}, [])
    assert "tokens/problem" in page


def test_token_curves_and_positions():
    rep = {"problems": 2, "greedy": {"accuracy": 0.5, "tokens": 100, "tokens_per_problem": 50.0},
           "majority": {"samples": 3, "accuracy": 0.5, "curve": {"1": 0.0, "2": 0.5, "3": 0.5},
                        "tokens_curve": {"1": 40.0, "2": 90.0, "3": 130.0}},
           "best_of": {"samples": 3, "accuracy": 1.0, "curve": {"1": 0.0, "2": 1.0, "3": 1.0},
                       "tokens_curve": {"1": 40.0, "2": 90.0, "3": 130.0}},
           "mcts": {"2": {"accuracy": 1.0, "tokens_per_problem": 1500.0}, "1": {"accuracy": 0.5,
                                                                                 "tokens_per_problem": 500.0}}}
    curves, missing = report.token_curves(rep)
    assert missing == []
    assert curves["greedy"] == [(50.0, 0.5)]
    assert curves["majority"] == [(40.0, 0.0), (90.0, 0.5), (130.0, 0.5)]
    assert curves["PPM best-of-N"] == [(40.0, 0.0), (90.0, 1.0), (130.0, 1.0)]
    assert curves["MCTS+PPM"] == [(500.0, 0.5), (1500.0, 1.0)]
    assert report.trajectory_curves(rep)["MCTS+PPM"] == [(1, 0.5), (2, 1.0)]
    # a report from before every method counted tokens: greedy's total only
    old = {"problems": 2, "greedy": {"accuracy": 0.5, "tokens": 100},
           "majority": {"samples": 3, "accuracy": 0.5, "curve": {"1": 0.0}}, "mcts": {"1": {"accuracy": 0.5}}}
    assert report.token_curves(old) == ({"greedy": [(50.0, 0.5)]}, ["majority", "MCTS+PPM"])
    at = lambda label, model="": report.eval_position(report.EvalInput(label, "", {"model": model}))  # noqa: E731
    assert at("r3") == "r3" and at("base") == "base" and at("x", "policy@r2") == "r2" and at("x", "policy/r1") == "r1"
    assert at("round1-eval-base", "policy service 127.0.0.1:50061") is None


def test_bad_inputs_are_refused(tmp_path, rstar_home, capsys):
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text(json.dumps({"hello": 1}))
    assert main(["report", "--eval", str(not_a_report), "--out", str(tmp_path / "o.html")]) == 2
    assert main(["report", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "o.html")]) == 1
    assert main(["report", "--rounds", "one", "--out", str(tmp_path / "o.html")]) == 2
    err = capsys.readouterr().err
    assert "not an `rstar eval` report" in err and "no evolution round" in err and "--rounds" in err
    assert not (tmp_path / "o.html").exists()


def test_ppm_pair_bars_take_every_measurement_the_round_holds():
    """Training pairs and held-out pairs (train-ppm summary), and the next round's scored trees."""
    r1 = report.RoundInput(1, None, {"train-ppm": {"pairs": 5, "train": {"train_pair_accuracy": 0.8},
                                                   "holdout": {"pairs": 4, "pair_accuracy": 0.75}}},
                           None, report.PPMTreeStats())
    r2 = report.RoundInput(2, None, {"train-ppm": {"skipped": True}}, None,
                           report.ppm_tree_stats([_tree()]))
    inp = report.ReportInputs([r1, r2], [])
    assert report.ppm_pair_bars(inp) == [("ppm r1", "training pairs", 0.8, 5), ("ppm r1", "held-out pairs", 0.75, 4),
                                         ("ppm r1", "next round's trees", 0.5, 2)]
    assert embedded_png(figures(report.render_html(inp, report.sections(inp)))["ppm-pair-accuracy"])
