"""Where a policy/PPM service gets its model: a directory, or the registry.

`model="default"` (or an embedded model's name, `rstar.models.EMBEDDED`) is an
embedded model, fetched and converted on first use; any other value is an HF
model directory. With a `store_url`, the
service follows the registry instead (`models/<name>/CURRENT`) and, with a
reload interval, hands each promoted version to a `load(version, dir)`
callback (`ModelWatcher`; the services pass `ModelSlot.loader(build)`).

Not here: building or swapping models (`rstar.reload.ModelSlot` and the
service's `build`), the served-version metric (the slot keeps it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from rstar import models

log = logging.getLogger(__name__)


class ModelSource:
    def __init__(self, name: str, model: str, version: str = "", store_url: str = ""):
        self.name = name
        self.model = model
        self.version = version
        self.store_url = store_url
        self._watcher = None
        self._registry = None

    def resolve(self) -> tuple[Path, str]:
        if self.store_url:
            return self._resolve_registry()
        from rstar import evolved

        model_dir, version = evolved.resolve(self.model, self.name)
        return model_dir, self.version or version

    def registry(self):
        from rstar.registry import ModelRegistry
        from rstar.store import open_store

        if self._registry is None:
            self._registry = ModelRegistry(open_store(self.store_url))
        return self._registry

    def _resolve_registry(self) -> tuple[Path, str]:
        from rstar import evolved
        from rstar.registry import register_base_version

        reg = self.registry()
        current = reg.current(self.name)
        shipped = evolved.for_spec(self.model) if models.is_embedded(self.model) else None
        if current is None and models.is_embedded(self.model):
            # an embedded model: register its converted checkpoint as the base version (promoted
            # unless an evolved round ships with it, which is promoted instead)
            model = models.embedded(self.model)
            log.info("registering %s as %s/%s in %s", model.name, self.name, model.base_version, self.store_url)
            register_base_version(reg, self.name, models.ensure_model(model.name), model.base_version,
                                  {"source": model.source, "model": model.name, "round": 0,
                                   "eval": shipped.eval_of(model.base_version) if shipped else {}},
                                  promote_if_unset=shipped is None)
        if shipped is not None:
            evolved.register(reg, shipped, (self.name,))
        current = reg.current(self.name)
        if current is None:
            raise models.ModelError(
                f"no promoted {self.name} version in {self.store_url} (see `rstar models list --store {self.store_url}`)"
            )
        self.version = current
        return Path(reg.fetch(self.name, current)), current

    def watch(self, interval: float, load: Callable[[str, Path], None]) -> None:
        """Poll the registry's CURRENT and call `load(version, local_dir)` when it moves (hot reload);
        without a store or with interval <= 0 there is nothing to follow."""
        if not self.store_url or interval <= 0:
            return
        from rstar.reload import ModelWatcher

        self._watcher = ModelWatcher(self.registry(), self.name, load, service=self.name, interval_s=interval)
        self._watcher.version = self.version  # already serving it
        self._watcher.start()
        log.info("%s: following %s/models/%s/CURRENT every %.0f s", self.name, self.store_url, self.name, interval)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
