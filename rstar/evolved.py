"""Shipped evolved rounds: a round's policy and PPM as small files in the repository.

An embedded base model (rstar.models) can come with evolved rounds, each a folder
`rstar/shipped/<model>/r<N>/`:

    manifest.json                     round, base model (+ its GGUF sha256), versions,
                                      every file's size and sha256, eval results per
                                      version ({version: {dataset: {method: accuracy}}},
                                      the base's too), the command that reproduces it
    policy/lora_adapter.safetensors   the policy's LoRA adapter (rstar.lora)
    policy/rstar_model.json           the policy version's model info
    ppm/value_head.safetensors        the PPM's value head on the policy's backbone
    ppm/rstar_model.json              the PPM version's model info

On a fresh clone, the first start (rstar.modelsource, when the registry has no
promoted version) verifies the files against the manifest, materialises the two
model directories once (`materialise`: the base merged with the adapter, the same
function the trainer published with; the PPM = that backbone + the head), publishes
them as `policy/r<N>` and `ppm/r<N>` and promotes them. The base version stays
registered beside them: `rstar models promote policy base-...` (and `ppm`) goes back.

`export_round` writes such a folder from a trained round in a registry.

Not here: training (trainer), the registry's own verification of published versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rstar.artifacts import (MODEL_INFO, VALUE_HEAD_FILE, atomic_dir, exclusive_lock, read_model_info,
                             write_model_info)
from rstar.config import home_dir
from rstar.lora import LORA_FILE
from rstar.registry import sha256_file

log = logging.getLogger(__name__)

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
MANIFEST = "manifest.json"
SCHEMA = 1
MAX_ROUND_BYTES = 40 * 1024 * 1024   # what a round may add to the repository
DONE_MARKER = ".rstar-materialised"
POLICY_FILES = (LORA_FILE, MODEL_INFO)
PPM_FILES = (VALUE_HEAD_FILE, MODEL_INFO)


class ShippedError(RuntimeError):
    """A shipped round that is incomplete, corrupted, or does not fit its base model."""


@dataclass(frozen=True)
class ShippedRound:
    path: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> str:
        return self.manifest["base_model"]

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def policy_version(self) -> str:
        return self.manifest["policy"]["version"]

    @property
    def ppm_version(self) -> str:
        return self.manifest["ppm"]["version"]

    def eval_of(self, version: str) -> dict[str, Any]:
        """The manifest's evaluation results of one version ({dataset: {method: accuracy}})."""
        results = self.manifest.get("eval", {}).get(version, {})
        return results if isinstance(results, dict) else {}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]


def read_round(path: str | Path) -> ShippedRound:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ShippedError(f"{path}: no readable {MANIFEST} ({e})") from e
    if manifest.get("schema") != SCHEMA:
        raise ShippedError(f"{path / MANIFEST}: schema {manifest.get('schema')!r}, this version reads {SCHEMA}")
    for key in ("base_model", "round", "policy", "ppm"):
        if key not in manifest:
            raise ShippedError(f"{path / MANIFEST}: no {key!r}")
    return ShippedRound(path, manifest)


def shipped_rounds(model: str, root: Path | None = None) -> list[ShippedRound]:
    """The rounds shipped for an embedded model, oldest first ([] when none)."""
    base = Path(root or os.environ.get("RSTAR_SHIPPED_DIR") or SHIPPED_ROOT) / model
    if not base.is_dir():
        return []
    rounds = [read_round(p) for p in base.iterdir() if (p / MANIFEST).is_file()]
    return sorted(rounds, key=lambda r: r.round)


def latest(model: str, root: Path | None = None) -> ShippedRound | None:
    rounds = shipped_rounds(model, root)
    return rounds[-1] if rounds else None


def verify(shipped: ShippedRound) -> None:
    """Every file the manifest lists is there with its size and sha256; ShippedError names the first that is not."""
    for part in ("policy", "ppm"):
        for name, want in shipped.manifest[part]["files"].items():
            p = shipped.path / part / name
            if not p.is_file():
                raise ShippedError(f"shipped round {shipped.path}: {part}/{name} is missing")
            if p.stat().st_size != want["size"] or sha256_file(p)[0] != want["sha256"]:
                raise ShippedError(f"shipped round {shipped.path}: {part}/{name} does not match its sha256 in "
                                   f"{MANIFEST} (corrupted, or a Git LFS pointer: fetch the real file)")


def cache_dir(shipped: ShippedRound) -> Path:
    return home_dir() / "cache" / "evolved" / shipped.model / f"r{shipped.round}-{shipped.digest}"


