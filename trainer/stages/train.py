"""Stages `train-policy` (SFT from the BASE model on rounds 1..n) and `train-ppm` (pairs of round n).

Each publishes `models/<name>/r<n>` once (`trainer.publish`); a rerun finds the
version and skips training, and still writes the stage summary. A shard that
cannot be read is skipped (logged, counted, named in the summary's
`skipped_shards`) rather than failing the stage.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict
from typing import Any

from rstar.rounds import summary_key
from trainer import data, publish
from trainer.stages.context import Context, StageError

log = logging.getLogger(__name__)


def _round_trees(ctx: Context, rounds: range, skipped: list[str]):
    """Trees of the rounds' complete shards; unreadable shards are skipped, logged and named in `skipped`."""
    for r in rounds:
        yield from data.iter_round_trees(ctx.store, r, skipped)


def held_out(problem_id: str, fraction: float) -> bool:
    """Whether a problem's trees are kept out of PPM training (a stable share of problem ids)."""
    if fraction <= 0:
        return False
    return int(hashlib.sha256(problem_id.encode()).hexdigest()[:8], 16) / 2 ** 32 < fraction


def stage_train_policy(ctx: Context, round_no: int) -> dict[str, Any]:
    from rstar.models import base_version_of
    from trainer.sft import train_policy

    cfg = ctx.cfg
    version = publish.version_name(round_no)
    skipped: list[str] = []
    examples, stats = data.build_sft(_round_trees(ctx, range(1, round_no + 1), skipped), top_k=cfg.sft_top_k)
    log.info("round %d: %s", round_no, stats.line())
    blob = data.encode_jsonl_gz(e.to_dict() for e in examples)
    sft_key = f"rounds/round-{round_no}/sft.jsonl.gz"
    ctx.store.put(sft_key, blob)
    data_info = {"sft_key": sft_key, "sha256": hashlib.sha256(blob).hexdigest(), "rounds": list(range(1, round_no + 1)),
                 "problems": stats.problems, "solved": stats.solved, "trajectories": stats.kept,
                 "duplicates": stats.duplicates, "skipped_shards": skipped}
    m = publish.existing(ctx.registry, publish.POLICY, version)
    if m is None:
        if not examples:
            raise StageError(f"round {round_no}: no SFT data (no solved problem in rounds 1..{round_no})")
        out = ctx.work / f"round-{round_no}" / "policy"
        report = train_policy(ctx.base_model(), examples, out, cfg.sft_train(), markers=cfg.markers,
                              work_dir=ctx.work / f"round-{round_no}" / "policy.work",
                              metadata={"round": round_no, "version": version})
        data_info["tokens"] = report["tokens"]
        m = publish.publish_once(
            ctx.registry, publish.POLICY, out, version, parent=f"{publish.POLICY}/{base_version_of(cfg.base_model) or cfg.base_model}", round=round_no,
            data=data_info, eval={"report": summary_key(round_no, "eval")},
            metadata={"base_model": cfg.base_model, "hyperparameters": asdict(cfg.sft_train()),
                      "markers": cfg.markers, "train": {k: v for k, v in report.items() if k != "losses"},
                      "few_shot": False})
        shutil.rmtree(out, ignore_errors=True)
        trained = True
    else:
        trained = False
    summary = {"round": round_no, "version": version, "trained": trained, **data_info,
               "train": (m.metadata or {}).get("train")}
    ctx.put_json(summary_key(round_no, "train-policy"), summary)
    return summary


def stage_train_ppm(ctx: Context, round_no: int) -> dict[str, Any]:
    from trainer.ppm_train import train_ppm, train_ppm_head

    cfg = ctx.cfg
    version = publish.version_name(round_no)
    pcfg = data.PairConfig(min_q_margin=cfg.min_q_margin, min_edit_distance=cfg.min_edit_distance)
    skipped: list[str] = []
    trees = [t for _, t in _round_trees(ctx, range(round_no, round_no + 1), skipped)]
    held = [t for t in trees if held_out(t.problem_id, cfg.ppm_holdout)]
    pairs, stats = data.build_all_pairs((t for t in trees if not held_out(t.problem_id, cfg.ppm_holdout)), pcfg)
    held_pairs, _ = data.build_all_pairs(held, pcfg)
    log.info("round %d: %s; %d held-out problems give %d pairs", round_no, stats.line(), len(held), len(held_pairs))
    blob = data.encode_jsonl_gz(p.to_dict() for p in pairs)
    key = f"rounds/round-{round_no}/pairs.jsonl.gz"
    ctx.store.put(key, blob)
    info = {"pairs_key": key, "sha256": hashlib.sha256(blob).hexdigest(), "pairs": len(pairs),
            "step_pairs": stats.step_pairs, "final_pairs": stats.final_pairs, "groups": stats.groups,
            "filtered_margin": stats.filtered_margin, "filtered_edit": stats.filtered_edit,
            "skipped_shards": skipped, "holdout": {"fraction": cfg.ppm_holdout, "problems": len(held),
                                                   "pairs": len(held_pairs)}}
    if not pairs:
        summary = {"round": round_no, "version": None, "skipped": True,
                   "reason": "no preference pairs (e.g. a reference bootstrap has no wrong trajectories)", **info}
        ctx.put_json(summary_key(round_no, "train-ppm"), summary)
        return summary
    m = publish.existing(ctx.registry, publish.PPM, version)
    trained = False
    if m is None:
        policy_dir = ctx.registry.fetch(publish.POLICY, version)
        out = ctx.work / f"round-{round_no}" / "ppm"
        train = train_ppm_head if cfg.ppm_mode == "head" else train_ppm
        report = train(policy_dir, pairs, out, cfg.ppm_train(),
                       work_dir=ctx.work / f"round-{round_no}" / "ppm.work",
                       metadata={"round": round_no, "version": version})
        if held_pairs:   # ranked by the saved model as the service scores (trees it was not trained on)
            from trainer.ppm_train import pair_accuracy

            info["holdout"]["pair_accuracy"] = pair_accuracy(out, held_pairs)
            log.info("round %d: PPM pairwise accuracy on %d held-out pairs: %.3f", round_no, len(held_pairs),
                     info["holdout"]["pair_accuracy"])
        m = publish.publish_once(
            ctx.registry, publish.PPM, out, version, parent=f"{publish.POLICY}/{version}", round=round_no, data=info,
            eval={"report": summary_key(round_no, "eval")},
            metadata={"hyperparameters": asdict(cfg.ppm_train()),
                      "train": {k: v for k, v in report.items() if k != "losses"}})
        shutil.rmtree(out, ignore_errors=True)
        trained = True
    summary = {"round": round_no, "version": version, "skipped": False, "trained": trained,
               **{**info, **(m.data if isinstance(m.data, dict) else {})}, "train": (m.metadata or {}).get("train")}
    ctx.put_json(summary_key(round_no, "train-ppm"), summary)
    return summary
