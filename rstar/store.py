"""Object store: one interface, a local-directory backend (embedded default).

Keys are `/`-separated paths (`trajectories/round-1/shard-0001.jsonl.gz`).
`put` is atomic: data goes to a temporary file in the same directory and is
renamed into place, so a reader never sees half an object.
(The S3/MinIO backend is added by issue 5 behind the same interface.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rstar.config import home_dir


class NotFound(KeyError):
    """No object under that key."""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise NotFound(key) from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (string prefix match), sorted; temp files excluded."""
        if not self.root.exists():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)


def open_store(url: str | None = None) -> LocalStore:
    """`file:///path` or a plain path; default `$RSTAR_HOME/store`."""
    if not url:
        return LocalStore(home_dir() / "store")
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if "://" in url:
        raise ValueError(f"unsupported object store URL {url!r} (use file:// or a path)")
    return LocalStore(url)
