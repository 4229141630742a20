"""Object store: one interface, two backends (local directory, S3 via `minio`).

Keys are `/`-separated paths (`trajectories/round-1/shard-0001.jsonl.gz`).
Both backends give the same guarantees, and the same test suite runs against
both (`tests/test_store.py`):

- `put`/`put_file` are atomic for readers: an object appears whole or not at
  all (local: temp file + fsync + rename; S3: a single PUT or a multipart
  upload, both invisible until complete). A failed write leaves nothing.
- Reads stream (`open_read`, `get_file`), so a multi-GB checkpoint never sits
  in memory; `get_file` writes to a temp file and renames it into place.
- Multi-object "commits" are the caller's job: write the parts, then a small
  marker object last (the model registry's `manifest.json`). Nothing here
  offers transactions across keys.
- `put(key, data, create_only=True)` never replaces an object: it raises
  `AlreadyExists` when the key is taken. Local: the temp file is hard-linked
  into place, which fails atomically if the name exists. S3: a stat first, then
  a PUT with `If-None-Match: *`; servers that honour it (AWS S3, current MinIO)
  make it atomic, servers that ignore it (the JuiceFS gateway of the tests)
  still refuse any write that starts after the first one has finished, but two
  writes racing inside one round trip can both succeed (the last one wins).
- S3 calls retry transient failures (connection refused/reset, timeouts, 5xx,
  SlowDown) with exponential backoff, then raise `StoreUnavailable` naming
  the endpoint, instead of a urllib3 traceback.

What this module does not do: versioning, locking, or caching. `s3://` URLs
take endpoint and credentials from the environment (`S3Config`, env prefix
`RSTAR_S3_`); see docs/storage.md.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator, Protocol, TypeVar, runtime_checkable

from rstar.config import build, field, home_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # streaming copy buffer
T = TypeVar("T")


class StoreError(RuntimeError):
    """An object-store operation failed for a reason other than a missing key."""


class NotFound(KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return f"no object {self.args[0]!r}" if self.args else "not found"


class StoreUnavailable(StoreError):
    """The storage backend cannot be reached (after retries)."""


class _StreamBroken(StoreUnavailable):
    """A streaming read broke off mid-body (retried by whole-object operations)."""


class StoreFull(StoreError):
    """No space left where the data was being written."""


class AlreadyExists(StoreError):
    """A create-only write found an object under its key; nothing was written."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # unix seconds
    etag: str = ""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """What every backend offers (see the module docstring for the guarantees)."""

    @property
    def url(self) -> str: ...

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: str | Path) -> int: ...
    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None], create_only: bool = False) -> None:
    """Write via a temp file in the target directory, fsync, rename (or, create-only, link) into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if create_only:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise StoreFull(f"no space left writing {path}") from e
        raise


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished temp file its name only if that name is free (then drop the temp name).

    link(2) fails with EEXIST instead of replacing, so two creators cannot both
    win. A filesystem without hard links falls back to check-then-rename, which
    a creator racing in between can still overwrite.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists (create-only write)") from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if path.exists():
            raise AlreadyExists(f"{path} already exists (create-only write)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _copy_stream(src: IO[bytes], dst: IO[bytes], on_chunk: Callable[[bytes], None] | None = None) -> int:
    total = 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            return total
        if on_chunk:
            on_chunk(chunk)
        dst.write(chunk)
        total += len(chunk)


def _open_for_upload(path: Path) -> BinaryIO:
    """Open a local file to upload (a seam: fault tests wrap the reader)."""
    return open(path, "rb")


# --------------------------------------------------------------------------- local


class LocalStore:
    """A directory tree; each key is a file. Temp files start with `.tmp-`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        try:
            _write_atomically(path, lambda f: f.write(data), create_only=create_only)
        except OSError as e:   # unwritable directory, I/O error: a store fault like S3's, not a crash
            raise StoreError(f"cannot write {key!r} under {self.root}: {e}") from e

    def put_file(self, key: str, path: str | Path) -> None:
        with _open_for_upload(Path(path)) as src:
            _write_atomically(self._path(key), lambda f: _copy_stream(src, f))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound(key) from e

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound(key) from e
        with f:
            yield f

    def get_file(self, key: str, path: str | Path) -> int:
        with self.open_read(key) as src:
            return _download_to(src, Path(path))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise NotFound(key) from e
        if not path.is_file():
            raise NotFound(key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        # prune now-empty parent directories so `list` stays cheap
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (string prefix match), sorted; temp files excluded."""
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)


def _download_to(src: IO[bytes], path: Path, on_chunk: Callable[[bytes], None] | None = None) -> int:
    size = 0

    def write(f: IO[bytes]) -> None:
        nonlocal size
        size = _copy_stream(src, f, on_chunk)

    _write_atomically(path, write)
    return size


# --------------------------------------------------------------------------- S3


@dataclass
class S3Config:
    """Connection settings for `s3://bucket/prefix` stores (env prefix RSTAR_S3_)."""

    endpoint: str = field("127.0.0.1:9000", "S3 endpoint host:port (an http:// or https:// scheme sets `secure`)")
    access_key: str = field("", "access key (MinIO root user or a service account)")
    secret_key: str = field("", "secret key")
    secure: bool = field(False, "use TLS")
    region: str = field("", "region name; empty lets the client discover it")
    ca_bundle: str = field("", "PEM file of CA certificates to trust for TLS (default: system/certifi)")
    verify_tls: bool = field(True, "verify the server certificate (turn off only for tests)")
    create_bucket: bool = field(True, "create the bucket on first write if it does not exist")
    retries: int = field(4, "attempts per operation on transient errors (connection, timeout, 5xx)")
    backoff_s: float = field(0.25, "first retry delay; doubles each attempt (with jitter)")
    connect_timeout_s: float = field(5.0, "TCP connect timeout")
    read_timeout_s: float = field(120.0, "socket read timeout")
    part_size_mb: int = field(16, "multipart part size for large uploads (MiB, >= 5)")
    parallel_uploads: int = field(3, "parts uploaded in parallel per file")

    def validate(self) -> None:
        if self.part_size_mb < 5:
            raise ValueError("RSTAR_S3_PART_SIZE_MB must be at least 5 (S3 minimum part size)")
        if self.retries < 1:
            raise ValueError("RSTAR_S3_RETRIES must be at least 1")


_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy",
    "XMinioServerNotInitialized", "OperationTimedOut",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
_TAKEN_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}  # If-None-Match: * refused


class S3Store:
    """Objects under `prefix` in one bucket of an S3 server, through the `minio` client."""

    def __init__(self, bucket: str, prefix: str = "", config: S3Config | None = None):
        import urllib3
        from minio import Minio

        self.config = config or build(S3Config, "S3")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint, secure = self.config.endpoint, self.config.secure
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
            secure = scheme == "https"
        self.endpoint = endpoint.rstrip("/")
        self.secure = secure
        pool_kw: dict[str, Any] = {
            "timeout": urllib3.Timeout(connect=self.config.connect_timeout_s, read=self.config.read_timeout_s),
            "maxsize": 16,
            "retries": False,  # we retry whole operations ourselves, with a clear error at the end
        }
        if secure:
            pool_kw["cert_reqs"] = "CERT_REQUIRED" if self.config.verify_tls else "CERT_NONE"
            if self.config.ca_bundle:
                pool_kw["ca_certs"] = self.config.ca_bundle
        self._client = Minio(
            self.endpoint,
            access_key=self.config.access_key or None,
            secret_key=self.config.secret_key or None,
            secure=secure,
            region=self.config.region or None,
            http_client=urllib3.PoolManager(**pool_kw),
        )
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _name(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix else name

    # -- retries -------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        """Run `fn`, retrying transient failures; map errors to this module's exceptions."""
        import urllib3.exceptions
        from minio.error import InvalidResponseError, S3Error, ServerError

        delay = self.config.backoff_s
        last: BaseException | None = None
        for attempt in range(1, self.config.retries + 1):
            try:
                return fn()
            except S3Error as e:
                if e.code in _MISSING_CODES:
                    raise NotFound(key or what) from e
                if e.code in _TAKEN_CODES:
                    raise AlreadyExists(f"{self.url}/{key or what} already exists (create-only write)") from e
                if e.code not in _TRANSIENT_CODES:
                    raise StoreError(f"S3 {what} on {self.url} failed: {e.code}: {e.message}") from e
                last = e
            except (ServerError, InvalidResponseError) as e:
                status = getattr(e, "_status_code", None) or getattr(e, "status_code", None)
                if isinstance(status, int) and 400 <= status < 500:
                    raise StoreError(f"S3 {what} on {self.url} failed: {e}") from e
                last = e
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, _StreamBroken) as e:
                last = e
            if attempt < self.config.retries:
                sleep = delay * (1 + random.random() * 0.25)
                log.warning("S3 %s on %s: %s (attempt %d/%d, retrying in %.2fs)", what, self.endpoint,
                            _short(last), attempt, self.config.retries, sleep)
                time.sleep(sleep)
                delay *= 2
        raise StoreUnavailable(
            f"S3 server at {'https' if self.secure else 'http'}://{self.endpoint} unavailable for {what} "
            f"({self.config.retries} attempts): {_short(last)}"
        ) from last

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        with self._bucket_lock:
            if self._bucket_checked:
                return
            if not self._call("bucket_exists", lambda: self._client.bucket_exists(self.bucket)):
                if not self.config.create_bucket:
                    raise StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
                from minio.error import S3Error

                def make() -> None:
                    try:
                        self._client.make_bucket(self.bucket)
                    except S3Error as e:
                        if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise

                self._call("make_bucket", make)
                log.info("created bucket %s at %s", self.bucket, self.endpoint)
            self._bucket_checked = True

    # -- interface -------------------------------------------------------------

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        name = self._name(key)
        self._ensure_bucket()
        if not create_only:
            self._call("put " + key, lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(data), len(data)))
            return
        # The stat refuses every write that starts after an earlier one finished, on any
        # server; If-None-Match closes the remaining race where the server honours it
        # (put_object would turn the header into x-amz-meta-, hence the raw call).
        if self.exists(key):
            raise AlreadyExists(f"{self.url}/{key} already exists (create-only write)")
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream"}
        self._call("create " + key, lambda: self._client._put_object(self.bucket, name, data, headers=headers), key)

    def put_file(self, key: str, path: str | Path) -> None:
        """Stream a local file up (multipart above `part_size_mb`); retried from the start."""
        name, path = self._name(key), Path(path)
        size = path.stat().st_size
        self._ensure_bucket()

        def upload() -> None:
            with _open_for_upload(path) as src:
                self._client.put_object(
                    self.bucket, name, src, size,
                    part_size=self.config.part_size_mb << 20,
                    num_parallel_uploads=self.config.parallel_uploads,
                )

        self._call("put_file " + key, upload)

    def get(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        name = self._name(key)
        resp = self._call("get " + key, lambda: self._client.get_object(self.bucket, name), key)
        try:
            yield _ResponseReader(resp, self, key)  # type: ignore[misc]
        finally:
            resp.close()
            resp.release_conn()

    def get_file(self, key: str, path: str | Path) -> int:
        """Stream an object into `path` (temp file + rename); retried from the start."""

        def download() -> int:
            with self.open_read(key) as src:
                return _download_to(src, Path(path))

        return self._call("get_file " + key, download, key)

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        st = self._call("stat " + key, lambda: self._client.stat_object(self.bucket, name), key)
        mtime = st.last_modified.timestamp() if st.last_modified else 0.0
        return ObjectInfo(key, int(st.size or 0), mtime, (st.etag or "").strip('"'))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except NotFound:
            return False

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._call("delete " + key, lambda: self._client.remove_object(self.bucket, name), key)
        except NotFound:
            pass

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (string prefix match), sorted."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix

        def listing() -> list[str]:
            return [o.object_name for o in self._client.list_objects(self.bucket, prefix=full, recursive=True)
                    if o.object_name and not o.is_dir]

        try:
            names = self._call("list " + (prefix or "/"), listing)
        except NotFound:  # no bucket yet: nothing stored
            return []
        return sorted(self._key(n) for n in names)


class _ResponseReader(io.RawIOBase):
    """A read-only stream over an HTTP response body; network errors become StoreUnavailable."""

    def __init__(self, resp: Any, store: S3Store, key: str):
        self._resp, self._store, self._key = resp, store, key

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        import urllib3.exceptions

        try:
            return self._resp.read() if n is None or n < 0 else self._resp.read(n)
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            raise _StreamBroken(f"S3 read of {self._key!r} from {self._store.endpoint} broke off: {_short(e)}") from e

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _short(e: BaseException | None) -> str:
    text = str(e) if e is not None else "unknown error"
    reason = getattr(e, "reason", None)
    if reason is not None:
        text = str(reason)
    return text if len(text) < 300 else text[:300] + "..."


# --------------------------------------------------------------------------- helpers


def copy_object(src: ObjectStore, dst: ObjectStore, key: str, dst_key: str | None = None) -> None:
    """Copy one object between stores (streams through a temp file)."""
    with tempfile.TemporaryDirectory(prefix="rstar-copy-") as tmp:
        path = Path(tmp) / "obj"
        src.get_file(key, path)
        dst.put_file(dst_key or key, path)


def open_store(url: str | None = None, s3_config: S3Config | None = None) -> LocalStore | S3Store:
    """Open a store by URL.

    - `s3://bucket[/prefix]`: S3/MinIO, endpoint and credentials from `s3_config`
      or the environment (`RSTAR_S3_ENDPOINT`, `RSTAR_S3_ACCESS_KEY`, ...);
    - `file:///path` or a plain path: a local directory;
    - empty/None: `$RSTAR_STORE_URL` if set, else `$RSTAR_HOME/store`.
    """
    if not url:
        url = os.environ.get("RSTAR_STORE_URL", "")
    if not url:
        return LocalStore(home_dir() / "store")
    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"object store URL {url!r} names no bucket (use s3://bucket/prefix)")
        return S3Store(bucket, prefix, s3_config)
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if "://" in url:
        raise ValueError(f"unsupported object store URL {url!r} (use s3://bucket/prefix, file:///path or a path)")
    return LocalStore(url)


__all__ = [
    "NotFound", "StoreError", "StoreUnavailable", "StoreFull", "AlreadyExists", "ObjectInfo", "ObjectStore",
    "LocalStore", "S3Store", "S3Config", "open_store", "copy_object",
]
