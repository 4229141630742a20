"""Model registry: immutable model versions in the object store, a promoted pointer per name.

Layout under the store (one prefix, default `models/`):

    models/<name>/<version>/<files>          HF-format files, uploaded first
    models/<name>/<version>/manifest.json    written LAST: the version's commit marker
    models/<name>/CURRENT                    JSON naming the promoted version
    models/<name>/history/<ns>-<id>.json     one record per promote/rollback (append-only)

A version without a manifest is incomplete (an upload that died or is still
running): it is listed as such, never promoted and never fetched. The manifest
lists every file with its size and sha256; promotion re-hashes the stored files
and fetch hashes while downloading, so a corrupted object is refused too.
`fetch` downloads into a temp directory under the cache and renames it into
`<cache>/<name>/<version>` only once every file is verified: a crash, a full
disk or a bad hash never leaves a directory that looks loadable.

Pointer writes are single-object PUTs (atomic in both backends), so concurrent
promotions resolve to last-writer-wins and never a torn pointer. The history is
one object per event, so concurrent promoters never overwrite each other's
records. What this module does not do: load models (services do, see
rstar/reload.py) or garbage-collect old versions.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rstar.config import home_dir
from rstar.store import NotFound, ObjectStore, StoreFull, StoreUnavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "history"
CACHE_MARKER = ".rstar-verified"  # in a cached version dir: digest of the manifest it was verified against
CACHE_MANIFEST = ".rstar-manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = {CURRENT, HISTORY}
_HASH_CHUNK = 1 << 20


class RegistryError(RuntimeError):
    """A registry operation cannot be done (the message says why)."""


class VersionNotFound(RegistryError):
    """No such model name or version."""


class IncompleteVersion(RegistryError):
    """The version has no manifest, or a listed file is missing."""


class IntegrityError(RegistryError):
    """A file does not match the size or sha256 its manifest records."""


class UnsafePath(IntegrityError):
    """A manifest (or a directory being published) names a file path that is not a plain relative
    path inside the version: absolute, `..`, empty parts, NUL or control characters, a reserved name.
    Refused before anything is created, uploaded or deleted; the version can never be fetched."""


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in _RESERVED:
        raise ValueError(f"invalid model {kind} {value!r}: use letters, digits, '.', '_', '-' "
                         f"(not {sorted(_RESERVED)})")
    return value


_RESERVED_FILES = {"manifest.json", ".rstar-verified", ".rstar-manifest.json"}  # MANIFEST, CACHE_*


def check_file_path(path: Any, where: str = "manifest") -> str:
    """A version's file path: relative, `/`-separated, every part a plain name. Raises UnsafePath.

    Checked before any filesystem or store effect, on both sides: `publish` (the local files)
    and every manifest read (`Manifest.from_json`, so `fetch`, `verify`, `promote` and the
    cache check never join an unchecked path onto a directory)."""
    problem = None
    if not isinstance(path, str) or not path:
        problem = "an empty or non-string path"
    elif any(ord(c) < 32 or c in "\x7f\\" for c in path):
        problem = "NUL, a control character or a backslash"
    elif path.startswith("/"):
        problem = "an absolute path"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "an empty, '.' or '..' path component"
    elif any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.split("/")):
        problem = "a path component longer than 255 bytes"
    elif path in _RESERVED_FILES:
        problem = "a name the registry reserves"
    if problem:
        raise UnsafePath(f"{where} lists the file path {path!r}: {problem}; refusing it")
    return path


def check_file_paths(paths: list[Any], where: str = "manifest") -> None:
    """Every path valid, no duplicates, no file that is also another file's directory."""
    seen: set[str] = set()
    for path in paths:
        check_file_path(path, where)
        if path in seen:
            raise UnsafePath(f"{where} lists the file path {path!r} twice; refusing it")
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UnsafePath(f"{where} lists both {'/'.join(parts[:i])!r} and {path!r} (a file used as a "
                                 "directory); refusing it")


def sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _now() -> tuple[str, float]:
    t = time.time()
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds"), t


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, `/`-separated
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    version: str
    files: list[FileEntry]
    created_at: str
    created_unix: float
    parent: str | None = None
    round: int | None = None
    data: Any = None  # what the version was trained on (shards, problem pools, counts)
    eval: Any = None  # evaluation results
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return json.dumps(d, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        d = json.loads(raw)
        if d.get("schema_version", 0) > SCHEMA_VERSION:
            raise RegistryError(f"manifest schema {d['schema_version']} is newer than this code ({SCHEMA_VERSION})")
        d.pop("total_bytes", None)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        label = f"the manifest of {d.get('name')!s}/{d.get('version')!s}"
        check_file_paths([f.path for f in d["files"]], label)
        for f in d["files"]:
            if not isinstance(f.size, int) or f.size < 0 or not isinstance(f.sha256, str):
                raise ValueError(f"{label}: bad size or sha256 for {f.path!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    complete: bool
    current: bool
    created_at: str | None = None
    total_bytes: int | None = None
    parent: str | None = None
    round: int | None = None
    eval: dict[str, Any] | None = None   # the evaluation results recorded in the manifest's metadata


def local_files(local_dir: Path) -> list[Path]:
    """Files of a model directory to publish: everything except hidden files (temp files, markers)."""
    out = []
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return out


class ModelRegistry:
    def __init__(self, store: ObjectStore, cache_dir: str | Path | None = None, prefix: str = "models"):
        self.store = store
        self.prefix = prefix.strip("/")
        self.cache_dir = Path(cache_dir) if cache_dir else home_dir() / "cache" / "models"

    # -- keys ---------------------------------------------------------------

    def _key(self, name: str, *parts: str) -> str:
        return "/".join([self.prefix, check_name("name", name), *parts])

    def _vkey(self, name: str, version: str, *parts: str) -> str:
        return self._key(name, check_name("version", version), *parts)

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        keys = self.store.list(self.prefix + "/")
        return sorted({k.split("/")[1] for k in keys if k.count("/") >= 2})

    def versions(self, name: str) -> list[VersionInfo]:
        """All versions of `name` (complete or not), oldest first."""
        keys = self.store.list(self._key(name) + "/")
        found: dict[str, bool] = {}
        for k in keys:
            parts = k.split("/")
            if len(parts) < 4 or parts[2] in _RESERVED:
                continue
            found.setdefault(parts[2], False)
            if len(parts) == 4 and parts[3] == MANIFEST:
                found[parts[2]] = True
        current = self.current(name)
        out = []
        for v, complete in found.items():
            if complete:
                try:
                    m = self.manifest(name, v)
                except (IncompleteVersion, RegistryError, ValueError) as e:
                    log.warning("unreadable manifest for %s/%s: %s", name, v, e)
                    out.append(VersionInfo(name, v, False, v == current))
                    continue
                results = (m.metadata or {}).get("eval")
                out.append(VersionInfo(name, v, True, v == current, m.created_at, m.total_bytes, m.parent, m.round,
                                       results if isinstance(results, dict) else None))
            else:
                out.append(VersionInfo(name, v, False, v == current))
        return sorted(out, key=lambda i: (i.created_at or "9999", i.version))

    def manifest(self, name: str, version: str) -> Manifest:
        try:
            raw = self.store.get(self._vkey(name, version, MANIFEST))
        except NotFound:
            if self.store.list(self._vkey(name, version) + "/"):
                raise IncompleteVersion(
                    f"{name}/{version} has no {MANIFEST}: its upload did not finish (or is still running)"
                ) from None
            raise VersionNotFound(f"no version {version!r} of model {name!r} in {self.store.url}") from None
        try:
            m = Manifest.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise IncompleteVersion(f"{name}/{version}: {MANIFEST} is unreadable: {e}") from e
        if m.name != name or m.version != version:
            raise IntegrityError(f"{name}/{version}: manifest describes {m.name}/{m.version}")
        return m

    def verify(self, name: str, version: str, deep: bool = True) -> Manifest:
        """Check a stored version: manifest present, every file present with the right size,
        and (deep) the right sha256. Raises IncompleteVersion or IntegrityError."""
        m = self.manifest(name, version)
        for f in m.files:
            key = self._vkey(name, version, f.path)
            try:
                info = self.store.stat(key)
            except NotFound:
                raise IncompleteVersion(f"{name}/{version}: file {f.path} listed in the manifest is missing") from None
            if info.size != f.size:
                raise IntegrityError(f"{name}/{version}: {f.path} is {info.size} bytes, manifest says {f.size}")
            if deep:
                h = hashlib.sha256()
                with self.store.open_read(key) as src:
                    while chunk := src.read(_HASH_CHUNK):
                        h.update(chunk)
                if h.hexdigest() != f.sha256:
                    raise IntegrityError(f"{name}/{version}: {f.path} sha256 {h.hexdigest()[:12]}… "
                                         f"does not match the manifest ({f.sha256[:12]}…)")
        return m

    def current(self, name: str) -> str | None:
        pointer = self.current_pointer(name)
        return pointer["version"] if pointer else None

    def current_pointer(self, name: str) -> dict[str, Any] | None:
        try:
            raw = self.store.get(self._key(name, CURRENT))
        except NotFound:
            return None
        text = raw.decode("utf-8", errors="replace").strip()
        if text.startswith("{"):
            try:
                d = json.loads(text)
                version = d["version"]
            except (ValueError, KeyError) as e:
                raise RegistryError(f"{name}/{CURRENT} is unreadable: {e}") from e
        else:  # a hand-written pointer (`echo v3 > CURRENT`) is accepted too
            d, version = {"version": text}, text
        check_name("version", version)
        return d

    def history(self, name: str) -> list[dict[str, Any]]:
        """Promotion records, oldest first."""
        out = []
        for key in self.store.list(self._key(name, HISTORY) + "/"):
            try:
                out.append(json.loads(self.store.get(key)))
            except (NotFound, ValueError) as e:
                log.warning("skipping unreadable history record %s: %s", key, e)
        return out

    # -- writing --------------------------------------------------------------

    def publish(self, name: str, local_dir: str | Path, version: str | None = None, *,
                parent: str | None = None, round: int | None = None, data: Any = None, eval: Any = None,
                metadata: dict[str, Any] | None = None) -> Manifest:
        """Upload a model directory as a new immutable version; the manifest goes last."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise RegistryError(f"{local_dir} is not a directory")
        version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        check_name("name", name), check_name("version", version)
        if self.store.exists(self._vkey(name, version, MANIFEST)):
            raise RegistryError(f"{name}/{version} already exists (versions are immutable; pick a new name)")
        files = local_files(local_dir)
        if not files:
            raise RegistryError(f"{local_dir} has no files to publish")
        rels = [path.relative_to(local_dir).as_posix() for path in files]
        if MANIFEST in rels:
            raise RegistryError(f"{local_dir} contains a file named {MANIFEST}, which the registry reserves")
        check_file_paths(rels, str(local_dir))  # before any store effect (deleting stale objects, uploads)
        stale = self.store.list(self._vkey(name, version) + "/")
        if stale:
            log.warning("%s/%s: removing %d objects of an earlier unfinished upload", name, version, len(stale))
            for key in stale:
                self.store.delete(key)
        entries = []
        t0 = time.monotonic()
        for path, rel in zip(files, rels):
            digest, size = sha256_file(path)
            self.store.put_file(self._vkey(name, version, rel), path)
            entries.append(FileEntry(rel, size, digest))
        created_at, created_unix = _now()
        m = Manifest(name, version, entries, created_at, created_unix, parent=parent, round=round,
                     data=data, eval=eval, metadata=dict(metadata or {}))
        self.store.put(self._vkey(name, version, MANIFEST), m.to_json())  # the commit point
        log.info("published %s/%s: %d files, %.1f MB in %.1fs to %s", name, version, len(entries),
                 m.total_bytes / 1e6, time.monotonic() - t0, self.store.url)
        return m

    def _record(self, name: str, action: str, version: str, previous: str | None, reason: str) -> dict[str, Any]:
        at, at_unix = _now()
        rec = {"schema_version": SCHEMA_VERSION, "id": uuid.uuid4().hex, "action": action, "name": name,
               "version": version, "previous": previous, "at": at, "at_unix": at_unix,
               "actor": _actor(), "reason": reason}
        # history first (intent), pointer second: a crash in between leaves a record that
        # `rollback` recognises as never applied (see _promotion_stack)
        self.store.put(self._key(name, HISTORY, f"{time.time_ns():020d}-{rec['id'][:8]}.json"),
                       json.dumps(rec, sort_keys=True).encode())
        pointer = {"schema_version": SCHEMA_VERSION, "version": version, "promoted_at": at,
                   "promotion_id": rec["id"], "action": action}
        self.store.put(self._key(name, CURRENT), json.dumps(pointer, sort_keys=True).encode())
        log.info("%s %s: %s -> %s", action, name, previous, version)
        return rec

    def promote(self, name: str, version: str, *, deep: bool = True, reason: str = "") -> dict[str, Any]:
        """Point CURRENT at a verified version. Refuses incomplete or corrupted versions."""
        self.verify(name, version, deep=deep)
        return self._record(name, "promote", version, self.current(name), reason)

    def _promotion_stack(self, name: str) -> list[str]:
        """Replay the history: each record first trims the stack back to the version that was
        CURRENT when it was written (dropping records that never took effect), then a promote
        pushes its version and a rollback pops back to its target."""
        stack: list[str] = []
        for rec in self.history(name):
            prev, version = rec.get("previous"), rec.get("version")
            if prev in stack:
                _trim_after_last(stack, prev)
            if rec.get("action") == "rollback":
                if stack and stack[-1] == prev:
                    stack.pop()
                if not stack or stack[-1] != version:
                    stack.append(version)
            elif not stack or stack[-1] != version:
                stack.append(version)
        return stack

    def rollback(self, name: str, *, deep: bool = True, reason: str = "") -> dict[str, Any]:
        """Point CURRENT back at the version promoted before the current one.

        The promotion history is replayed as a stack (promote pushes, rollback pops),
        so A→B→C, rollback, rollback ends at A. CURRENT is the truth: history entries
        above it (a promoter that crashed between its record and its pointer, or lost
        a concurrent race) are ignored.
        """
        current = self.current(name)
        if current is None:
            raise RegistryError(f"model {name!r} has no CURRENT version to roll back from")
        stack = self._promotion_stack(name)
        if current in stack:
            _trim_after_last(stack, current)
        else:  # lost race: use what the records that set this pointer say came before
            recs = [r for r in self.history(name) if r.get("version") == current
                    and r.get("previous") and r.get("previous") != current]
            stack = [recs[-1]["previous"], current] if recs else []
        # a concurrent promoter may have re-promoted the version that was already CURRENT:
        # roll back to the nearest earlier version that differs from it
        earlier = [v for v in reversed(stack[:-1]) if v != current]
        if not earlier:
            raise RegistryError(f"model {name!r}: no earlier promoted version to roll back to from {current!r}")
        target = earlier[0]
        self.verify(name, target, deep=deep)
        return self._record(name, "rollback", target, current, reason)

    def delete_version(self, name: str, version: str) -> int:
        """Remove a version (manifest first, so it turns incomplete before its files go). Refuses CURRENT."""
        if self.current(name) == version:
            raise RegistryError(f"{name}/{version} is CURRENT; promote another version first")
        keys = self.store.list(self._vkey(name, version) + "/")
        manifest_key = self._vkey(name, version, MANIFEST)
        if manifest_key in keys:
            self.store.delete(manifest_key)
        for key in keys:
            if key != manifest_key:
                self.store.delete(key)
        return len(keys)

    # -- fetching -------------------------------------------------------------

    def cached_path(self, name: str, version: str) -> Path:
        return self.cache_dir / check_name("name", name) / check_name("version", version)

    def _cache_valid(self, path: Path, manifest_digest: str | None) -> bool:
        try:
            marker = (path / CACHE_MARKER).read_text().strip()
            m = Manifest.from_json((path / CACHE_MANIFEST).read_bytes())
        except (OSError, ValueError, KeyError, TypeError, RegistryError):
            return False
        if manifest_digest is not None and marker != manifest_digest:
            return False
        for f in m.files:
            p = path / f.path
            if not p.is_file() or p.stat().st_size != f.size:
                return False
        return True

    def fetch(self, name: str, version: str | None = None) -> Path:
        """Download a version (default: CURRENT) into the local cache, verified; returns its directory.

        A cached copy verified against the same manifest is reused (across restarts) without
        downloading; if the store is unreachable, a verified cached copy is used as is.
        """
        if version is None:
            version = self.current(name)
            if version is None:
                raise VersionNotFound(f"model {name!r} has no CURRENT version in {self.store.url}")
        final = self.cached_path(name, version)
        try:
            raw = self.store.get(self._vkey(name, version, MANIFEST))
        except NotFound:
            self.manifest(name, version)  # raises IncompleteVersion or VersionNotFound
            raise
        except StoreUnavailable:
            if self._cache_valid(final, None):
                log.warning("store unreachable; using cached %s/%s at %s", name, version, final)
                return final
            raise
        digest = hashlib.sha256(raw).hexdigest()
        if self._cache_valid(final, digest):
            return final
        try:
            m = Manifest.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise IncompleteVersion(f"{name}/{version}: {MANIFEST} is unreadable: {e}") from e
        if m.name != name or m.version != version:
            raise IntegrityError(f"{name}/{version}: manifest describes {m.name}/{m.version}")
        return self._download(m, raw, digest, final)

    def _download(self, m: Manifest, raw: bytes, digest: str, final: Path) -> Path:
        check_file_paths([f.path for f in m.files], f"the manifest of {m.name}/{m.version}")  # before any mkdir
        final.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(final.parent).free
        if free < m.total_bytes:
            raise StoreFull(f"cache {final.parent} has {free / 1e6:.1f} MB free; "
                            f"{m.name}/{m.version} needs {m.total_bytes / 1e6:.1f} MB")
        tmp = final.parent / f".tmp-{m.version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        t0 = time.monotonic()
        try:
            for f in m.files:
                self._download_file(m, f, tmp / f.path)
            (tmp / CACHE_MANIFEST).write_bytes(raw)
            (tmp / CACHE_MARKER).write_text(digest + "\n")
            _fsync_dir(tmp)
            self._install(tmp, final, digest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == 28:  # ENOSPC
                raise StoreFull(f"no space left in {final.parent} while fetching {m.name}/{m.version} "
                                f"({m.total_bytes / 1e6:.1f} MB)") from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("fetched %s/%s (%.1f MB) in %.1fs into %s", m.name, m.version, m.total_bytes / 1e6,
                 time.monotonic() - t0, final)
        return final

    def _download_file(self, m: Manifest, f: FileEntry, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with self.store.open_read(self._vkey(m.name, m.version, f.path)) as src, open(dest, "wb") as out:
                while chunk := src.read(_HASH_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except NotFound:
            raise IncompleteVersion(f"{m.name}/{m.version}: file {f.path} listed in the manifest is missing") from None
        if size != f.size or h.hexdigest() != f.sha256:
            raise IntegrityError(f"{m.name}/{m.version}: downloaded {f.path} ({size} bytes, sha256 "
                                 f"{h.hexdigest()[:12]}…) does not match the manifest ({f.size} bytes, "
                                 f"{f.sha256[:12]}…); refusing it")

    def _install(self, tmp: Path, final: Path, digest: str) -> None:
        """Rename the verified temp dir into place; a concurrent fetcher may have won the race."""
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if self._cache_valid(final, digest):
                shutil.rmtree(tmp, ignore_errors=True)
                return
        trash = final.parent / f".tmp-trash-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, trash)  # an invalid leftover: move it aside, then retry
        except FileNotFoundError:
            pass
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)


def _trim_after_last(stack: list[str], value: str) -> None:
    """Drop everything above the last occurrence of `value`."""
    del stack[len(stack) - stack[::-1].index(value):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register_base_version(registry: ModelRegistry, name: str, local_dir: str | Path, version: str,
                          metadata: dict[str, Any] | None = None, *, promote_if_unset: bool = True) -> Manifest:
    """Publish `local_dir` as `name/version` unless it is already there; idempotent.

    If the version exists with the same files (sizes and sha256), nothing is uploaded; if it
    exists with different content, RegistryError. With `promote_if_unset`, the version is
    promoted when `name` has no CURRENT yet (the embedded default's first start).
    """
    local_dir = Path(local_dir)
    try:
        m = registry.manifest(name, version)
    except VersionNotFound:
        m = None
    except IncompleteVersion:
        log.warning("%s/%s is incomplete in the store; publishing it again", name, version)
        m = None
    if m is None:
        m = registry.publish(name, local_dir, version, metadata=metadata)
    else:
        expected = {f.path: (f.size, f.sha256) for f in m.files}
        actual = {}
        for p in local_files(local_dir):
            digest, size = sha256_file(p)
            actual[p.relative_to(local_dir).as_posix()] = (size, digest)
        if expected != actual:
            raise RegistryError(f"{name}/{version} already exists in {registry.store.url} with different "
                                f"files than {local_dir}; publish under a new version name")
    if promote_if_unset and registry.current(name) is None:
        registry.promote(name, version, deep=False, reason="base version registered")
    return m
