"""Self-evolution rounds in one process: `rstar evolve --rounds N` (spec section 4).

The driver runs a round's tasks (synthesis shards -> train-policy -> train-ppm
-> eval -> promote; the stages are in `trainer.stages`) one after the other in
this process, keeping the round state (`rstar.rounds`, the same state the
Kubernetes controller keeps) in `rounds/round-<n>/state.json`. A killed
process resumes at the first task that has not succeeded; the Kubernetes
controller (trainer/controller.py) can take over a round started here, and
the other way round.

Store layout (besides the registry's `models/`):
    trajectories/round-<n>/shard-<i>-<c>.jsonl.gz (+ .manifest.json)   synthesis trees
    rounds/round-<n>/state.json            round state (rstar.rounds)
    rounds/round-<n>/<stage>.json          stage summary (copied into state.json)
    rounds/round-<n>/synthesis-<i>.json    per-shard synthesis summary
    rounds/round-<n>/sft.jsonl.gz          the SFT data the round's policy was trained on
    rounds/round-<n>/pairs.jsonl.gz        the PPM pairs
    rounds/round-<n>/eval-report.json      full evaluation report
    evals/policy/<version>/<digest>.json   cached evaluation of a version on a dev set
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from rstar import rounds
from rstar.rounds import STAGES, SUCCEEDED, RoundState, summary_key
from trainer.stages import run_stage
from trainer.stages.config import BOOTSTRAPS, EvolveConfig
from trainer.stages.context import Context, StageError

__all__ = ["BOOTSTRAPS", "STAGES", "Context", "EvolveConfig", "StageError", "evolve", "next_round", "run_round",
           "run_stage"]

log = logging.getLogger(__name__)

LOCAL_DRIVER = "rstar evolve (local)"
LOCAL_DEADLINE_SECONDS = 10 ** 9  # a local round has no deadline; the controller's check never fires


def run_round(ctx: Context, round_no: int, on_task: Callable[[str, str], None] | None = None) -> RoundState:
    """Run (or resume) one round in this process; its state is saved in rounds/round-<n>/state.json."""
    st = rounds.load_state(ctx.store, round_no)
    if st is None:
        st = rounds.new_round(round_no, ctx.cfg.shards, time.time(), LOCAL_DEADLINE_SECONDS, driver=LOCAL_DRIVER)
    if st.status == SUCCEEDED:
        log.info("round %d already succeeded", round_no)
        return st
    st = rounds.save_state(ctx.store, rounds.round_resumed(st, time.time()), time.time())
    for tid in st.task_ids():
        t = st.tasks[tid]
        if t.status == SUCCEEDED:
            log.info("round %d: %s done earlier; skipping", round_no, tid)
            continue
        job = f"local-{os.getpid()}-a{rounds.next_attempt(t)}"
        st = rounds.save_state(ctx.store, rounds.task_started(st, tid, job, time.time()), time.time())
        if on_task:
            on_task(tid, "start")
        try:
            summary = run_stage(ctx, t.stage, round_no, t.shard or 0, st.shards)
        except Exception as e:
            now = time.time()
            st = rounds.task_failed(st, tid, f"{type(e).__name__}: {e}", now)
            rounds.save_state(ctx.store, rounds.round_failed(st, f"{tid}: {e}", now), now)
            raise
        st = rounds.task_succeeded(st, tid, time.time())
        if st.stage_succeeded(t.stage):
            st = rounds.summary_recorded(st, t.stage, ctx.get_json(summary_key(round_no, t.stage)) or summary)
        st = rounds.save_state(ctx.store, st, time.time())
        if on_task:
            on_task(tid, "done")
    return rounds.save_state(ctx.store, rounds.round_succeeded(st, time.time()), time.time())


def next_round(ctx: Context) -> int:
    """The round to work on: an unfinished one, else the one after the last succeeded."""
    known = rounds.known_rounds(ctx.store)
    for n in known:
        st = rounds.load_state(ctx.store, n)
        if st and st.status != SUCCEEDED:
            return n
    return (known[-1] + 1) if known else 1


def evolve(ctx: Context, last_round: int, on_task: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
    """Run rounds until round `last_round` has succeeded (resuming whatever is unfinished).

    Returns the final states in their stored JSON form (`RoundState.to_dict()`), which the CLI prints."""
    out = []
    while True:
        n = next_round(ctx)
        if n > last_round:
            break
        log.info("round %d of %d", n, last_round)
        out.append(run_round(ctx, n, on_task).to_dict())
    return out
