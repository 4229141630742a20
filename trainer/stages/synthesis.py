"""Stage `synthesis`: one shard of the round's problem pool -> stored trajectory shards + summaries.

Round 1 is a bootstrap (`EvolveConfig.bootstrap`): `reference` converts GSM8K
reference solutions (trainer.bootstrap), `teacher` runs MCTS with an
OpenAI-compatible endpoint as the policy, `policy` runs MCTS with the current
policy. Rounds >= 2 run MCTS with the current policy (terminal-guided), and
from `ppm_from_round` on with the current PPM (PPM-augmented). The pool is cut
into chunks of `chunk` problems; each chunk is one trajectory shard, and a
complete shard is never redone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rstar.rounds import summary_key
from trainer import publish
from trainer.stages.context import Context, StageError
from trainer.stages.context import stage_executor as _executor

log = logging.getLogger(__name__)


def _chunks(ctx: Context, shard: int, shards: int, prefix: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    mine = ctx.pool_problems()[shard::shards]
    size = ctx.cfg.chunk
    return [(f"{prefix}shard-{shard:03d}-{c:04d}", mine[i:i + size]) for c, i in enumerate(range(0, len(mine), size))]


def synthesis_methods(cfg, round_no: int) -> list[str]:
    """What a round's synthesis runs: round 1 the bootstrap (one or two methods), later the policy."""
    return cfg.bootstrap.split("+") if round_no == 1 else ["policy"]


def _make_synth_policy(ctx: Context, round_no: int):
    cfg = ctx.cfg
    if "teacher" in synthesis_methods(cfg, round_no):
        from trainer.bootstrap import TeacherPolicy

        if not cfg.teacher_url or not cfg.teacher_model:
            raise StageError("bootstrap=teacher needs --teacher-url and --teacher-model")
        return TeacherPolicy(cfg.teacher_url, cfg.teacher_model, cfg.teacher_api_key or os.environ.get("OPENAI_API_KEY", ""),
                             timeout=cfg.teacher_timeout)
    if cfg.policy_address:
        from rstar.clients import PolicyClient

        # one call carries every active tree's expansion: on a CPU it can take many minutes
        return PolicyClient(cfg.policy_address, timeout=cfg.call_timeout)
    from trainer.evaluate import HFPolicy

    version = ctx.registry.current(publish.POLICY)
    return HFPolicy(ctx.model_dir(publish.POLICY, version), version=version or "base", threads=cfg.threads)


def _make_synth_scorer(ctx: Context, round_no: int):
    if round_no < ctx.cfg.ppm_from_round:
        return None
    if ctx.cfg.ppm_address:
        from rstar.clients import PPMClient

        return PPMClient(ctx.cfg.ppm_address, timeout=ctx.cfg.call_timeout)
    version = ctx.registry.current(publish.PPM)
    if version is None:
        log.warning("round %d: no promoted PPM; synthesis stays terminal-guided", round_no)
        return None
    from rstar.ppm import PPMScorer

    return PPMScorer(ctx.model_dir(publish.PPM, version), version)   # implements the Scorer protocol


