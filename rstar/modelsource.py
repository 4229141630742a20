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

    def resolve(self) -> tuple[Path, str]:
        if self.store_url:
            return self._resolve_registry()
        model_dir = models.resolve_model_dir(self.model)
        version = self.version or (models.BASE_VERSION if self.model in ("", "default") else Path(model_dir).name)
        return model_dir, version

    def _resolve_registry(self) -> tuple[Path, str]:
        from rstar import registry as reg

        r = reg.Registry(self.store_url)
        current = r.current(self.name)
        if current is None:
            raise models.ModelError(
                f"no promoted {self.name} version in {self.store_url} (run `rstar models list --store {self.store_url}`)"
            )
        return Path(r.fetch(self.name, current)), current

    def watch(self, interval: float, on_new: Callable[[Path, str], None]) -> None:
        """Poll the registry's CURRENT and call `on_new(dir, version)` on a change."""
        if not self.store_url or interval <= 0:
            return
        from rstar import reload

        self._watcher = reload.start_watcher(self.store_url, self.name, interval, on_new)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
