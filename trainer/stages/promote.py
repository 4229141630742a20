"""Stage `promote`: the gate on the eval summary; if it passes, CURRENT moves to the round's PPM and policy."""

from __future__ import annotations

import logging
from typing import Any

from rstar.rounds import summary_key
from trainer import publish
from trainer.stages.context import Context, StageError

log = logging.getLogger(__name__)


def stage_promote(ctx: Context, round_no: int) -> dict[str, Any]:
    ev = ctx.get_json(summary_key(round_no, "eval"))
    if ev is None:
        raise StageError(f"round {round_no}: no evaluation summary ({summary_key(round_no, 'eval')}); run eval first")
    ppm = ctx.get_json(summary_key(round_no, "train-ppm")) or {}
    g = publish.gate(ev["candidate"].get("greedy_accuracy"), ev["current"].get("greedy_accuracy"),
                     ctx.cfg.max_regression, ctx.cfg.min_accuracy)
    summary: dict[str, Any] = {"round": round_no, "gate": g.as_dict(), "promoted": False}
    if g.passed:
        reason = f"round {round_no}: {g.reason}"
        summary["promotions"] = publish.promote_pair(ctx.registry, ev["candidate"]["version"],
                                                     ppm.get("version") if not ppm.get("skipped") else None, reason)
        summary["promoted"] = True
        log.info("round %d: promoted (%s)", round_no, g.reason)
    else:
        log.warning("round %d: gate failed, CURRENT unchanged: %s", round_no, g.reason)
    ctx.put_json(summary_key(round_no, "promote"), summary)
    return summary
