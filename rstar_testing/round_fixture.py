"""Builds the committed round-report fixture (tests/fixtures/report/) by really running two rounds.

`build(out_dir, base_model)` runs `trainer.evolve.evolve` for rounds 1-2 on a tiny model
(round 1: reference bootstrap + terminal-guided MCTS, so there are wrong trajectories and
the PPM trains; round 2: MCTS guided by round 1's PPM, so the trees carry PPM scores),
then evaluates the base model and each round's policy with `trainer.evaluate.evaluate`
(greedy, majority vote over 3 samples, MCTS + PPM at 1 and 2 trajectories through a real
search service started in this process on that round's policy and PPM). It keeps what the
report reads and drops the model weights:

    out_dir/store/rounds/...          state.json, stage summaries, eval-report.json, sft/pairs
    out_dir/store/trajectories/...    synthesis trees (+ manifests)
    out_dir/store/evals/...           the eval stage's cache
    out_dir/evals/<label>.json.gz     the standalone eval reports (what `rstar eval` writes, gzipped)

Run from the repository root (minutes on 2 CPU cores; the tiny model is the tests' cached
`tiny-llama-fmt3`, fitted to two problems whose answer is 36):

    .venv/bin/python -m rstar_testing.round_fixture --out tests/fixtures/report

Test support only: production code never imports this module.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# (question, GSM8K-style solution, answer): the pool; the first two are what the tiny model was fitted to
POOL = [
    ("Tom has 3 boxes with 12 apples each. How many apples does he have?",
     "He has 3*12 = <<3*12=36>>36 apples.\n#### 36", "36"),
    ("What is 12 times 3?", "It is 12*3 = <<12*3=36>>36.\n#### 36", "36"),
    ("Tom has 3 boxes of 4 eggs. How many eggs?", "He has 3*4 = <<3*4=12>>12 eggs.\n#### 12", "12"),
    ("A pen costs 2 dollars. How much do 5 pens cost?", "They cost 5*2 = <<5*2=10>>10 dollars.\n#### 10", "10"),
    ("Sam has 6 boxes with 6 apples each. How many apples does he have?",
     "He has 6*6 = <<6*6=36>>36 apples.\n#### 36", "36"),
    ("What is 9 times 4?", "It is 9*4 = <<9*4=36>>36.\n#### 36", "36"),
]
DEV = [
    ("What is 12 times 3?", "36"),
    ("Ann has 4 bags with 9 apples each. How many apples does she have?", "36"),
    ("What is 2 + 2?", "4"),
]
ROUNDS = 2
SAMPLES = 3
MCTS_TRAJECTORIES = (1, 2)
MCTS_ROLLOUTS = 2
STEP_TOKENS = 48
MAX_DEPTH = 5
THREADS = 1   # torch threads: more only slow a tiny model down on a shared CPU


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evolve_config(work: Path, base_model: Path):
    from trainer.evolve import EvolveConfig

    pool = _write_jsonl(work / "pool.jsonl", [{"id": f"p{i}", "problem": q, "solution": s, "answer": a}
                                              for i, (q, s, a) in enumerate(POOL)])
    dev = _write_jsonl(work / "dev.jsonl", [{"id": f"dev{i}", "problem": q, "answer": a}
                                            for i, (q, a) in enumerate(DEV)])
    # sft_lr 1e-5 for 2 steps: the rounds' policies stay close to the base (a higher rate breaks the
    # tiny model's format, and round 2's trees then hold no correct answer);
    # max_regression 1: every round is promoted, so round 2 searches with round 1's policy and PPM;
    # temperature 1 and no pair filters: the tiny model's trees are small, and the PPM needs pairs
    return EvolveConfig(
        store_url=str(work / "store"), pool=str(pool), dev=str(dev), base_model=str(base_model),
        bootstrap="reference+policy", rollouts="6", candidates=4, temperature=1.0, max_depth=MAX_DEPTH,
        max_step_tokens=STEP_TOKENS, chunk=8, ppm_from_round=2, sft_max_steps=2, sft_batch_size=2,
        sft_micro_batch=2, sft_lr=1e-5, sft_max_length=512, ppm_mode="head", ppm_batch_size=16,
        ppm_max_steps=30, ppm_head_lr=1e-2, min_q_margin=0.0, min_edit_distance=0, eval_max_tokens=STEP_TOKENS,
        eval_max_depth=MAX_DEPTH, max_regression=1.0, work_dir=str(work / "work"), progress=False,
        threads=THREADS)


def _without_few_shot(model_dir: Path, out: Path) -> Path:
    """A copy of the model that says it is prompted without the worked examples (it was fitted so)."""
    from rstar.artifacts import MODEL_INFO, read_model_info

    shutil.copytree(model_dir, out)
    (out / MODEL_INFO).write_text(json.dumps({**read_model_info(model_dir), "few_shot": False}))
    return out


def _evaluate(ctx, version: str | None, label: str, problems: list[dict[str, Any]]) -> dict[str, Any]:
    """`rstar eval` of one policy version: greedy, majority, MCTS through a search service on it and its PPM."""
    from rstar.ppm import PPMScorer
    from rstar.search.core import SearchCore
    from search_svc.config import SearchConfig
    from search_svc.server import create_server
    from trainer import publish
    from trainer.evaluate import EvalConfig, HFPolicy, evaluate
    from trainer.execution import make_executor

    policy_dir = ctx.model_dir(publish.POLICY, version)
    policy = HFPolicy(policy_dir, version=label, threads=THREADS)
    # the PPM served beside that policy: the newest one published up to its round (a round whose
    # pairs were empty published none), for the base the base PPM (backbone + fixed-seed fresh head)
    ppm_version = next((f"r{n}" for n in range(int(version[1:]) if version else 0, 0, -1)
                        if publish.existing(ctx.registry, publish.PPM, f"r{n}")), None)
    scorer = (PPMScorer(ctx.registry.fetch(publish.PPM, ppm_version), ppm_version) if ppm_version
              else PPMScorer(policy_dir, "base"))
    executor = make_executor("")
    service = create_server(SearchConfig(port=0, metrics_port=-1, rollouts=MCTS_ROLLOUTS, candidates=3,
                                         max_depth=MAX_DEPTH, max_step_tokens=STEP_TOKENS),
                            core=SearchCore(policy, executor, scorer)).start()
    try:
        cfg = EvalConfig(greedy=True, samples=SAMPLES, mcts=MCTS_TRAJECTORIES, mcts_rollouts=MCTS_ROLLOUTS,
                         search_address=service.address, max_tokens=STEP_TOKENS, max_depth=MAX_DEPTH)
        return evaluate(problems, policy, executor, cfg, meta={"dataset": "dev.jsonl", "model": f"policy@{label}"})
    finally:
        service.close()
        executor.close()


def _check(ctx) -> None:
    """The fixture is only useful if every quantity the report plots is in it."""
    from rstar import rounds
    from trainer import data

    for n in range(1, ROUNDS + 1):
        st = rounds.load_state(ctx.store, n)
        assert st is not None and st.status == "succeeded", f"round {n} did not succeed"
    assert not rounds.load_state(ctx.store, 1).summaries["train-ppm"].get("skipped"), "round 1 trained no PPM"
    scored = [nd for _, t in data.iter_round_trees(ctx.store, 2) for nd in t.nodes if nd.ppm_score is not None]
    assert scored, "round 2's trees carry no PPM scores"


def build(out_dir: Path, base_model: Path) -> None:
    from rstar import rounds as rstar_rounds
    from trainer import evolve

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="rstar-round-fixture-") as tmp:
        work = Path(tmp)
        cfg = _evolve_config(work, _without_few_shot(base_model, work / "base"))
        ctx = evolve.Context(cfg)
        evolve.evolve(ctx, 1)
        # fail in minutes, not after round 2: without pairs round 1 trains no PPM to guide round 2
        assert not ctx.get_json(rstar_rounds.summary_key(1, "train-ppm")).get("skipped"), "round 1 trained no PPM"
        evolve.evolve(ctx, ROUNDS)
        _check(ctx)
        problems = ctx.dev_problems()
        reports = {"base": _evaluate(ctx, None, "base", problems)}
        for n in range(1, ROUNDS + 1):
            reports[f"r{n}"] = _evaluate(ctx, f"r{n}", f"r{n}", problems)
        for sub in ("store", "evals"):   # replaced; anything else there (the README) stays
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for top in ("rounds", "trajectories", "evals"):   # not models/: weights are megabytes
            shutil.copytree(work / "store" / top, out_dir / "store" / top)
        (out_dir / "evals").mkdir(parents=True)
        for label, report in reports.items():
            # mtime 0: rebuilding with the same results gives the same bytes
            with gzip.GzipFile(out_dir / "evals" / f"{label}.json.gz", "wb", mtime=0) as f:
                f.write(json.dumps(report, indent=1, default=str).encode())


def _tiny_format_model() -> Path:
    """The tests' `tiny_format_model_dir` (tests/conftest.py), built into the same cache if absent."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from rstar import steps
    from rstar.models import FAST, ensure_model
    from rstar_testing.tinymodel import make_tiny_model
    from tests.conftest import TEST_HOME, TINY_SOLUTIONS

    base = ensure_model(FAST.name, TEST_HOME / "cache" / "base" / FAST.name)
    texts = [steps.render_prompt(q, [], few_shot=False) + "".join(s)[len(steps.CODE_START) + 1:]
             for q, s in TINY_SOLUTIONS]
    return make_tiny_model(TEST_HOME / "cache" / "tiny-llama-fmt3", base, train_on=texts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rstar_testing.round_fixture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tests/fixtures/report", help="fixture directory (its store/ and evals/ are replaced)")
    p.add_argument("--base-model", default="", help="model directory (default: the tests' tiny format model)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build(Path(args.out), Path(args.base_model) if args.base_model else _tiny_format_model())
    print(f"fixture: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
