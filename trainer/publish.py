"""Publishing trained models to the registry, and the promotion gate.

A trained directory becomes an immutable registry version (`rstar.registry`):
files first, the manifest (parents, round, data used, hyperparameters,
evaluation results, sha256 of every file) last. Version names are
deterministic per round (`r<n>`), so a stage that is re-run after a crash finds
its version already published and does not upload it twice.

Promotion: `gate(candidate, current, min_delta)` passes when the candidate's
greedy accuracy is at least the current version's minus `max_regression`
(default 0: not worse). `promote_pair` moves the PPM's `CURRENT` first and the
policy's second, each a single atomic pointer write in the store (readers see
the old or the new version, never a torn pointer); a failed gate writes
nothing, so `CURRENT` is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rstar.registry import IncompleteVersion, Manifest, ModelRegistry, VersionNotFound

log = logging.getLogger(__name__)

POLICY = "policy"
PPM = "ppm"


def version_name(round_no: int, suffix: str = "") -> str:
    return f"r{int(round_no)}{suffix}"


def existing(registry: ModelRegistry, name: str, version: str) -> Manifest | None:
    """The version's manifest if it was published completely, else None."""
    try:
        return registry.manifest(name, version)
    except (VersionNotFound, IncompleteVersion):
        return None


def publish_once(registry: ModelRegistry, name: str, local_dir: str | Path, version: str, **kw: Any) -> Manifest:
    """Publish unless a complete version of that name exists (idempotent across stage retries)."""
    m = existing(registry, name, version)
    if m is not None:
        log.info("%s/%s is already published; not uploading again", name, version)
        return m
    return registry.publish(name, Path(local_dir), version, **kw)


@dataclass
class GateResult:
    passed: bool
    reason: str
    candidate: float | None
    current: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gate(candidate: float | None, current: float | None, max_regression: float = 0.0,
         min_accuracy: float = 0.0) -> GateResult:
    """Pass when candidate >= current - max_regression and candidate >= min_accuracy."""
    if candidate is None:
        return GateResult(False, "the candidate has no evaluation result", candidate, current)
    if candidate < min_accuracy:
        return GateResult(False, f"accuracy {candidate:.3f} is below the floor {min_accuracy:.3f}", candidate, current)
    if current is None:
        return GateResult(True, "no current evaluation to compare with", candidate, current)
    if candidate + 1e-12 >= current - max_regression:
        return GateResult(True, f"accuracy {candidate:.3f} vs current {current:.3f} "
                                f"(allowed regression {max_regression:.3f})", candidate, current)
    return GateResult(False, f"accuracy {candidate:.3f} regresses from {current:.3f} by more than "
                             f"{max_regression:.3f}", candidate, current)


def promote_pair(registry: ModelRegistry, policy_version: str | None, ppm_version: str | None, reason: str
                 ) -> dict[str, Any]:
    """Point CURRENT at the new versions (PPM first, policy second); each write is atomic."""
    done: dict[str, Any] = {}
    for name, version in ((PPM, ppm_version), (POLICY, policy_version)):
        if not version:
            continue
        if registry.current(name) == version:
            done[name] = {"version": version, "already_current": True}
            continue
        rec = registry.promote(name, version, reason=reason)
        done[name] = {"version": version, "promotion_id": rec["id"]}
    return done
