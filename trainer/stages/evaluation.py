"""Stage `eval`: greedy dev accuracy of the round's policy and of CURRENT (cached per version and dev set)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

from rstar.rounds import summary_key
from trainer import publish
from trainer.stages.context import Context, StageError
from trainer.stages.context import stage_executor as _executor

log = logging.getLogger(__name__)


def _eval_config(ctx: Context):
    from trainer.evaluate import EvalConfig

    return EvalConfig(greedy=True, max_tokens=ctx.cfg.eval_max_tokens, max_depth=ctx.cfg.eval_max_depth)


def evaluate_version(ctx: Context, name: str, version: str | None, problems, executor) -> dict[str, Any]:
    """Greedy dev evaluation of a policy version (cached in the store per version, dev set and settings)."""
    from rstar.models import base_version_of
    from trainer.evaluate import HFPolicy, evaluate

    ecfg = _eval_config(ctx)
    label = version or base_version_of(ctx.cfg.base_model) or "base"
    digest = hashlib.sha256(json.dumps([[p["id"], p["problem"], p["answer"]] for p in problems]
                                       + [asdict(ecfg), ctx.cfg.base_model if version is None else ""],
                                       sort_keys=True).encode()).hexdigest()[:16]
    key = f"evals/{name}/{label}/{digest}.json"
    cached = ctx.get_json(key)
    if cached is not None:
        log.info("evaluation of %s/%s on this dev set is cached (%s)", name, label, key)
        return cached
    policy = HFPolicy(ctx.model_dir(name, version), batch_size=ctx.cfg.eval_batch, version=label, threads=ctx.cfg.threads)
    report = evaluate(problems, policy, executor, ecfg, meta={"model": f"{name}/{label}", "dataset": ctx.cfg.dev})
    ctx.put_json(key, report)
    return report


def stage_eval(ctx: Context, round_no: int) -> dict[str, Any]:
    from trainer.evaluate import summary as eval_summary

    problems = ctx.dev_problems()
    version = publish.version_name(round_no)
    if publish.existing(ctx.registry, publish.POLICY, version) is None:
        raise StageError(f"round {round_no}: policy {version} is not published (run train-policy first)")
    current = ctx.registry.current(publish.POLICY)
    executor = _executor(ctx)
    try:
        cand = evaluate_version(ctx, publish.POLICY, version, problems, executor)
        base = evaluate_version(ctx, publish.POLICY, current, problems, executor) if current != version else cand
    finally:
        executor.close()
    ctx.put_json(f"rounds/round-{round_no}/eval-report.json", {"candidate": cand, "current": base})
    summary = {"round": round_no, "dataset": ctx.cfg.dev, "problems": len(problems),
               "candidate": {"version": version, **eval_summary(cand)},
               "current": {"version": current, **eval_summary(base)}}
    ctx.put_json(summary_key(round_no, "eval"), summary)
    return summary