def stage_synthesis(ctx: Context, round_no: int, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    from rstar import trees as traj

    cfg = ctx.cfg
    methods = synthesis_methods(cfg, round_no)
    done_names = {i.shard for i in traj.list_complete_shards(ctx.store, round_no)}
    t0 = time.monotonic()
    chunks: list[tuple[str, list[dict[str, Any]]]] = []
    for method in methods:
        # with two methods the references get their own shard names; MCTS keeps the plain ones
        mine = _chunks(ctx, shard, shards, "ref-" if method == "reference" and len(methods) > 1 else "")
        chunks += mine
        todo = [(name, probs) for name, probs in mine if name not in done_names]
        log.info("round %d synthesis shard %d/%d (%s): %d chunks, %d already stored", round_no, shard, shards,
                 method, len(mine), len(mine) - len(todo))
        if not todo:
            continue
        executor = _executor(ctx)
        try:
            if method == "reference":
                _synth_reference(ctx, round_no, todo, executor)
            else:
                _synth_mcts(ctx, round_no, todo, executor)
        finally:
            executor.close()
    method = "+".join(methods)
    # the shard's summary, from what is stored (so a resumed shard reports everything); with two
    # methods the top-level counts are the last one's (MCTS), each method's are under by_method
    by_method: dict[str, dict[str, int]] = {}
    for name, probs in chunks:
        m = traj.read_manifest(ctx.store, round_no, name)
        key = "reference" if name.startswith("ref-") or m.get("method") == "gsm8k-reference" else methods[-1]
        c = by_method.setdefault(key, {"total": 0, "solved": 0, "trees": 0})
        c["total"] += m.get("problems", len(probs))
        c["solved"] += m.get("solved", 0)
        c["trees"] += m.get("trees", 0)
    last = by_method.get(methods[-1], {"total": 0, "solved": 0, "trees": 0})
    summary = {"round": round_no, "shard": shard, "shards": shards, "method": method, "chunks": len(chunks),
               "chunks_run": len([c for c in chunks if c[0] not in done_names]), **last,
               "by_method": by_method, "seconds": round(time.monotonic() - t0, 1)}
    ctx.put_json(summary_key(round_no, f"synthesis-{shard}"), summary)
    _aggregate_synthesis(ctx, round_no, shards)
    return summary


def _aggregate_synthesis(ctx: Context, round_no: int, shards: int) -> dict[str, Any]:
    parts = [ctx.get_json(summary_key(round_no, f"synthesis-{i}")) for i in range(shards)]
    have = [p for p in parts if p]
    agg = {"round": round_no, "shards": shards, "shards_done": len(have),
           "total": sum(p["total"] for p in have), "solved": sum(p["solved"] for p in have),
           "trees": sum(p["trees"] for p in have), "method": have[0]["method"] if have else ""}
    agg["solved_ratio"] = agg["solved"] / agg["total"] if agg["total"] else 0.0
    ctx.put_json(summary_key(round_no, "synthesis"), agg)
    return agg


def _synth_reference(ctx: Context, round_no: int, todo, executor) -> None:
    from rstar import trees as traj
    from trainer import bootstrap

    for name, probs in todo:
        convs, _ = bootstrap.convert_pool(probs)
        ok, stats = bootstrap.verify_conversions(convs, executor)
        stats.problems = len(probs)
        trees = [bootstrap.chain_tree(c, out, round_no) for c, out in ok]
        traj.write_shard(ctx.store, round_no, name, trees,
                         {"problems": len(probs), "solved": len(trees), "method": "gsm8k-reference",
                          "bootstrap": stats.as_dict()})
        log.info("round %d %s: %s", round_no, name, stats.line())


def _synth_mcts(ctx: Context, round_no: int, todo, executor) -> None:
    from rstar.search.core import SearchCore, SearchOptions, SynthesisProblem
    from rstar.search.mcts import PPM_AUGMENTED, TERMINAL_GUIDED, derive_seed

    cfg = ctx.cfg
    policy = _make_synth_policy(ctx, round_no)
    scorer = _make_synth_scorer(ctx, round_no)
    core = SearchCore(policy, executor, scorer, store=ctx.store)
    for name, probs in todo:
        opts = SearchOptions(rollouts=cfg.rollouts_for(round_no), k=cfg.candidates, max_depth=cfg.max_depth,
                             seed=derive_seed(cfg.seed, round_no, name), temperature=cfg.temperature,
                             max_step_tokens=cfg.max_step_tokens,
                             annotation=PPM_AUGMENTED if scorer is not None else TERMINAL_GUIDED)
        out = core.synthesize([SynthesisProblem(str(p["id"]), p["problem"], str(p["answer"])) for p in probs],
                              opts, round_no=round_no, shard=name, store_trees=True,
                              on_progress=_progress_logger(round_no, name))
        log.info("round %d %s: %d/%d solved, %d tokens generated, %.0f s (%.1f tok/s)", round_no, name, out.solved,
                 len(probs), out.stats.generated_tokens, out.stats.total_seconds,
                 out.stats.generated_tokens / max(out.stats.total_seconds, 1e-9))


def _progress_logger(round_no: int, name: str, every_s: float = 60.0):
    """A synthesis progress callback that logs at most once a minute (a chunk takes minutes on a CPU)."""
    last = [time.monotonic()]

    def report(p) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or p.trees_done == p.trees_total:
            last[0] = now
            log.info("round %d %s: rollouts %d/%d, trees %d/%d, %d tokens, %d executions, %.0f s", round_no, name,
                     p.rollouts_done, p.rollouts_total, p.trees_done, p.trees_total, p.generated_tokens,
                     p.executions, p.elapsed_seconds)
    return report