def materialise(shipped: ShippedRound, base_dir: str | Path | None = None) -> dict[str, Path]:
    """The round's policy and PPM model directories, built once and cached ({"policy": dir, "ppm": dir}).

    Policy: the base checkpoint merged with the adapter (rstar.lora.merge_into). PPM: that
    backbone with the shipped value head (rstar.ppm.build_ppm_dir). Safe from several processes.
    """
    from rstar import models

    out = cache_dir(shipped)
    dirs = {"policy": out / "policy", "ppm": out / "ppm"}
    if (out / DONE_MARKER).is_file():
        return dirs
    with exclusive_lock(out.parent / f".{out.name}.lock", f"shipped round {shipped.round} of {shipped.model}"):
        if (out / DONE_MARKER).is_file():
            return dirs
        verify(shipped)
        base = Path(base_dir) if base_dir else models.ensure_model(shipped.model)
        want = shipped.manifest.get("base_gguf_sha256")
        have = json.loads((base / models.DONE_MARKER).read_text()).get("gguf_sha256") \
            if (base / models.DONE_MARKER).is_file() else None
        if want and have and want != have:
            raise ShippedError(f"shipped round {shipped.path} was trained on a base with GGUF sha256 {want}, "
                               f"{base} was converted from {have}")
        t0 = time.monotonic()
        log.info("materialising shipped round %s of %s (one time)", shipped.round, shipped.model)
        with atomic_dir(out) as tmp:
            build_policy_dir(base, shipped.path / "policy", tmp / "policy")
            from rstar.ppm import build_ppm_dir

            build_ppm_dir(tmp / "policy", shipped.path / "ppm" / VALUE_HEAD_FILE, tmp / "ppm",
                          read_model_info(shipped.path / "ppm"))
            (tmp / DONE_MARKER).write_text(json.dumps({"manifest": shipped.digest, "at": time.time()}))
        log.info("shipped round %s ready in %.0f s: %s", shipped.round, time.monotonic() - t0, out)
    return dirs


def build_policy_dir(base_dir: Path, shipped_policy: Path, out: Path) -> Path:
    """base + the shipped adapter -> a policy model directory (with its model info and the adapter)."""
    from rstar import lora

    lora.merge_into(base_dir, shipped_policy / LORA_FILE, out)
    shutil.copy2(shipped_policy / LORA_FILE, out / LORA_FILE)
    write_model_info(out, read_model_info(shipped_policy))
    return out


def for_spec(spec: str) -> ShippedRound | None:
    """The shipped round a model spec means: `default` is the default embedded model's latest
    shipped round (None when it ships none); an explicit embedded name is its base (None)."""
    from rstar import models

    if spec != "default" or os.environ.get("RSTAR_NO_SHIPPED"):
        return None
    return latest(models.DEFAULT.name)


def resolve(spec: str, name: str) -> tuple[Path, str]:
    """(model directory, version) that `spec` names for service `name` (policy or ppm), without a
    registry: the shipped round for `default` where one ships, else rstar.models' directory."""
    from rstar import models

    shipped = for_spec(spec)
    if shipped is not None:
        return materialise(shipped)[name], shipped.manifest[name]["version"]
    return models.resolve_model_dir(spec), models.base_version_of(spec) or Path(spec).name


def register(registry, shipped: ShippedRound, names: tuple[str, ...] = ("policy", "ppm")) -> dict[str, str]:
    """Publish the shipped round's versions (once) and promote them where nothing else was chosen.

    A name is promoted to the shipped version when it has no CURRENT, or when CURRENT is
    the embedded base version and the shipped version has never been promoted there
    (so an operator's rollback to the base, or any other promotion, is kept)."""
    from rstar import models
    from rstar.registry import VersionNotFound, register_base_version

    base_version = models.embedded(shipped.model).base_version
    out = {}
    for name in names:
        version = shipped.manifest[name]["version"]
        try:
            registry.manifest(name, version)
        except VersionNotFound:
            register_base_version(registry, name, materialise(shipped)[name], version,
                                  {"source": f"shipped round {shipped.round} of {shipped.model}",
                                   "model": shipped.model, "round": shipped.round,
                                   "eval": shipped.eval_of(version)},
                                  promote_if_unset=False)
        current = registry.current(name)
        seen = any(h.get("version") == version and h.get("action") == "promote" for h in registry.history(name))
        if current is None or (current == base_version and not seen):
            registry.promote(name, version, deep=False, reason=f"shipped round {shipped.round}")
        out[name] = registry.current(name)
    return out


def export_round(registry, round_no: int, model: str, out_root: Path | None = None,
                 eval_results: dict[str, Any] | None = None, reproduce: str = "") -> ShippedRound:
    """Write `rstar/shipped/<model>/r<N>/` from the registry's policy/r<N> (a LoRA version) and ppm/r<N>."""
    from rstar import models

    version = f"r{round_no}"
    policy_dir, ppm_dir = Path(registry.fetch("policy", version)), Path(registry.fetch("ppm", version))
    if not (policy_dir / LORA_FILE).is_file():
        raise ShippedError(f"policy/{version} has no {LORA_FILE}: only LoRA versions trained without added "
                           "marker tokens (--lora-r R --markers none) can be shipped")
    dest = Path(out_root or SHIPPED_ROOT) / model / version
    files: dict[str, dict[str, dict[str, Any]]] = {"policy": {}, "ppm": {}}
    with atomic_dir(dest) as tmp:
        for part, src, names in (("policy", policy_dir, POLICY_FILES), ("ppm", ppm_dir, PPM_FILES)):
            (tmp / part).mkdir()
            for name in names:
                shutil.copy2(src / name, tmp / part / name)
                files[part][name] = {"size": (tmp / part / name).stat().st_size, "sha256": sha256_file(tmp / part / name)[0]}
        total = sum(f["size"] for part in files.values() for f in part.values())
        if total > MAX_ROUND_BYTES:
            raise ShippedError(f"round {round_no} is {total / 2**20:.1f} MiB; a shipped round may add at most "
                               f"{MAX_ROUND_BYTES / 2**20:.0f} MiB (lower --lora-r)")
        manifest = {"schema": SCHEMA, "base_model": model, "base_gguf_sha256": models.embedded(model).gguf_sha256,
                    "round": round_no, "policy": {"version": version, "files": files["policy"]},
                    "ppm": {"version": version, "files": files["ppm"]}, "bytes": total,
                    "eval": eval_results or {}, "reproduce": reproduce}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return read_round(dest)
