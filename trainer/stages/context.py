"""What every stage runs with: the store, the registry, local scratch, and the inputs (pool, dev set, models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rstar.config import home_dir
from rstar.registry import ModelRegistry
from rstar.store import NotFound, open_store
from trainer import data, publish
from trainer.stages.config import EvolveConfig


class StageError(RuntimeError):
    """A stage cannot run (missing input, bad configuration)."""


class Context:
    """Store, registry and local scratch of one process."""

    def __init__(self, cfg: EvolveConfig):
        self.cfg = cfg
        self.store = open_store(cfg.store_url or os.environ.get("RSTAR_STORE_URL") or None)
        self.registry = ModelRegistry(self.store)
        self.work = Path(cfg.work_dir) if cfg.work_dir else home_dir() / "evolve"
        self.work.mkdir(parents=True, exist_ok=True)

    # json objects
    def get_json(self, key: str) -> Any | None:
        try:
            return json.loads(self.store.get(key))
        except NotFound:
            return None

    def put_json(self, key: str, obj: Any) -> None:
        self.store.put(key, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    # inputs
    def dev_problems(self) -> list[dict[str, Any]]:
        if not self.cfg.dev:
            raise StageError("no dev set: pass --dev FILE.jsonl (env RSTAR_EVOLVE_DEV)")
        return data.load_problems(self.cfg.dev, limit=self.cfg.dev_limit)

    def pool_problems(self) -> list[dict[str, Any]]:
        if not self.cfg.pool:
            raise StageError("no problem pool: pass --pool FILE.jsonl (env RSTAR_EVOLVE_POOL)")
        left_out = [self.cfg.dev] + self.cfg.exclude.split(",")
        dev_ids = [p["id"] for f in left_out if f.strip() for p in data.load_problems(f.strip())]
        out: list[dict[str, Any]] = []
        for path in (p.strip() for p in self.cfg.pool.split(",")):
            if path:
                out += data.load_problems(path, limit=self.cfg.pool_limit, exclude_ids=dev_ids,
                                          offset=self.cfg.pool_offset)
        return out

    def base_model(self) -> Path:
        from rstar.models import resolve_model_dir

        return resolve_model_dir(self.cfg.base_model)

    def model_dir(self, name: str, version: str | None) -> Path:
        """A registry version's directory; `None`/base: the BASE model."""
        from rstar.models import base_version_of

        base = base_version_of(self.cfg.base_model)
        if version is None or (version == base and publish.existing(self.registry, name, version) is None):
            return self.base_model()
        return self.registry.fetch(name, version)


def stage_executor(ctx: Context):
    from trainer.execution import make_executor

    return make_executor(ctx.cfg.sandbox_address)
