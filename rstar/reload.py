"""Hot reload: follow a model's CURRENT pointer and swap the served model without dropping requests.

The one reload mechanism of the model services (policy and PPM); both pieces are
independent of gRPC and of any model library:

- `ModelSlot` holds the model (engine, scorer: any object) a service serves now
  and its version. Requests take a reference with `with slot.acquire() as m:`
  and keep using that model until they finish, even if a swap happens
  meanwhile; the old model is closed only when its last request lets go (in a
  background thread, so that request's answer is not delayed). Two
  modes, chosen per service (`reload_mode`):
    * beside (`two_copies=True`, default): build the new model while the old one
      serves, then swap the reference atomically (memory for two copies);
    * drain (`two_copies=False`, for engines that cannot hold two copies, e.g.
      vLLM on a GPU): report not ready (health NOT_SERVING), stop admitting
      requests (they wait, up to `acquire_timeout_s`), wait for in-flight ones to
      finish, close the old model, build the new one, report ready again. If the
      build fails the old version is built again from its directory, so the
      service keeps its old model.
  `on_ready(bool)` is told whenever the slot starts or stops being able to
  serve (first model in, drain begins/ends, `close`); services point it at
  their health status. The slot also keeps `rstar_model_info{service,model,version}`
  at 1 for the served version (and removes the old one).
- `ModelWatcher` polls `registry.current(name)` every `interval_s` seconds in a
  daemon thread; on a change it fetches the version (verified download into the
  cache) and calls the service's `load(version, local_dir)` (`slot.loader(build)`).
  Any failure (bad hash, missing file, load error) leaves the old model serving,
  is logged and is counted in
  `rstar_model_reloads_total{service,model,outcome="failed"}`. A version that
  failed for a reason of its own (a hash mismatch, a missing file, a manifest
  with an unsafe file path or an unreadable manifest, a load error) is counted
  and logged once and not retried until CURRENT changes again; an unreachable
  store or a full cache disk is retried on the next poll.

Not here: where the first model comes from (`rstar.modelsource`), how a model is
built (the service's `build`), gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from rstar import metrics
from rstar.registry import IncompleteVersion, IntegrityError, ModelRegistry, RegistryError, VersionNotFound
from rstar.store import StoreError

log = logging.getLogger(__name__)

M = TypeVar("M")


class SlotUnavailable(RuntimeError):
    """No model loaded yet, or a drain-mode swap took longer than the caller would wait."""


@dataclass
class Loaded(Generic[M]):
    """One loaded model: what a request holds while it runs."""

    model: M
    version: str
    path: Path | None = None
    _refs: int = 0
    _retired: bool = False


class ModelSlot(Generic[M]):
    """The served model + version, swapped atomically; refcounts keep old models alive for in-flight requests."""

    def __init__(self, service: str, model_name: str, close: Callable[[M], None] | None = None,
                 two_copies: bool = True, acquire_timeout_s: float = 60.0,
                 on_ready: Callable[[bool], None] | None = None):
        self.service, self.model_name = service, model_name
        self._close = close
        self.two_copies = two_copies
        self.acquire_timeout_s = acquire_timeout_s
        self.on_ready = on_ready  # e.g. handle.set_serving: told when the slot starts/stops serving
        self._cond = threading.Condition()
        self._current: Loaded[M] | None = None
        self._draining = False
        self._closed = False
        self._ready = False
        self._swap_lock = threading.Lock()  # one swap at a time

    @property
    def version(self) -> str | None:
        cur = self._current
        return cur.version if cur else None

    @property
    def current(self) -> Loaded[M] | None:
        """The entry served now (for reading its version or attributes; requests use `acquire`)."""
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def ready(self) -> bool:
        """A model is loaded and requests are admitted (not draining, not closed)."""
        return self._ready

    def _set_ready(self) -> None:
        with self._cond:
            ready = self._current is not None and not self._draining and not self._closed
            changed, self._ready = ready != self._ready, ready
        if changed and self.on_ready is not None:
            try:
                self.on_ready(ready)
            except Exception:  # noqa: BLE001 - a failing listener must not break a swap
                log.exception("%s: on_ready(%s) failed", self.service, ready)

    @contextlib.contextmanager
    def acquire(self, timeout: float | None = None) -> Iterator[Loaded[M]]:
        """Hold the current model for one request.

        Raises SlotUnavailable at once when no model has been loaded yet (or the slot is
        closed); during a drain-mode swap waits up to `timeout` (default `acquire_timeout_s`)."""
        deadline = time.monotonic() + (self.acquire_timeout_s if timeout is None else timeout)
        with self._cond:
            while self._draining or self._current is None:
                left = deadline - time.monotonic()
                if self._closed or (not self._draining and self._current is None) or left <= 0:
                    raise SlotUnavailable(f"{self.service}: no {self.model_name} model is loaded"
                                          + (" (swapping versions)" if self._draining else ""))
                self._cond.wait(left)
            entry = self._current
            entry._refs += 1
        try:
            yield entry
        finally:
            self._release(entry)

    def _release(self, entry: Loaded[M]) -> None:
        with self._cond:
            entry._refs -= 1
            done = entry._retired and entry._refs == 0
            self._cond.notify_all()
        if done:  # closing an engine takes seconds: not on the thread of the request that let go
            threading.Thread(target=self._dispose, args=(entry,), name=f"{self.service}-close-{entry.version}",
                             daemon=True).start()

    def _dispose(self, entry: Loaded[M]) -> None:
        if self._close is not None:
            try:
                self._close(entry.model)
            except Exception:
                log.exception("%s: closing %s %s failed", self.service, self.model_name, entry.version)

    def _publish(self, entry: Loaded[M]) -> Loaded[M] | None:
        """Make `entry` current; returns the old entry if it must be disposed of now."""
        with self._cond:
            old, self._current = self._current, entry
            self._cond.notify_all()
            dispose_now = None
            if old is not None:
                old._retired = True
                if old._refs == 0:
                    dispose_now = old  # otherwise the last request holding it disposes of it
        metrics.MODEL_INFO.labels(self.service, self.model_name, entry.version).set(1)
        if old is not None and old.version != entry.version:
            _drop_info(self.service, self.model_name, old.version)
        return dispose_now

    def swap(self, model: M, version: str, path: Path | None = None) -> None:
        """Serve `model` from now on; the previous model is closed once no request holds it."""
        old = self._publish(Loaded(model, version, path))
        if old is not None:
            self._dispose(old)
        log.info("%s: serving %s version %s", self.service, self.model_name, version)
        self._set_ready()

    def loader(self, build: Callable[[str, Path], M]) -> Callable[[str, Path], None]:
        """A `load(version, local_dir)` callback (for ModelWatcher, and for the first load):
        build the model, then swap it in, beside the old one or after draining it."""

        def load(version: str, local_dir: Path) -> None:
            with self._swap_lock:
                if self._closed:
                    raise SlotUnavailable(f"{self.service}: closed")
                if self.two_copies or self._current is None:
                    self.swap(build(version, local_dir), version, local_dir)
                else:
                    self._drain_swap(build, version, local_dir)

        return load

    def _drain_swap(self, build: Callable[[str, Path], M], version: str, local_dir: Path) -> None:
        with self._cond:
            self._draining = True
        self._set_ready()  # not ready: load balancers stop sending while we swap
        log.info("%s: draining %s %s to load %s", self.service, self.model_name, self.version, version)
        with self._cond:
            while self._current is not None and self._current._refs > 0:
                self._cond.wait()
            old, self._current = self._current, None
        try:
            assert old is not None
            self._dispose(old)
            try:
                model = build(version, local_dir)
            except Exception:
                if old.path is None:
                    raise
                log.warning("%s: rebuilding %s %s after a failed swap", self.service, self.model_name, old.version)
                self._publish(Loaded(build(old.version, old.path), old.version, old.path))
                raise
            self._publish(Loaded(model, version, local_dir))
            if old.version != version:
                _drop_info(self.service, self.model_name, old.version)
            log.info("%s: serving %s version %s", self.service, self.model_name, version)
        finally:
            with self._cond:
                self._draining = False
                self._cond.notify_all()
            self._set_ready()

    def close(self) -> None:
        """Stop serving: not ready, no new requests; the model is closed once no request holds it."""
        with self._swap_lock:
            with self._cond:
                self._closed = True
                entry, self._current = self._current, None
                self._cond.notify_all()
                dispose_now = None
                if entry is not None:
                    entry._retired = True
                    if entry._refs == 0:
                        dispose_now = entry
            self._set_ready()
            if entry is not None:
                _drop_info(self.service, self.model_name, entry.version)
            if dispose_now is not None:
                self._dispose(dispose_now)


def _drop_info(service: str, model: str, version: str) -> None:
    with contextlib.suppress(KeyError):
        metrics.MODEL_INFO.remove(service, model, version)


class ModelWatcher:
    """Polls CURRENT and hands each newly promoted version to `load(version, local_dir)`."""

    def __init__(self, registry: ModelRegistry, name: str, load: Callable[[str, Path], Any], *,
                 service: str, interval_s: float = 10.0):
        self.registry, self.name, self.load = registry, name, load
        self.service, self.interval_s = service, interval_s
        self.version: str | None = None  # the version `load` last accepted
        self.failed_version: str | None = None  # refused for a reason of its own; skipped until CURRENT moves
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def check_once(self) -> str:
        """One poll. Returns 'unchanged', 'ok', 'failed' or 'skipped' (a known-bad version)."""
        with self._lock:
            try:
                target = self.registry.current(self.name)
            except StoreError as e:
                return self._fail(None, f"cannot read CURRENT: {e}", permanent=False)
            if target is None:
                return "unchanged"
            if target == self.version:
                self.failed_version = None
                return "unchanged"
            if target == self.failed_version:
                return "skipped"
            try:
                local_dir = self.registry.fetch(self.name, target)
            except (IncompleteVersion, IntegrityError, VersionNotFound) as e:  # incl. UnsafePath
                return self._fail(target, str(e), permanent=True)
            except (RegistryError, ValueError) as e:  # an unreadable or too-new manifest: also the version's own
                return self._fail(target, f"{type(e).__name__}: {e}", permanent=True)
            except (StoreError, OSError) as e:
                return self._fail(target, f"fetch failed: {e}", permanent=False)
            t0 = time.monotonic()
            try:
                self.load(target, local_dir)
            except Exception as e:  # the service's loader: any failure keeps the old model
                log.exception("%s: loading %s %s failed", self.service, self.name, target)
                return self._fail(target, f"load failed: {type(e).__name__}: {e}", permanent=True)
            previous, self.version, self.failed_version, self.last_error = self.version, target, None, None
            metrics.MODEL_RELOADS.labels(self.service, self.name, "ok").inc()
            log.info("%s: %s %s -> %s (loaded in %.1fs)", self.service, self.name, previous, target,
                     time.monotonic() - t0)
            return "ok"

    def _fail(self, target: str | None, why: str, permanent: bool) -> str:
        metrics.MODEL_RELOADS.labels(self.service, self.name, "failed").inc()
        self.last_error = why
        if permanent:
            self.failed_version = target
        log.error("%s: not switching %s to %s; still serving %s: %s%s", self.service, self.name, target,
                  self.version, why, " (refused for good: not retried until CURRENT moves)" if permanent
                  else " (retried on the next poll)")
        return "failed"

    def start(self) -> "ModelWatcher":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # never let the watcher thread die
                log.exception("%s: model watcher poll failed", self.service)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def model_service(name: str, config, make_servicer: Callable[[ModelSlot], object],
                  add_to_server: Callable[[object, object], None], service_name: str,
                  build: Callable[[str, Path], M], core: M | None = None,
                  two_copies: Callable[[], bool] = lambda: True):
    """The wiring both model services share (policy, PPM): a `ModelSlot` behind a gRPC server.

    With `core` given (anything implementing the service's protocol, e.g. a fake in tests)
    that one is served at once and never closed by the service. Without, the returned
    service's load step resolves the model (`rstar.modelsource.ModelSource`: a directory,
    an embedded model, or the registry's CURRENT), builds it with `build(version, dir)`
    and, with a registry, hot-reloads promoted versions through the slot; models it built
    are closed when replaced or at shutdown. Health is SERVING exactly while the slot can
    serve. `config` needs host, port, model, model_version, store_url, reload_interval
    (and may have `reflection`, default on).
    """
    from rstar.server import ServerSecurity, Service, create_grpc_server

    built: set[int] = set()

    def close_built(model) -> None:
        if id(model) in built:
            built.discard(id(model))
            model.close()

    slot: ModelSlot = ModelSlot(name, name, close=close_built, two_copies=two_copies())
    servicer = make_servicer(slot)

    def register(server):
        add_to_server(servicer, server)
        return [service_name]

    handle = create_grpc_server(name, register, config.host, config.port,
                                reflection=getattr(config, "reflection", True),
                                security=ServerSecurity.from_config(config))
    slot.on_ready = handle.set_serving
    source = None

    def build_tracked(version: str, model_dir: Path):
        model = build(version, model_dir)
        built.add(id(model))
        return model

    def load_step() -> None:
        nonlocal source
        from rstar.modelsource import ModelSource

        source = ModelSource(name, config.model, config.model_version, config.store_url)
        model_dir, version = source.resolve()
        load = slot.loader(build_tracked)
        load(version, model_dir)
        source.watch(config.reload_interval, load)

    def release() -> None:
        if source is not None:
            source.stop()
        slot.close()

    if core is not None:
        slot.swap(core, config.model_version or getattr(core, "version", "") or "injected")
    return Service(handle, servicer, load_step=None if core is not None else load_step, release=release,
                   core_of=lambda: slot.current.model if slot.current is not None else None)


def call_model(slot: ModelSlot, context, call: Callable[[Any, Any], Any], what: str, doing: str) -> tuple[Any, str]:
    """Run `call(model, scope)` on the slot's served model for one RPC; returns (result, version).

    Shared by the model servicers (policy, PPM): waits for the slot at most until the RPC's
    deadline, and maps the outcomes to status codes — no model yet → UNAVAILABLE, the deadline
    → DEADLINE_EXCEEDED, the caller gone → CANCELLED. `what` names the model ("policy"),
    `doing` the work ("generating") in the messages.
    """
    import grpc

    from rstar.protocols import Cancelled, DeadlineExceeded, RequestRejected
    from rstar.server import ServiceError, call_scope, unavailable

    scope = call_scope(context)
    wait = slot.acquire_timeout_s
    if scope.remaining() is not None:
        wait = max(0.0, min(wait, scope.remaining()))
    try:
        with slot.acquire(timeout=wait) as held:
            result = call(held.model, scope)
            return result, getattr(result, "model_version", "") or held.version
    except SlotUnavailable as e:
        raise unavailable(f"{what} model is loading ({e})") from None
    except DeadlineExceeded:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline expired while {doing}") from None
    except Cancelled:
        raise ServiceError(grpc.StatusCode.CANCELLED, f"cancelled while {doing}") from None
    except RequestRejected as e:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
