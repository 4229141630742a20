"""The five stages of a self-evolution round (spec section 4), and `run_stage`.

Every stage is a function of (context, round[, shard]) that reads its inputs
from, and writes its outputs to, the object store, so each can run in its own
process or Kubernetes Job (`rstar evolve --stage S --round N`, what
trainer/controller.py launches) or all in one process (`rstar evolve --rounds N`,
trainer/evolve.py). Stages are idempotent: finished work is found in the store
and skipped, so a rerun after a crash neither redoes nor duplicates it. Each
writes its JSON summary to `rstar.rounds.summary_key(round, stage)`.

    config.py      EvolveConfig (every `rstar evolve` setting)
    context.py     Context (store, registry, scratch, inputs), StageError
    synthesis.py   synthesis: MCTS or a bootstrap over one shard of the pool
    train.py       train-policy (SFT), train-ppm (pairwise PPM)
    evaluation.py  eval: greedy dev accuracy of the candidate and of CURRENT
    promote.py     promote: the gate, then CURRENT moves
"""

from __future__ import annotations

from typing import Any, Callable

from rstar.rounds import STAGES
from trainer.stages.context import Context, StageError
from trainer.stages.evaluation import stage_eval
from trainer.stages.promote import stage_promote
from trainer.stages.synthesis import stage_synthesis
from trainer.stages.train import stage_train_policy, stage_train_ppm

# the stages other than synthesis (which also takes its shard), by name
STAGE_FUNCTIONS: dict[str, Callable[[Context, int], dict[str, Any]]] = {
    "train-policy": stage_train_policy, "train-ppm": stage_train_ppm, "eval": stage_eval, "promote": stage_promote}


def run_stage(ctx: Context, stage: str, round_no: int, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    """Run one stage (one shard of synthesis) and return its summary."""
    if stage == "synthesis":
        return stage_synthesis(ctx, round_no, shard, shards)
    if stage not in STAGE_FUNCTIONS:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return STAGE_FUNCTIONS[stage](ctx, round_no)
