"""gRPC server scaffolding shared by the four services, and the one shape they have.

`create_grpc_server` builds a server with the metrics/error interceptor, the
standard health service (NOT_SERVING until the service says otherwise) and
reflection. Every service's `create_server(config, core=None)` returns a
`Service`: the server handle, the servicer, the core it serves (injected, or
loaded by the service's load step), `start()`, `load()`, `close()`. Health
follows the core (a model slot, the sandbox pool, the downstream monitor), so a
service is SERVING only once its core can answer. `serve` runs a `Service` until
SIGTERM/SIGINT and then drains gracefully; under `rstar up` it also ends with its
launcher and keeps a pid file (see "local stacks" below). Reflection can be
switched off per service (`reflection` in each service's config). The search service
also serves its stored trees read-only at /view/ beside /metrics (`mount_tree_viewer`).
Security (`ServerSecurity`, from the `rstar.config.ServingSecurity` fields every
service config has): TLS with the configured certificate and key, mutual TLS when a
client CA is given (a client without a certificate fails the handshake), bearer-token
authentication and scopes (`rstar.auth.AuthInterceptor`, after the metrics interceptor
so rejected calls are counted) when a token file is given; plaintext only on a
loopback host unless `allow_plaintext` says otherwise.
Handlers raise `ServiceError` (or `ValueError` for bad input) and never leak a
stack trace to clients: anything unexpected becomes INTERNAL with a one-line
message, and the trace goes to the log.

Not here: any service's protobuf messages, cores or configuration.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from rstar import auth, metrics
from rstar.protocols import CallScope
from rstar.services import SERVICES

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024          # between our own services (large Generate batches)
PUBLIC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024     # the search API that clients call
# Internal clients ping idle connections every 30 s (rstar.clients.KEEPALIVE_TIME_S): a server
# must allow that, or it answers the pings with GOAWAY "too_many_pings" and drops the connection.
MIN_PING_INTERVAL_S = 10.0
# A connection is closed gracefully (GOAWAY; in-flight calls finish) after this long, so clients
# re-resolve a headless Service's name and spread over replicas added since they connected.
MAX_CONNECTION_AGE_S = 300.0


class ServiceError(Exception):
    """A domain error with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def call_scope(context: grpc.ServicerContext) -> CallScope:
    """An RPC's deadline and cancellation as the `CallScope` the engine protocols take."""
    remaining = context.time_remaining()  # None or huge without a client deadline
    deadline = None if remaining is None or remaining > 1e6 else time.monotonic() + remaining
    scope = CallScope(deadline)
    context.add_callback(lambda: scope.stop("cancelled"))  # runs when the RPC ends, however it ends
    return scope


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, ServiceError):
        context.abort(exc.code, exc.message)
    if isinstance(exc, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


class MetricsInterceptor(grpc.ServerInterceptor):
    """Per-RPC latency, in-flight and status-code counts; domain errors to status codes."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler_call_details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _record(self, method: str, context, start: float, failed: bool) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        name = code.name if hasattr(code, "name") else str(code)
        metrics.RPC_REQUESTS.labels(self.service, method, name).inc()
        metrics.RPC_LATENCY.labels(self.service, method).observe(time.perf_counter() - start)

    def _wrap_unary(self, fn, method):
        def wrapper(request, context):
            start = time.perf_counter()
            gauge = metrics.RPC_IN_FLIGHT.labels(self.service, method)
            gauge.inc()
            failed = False
            try:
                return fn(request, context)
            except Exception as e:  # noqa: BLE001 - mapped to a status code below
                failed = True
                if context.code() is not None:  # the handler already aborted
                    raise
                _abort(context, e, method)
            finally:
                gauge.dec()
                self._record(method, context, start, failed)

        return wrapper

    def _wrap_stream(self, fn, method):
        def wrapper(request, context):
            start = time.perf_counter()
            gauge = metrics.RPC_IN_FLIGHT.labels(self.service, method)
            gauge.inc()
            failed = False
            try:
                yield from fn(request, context)
            except Exception as e:  # noqa: BLE001
                failed = True
                if context.code() is not None:
                    raise
                _abort(context, e, method)
            finally:
                gauge.dec()
                self._record(method, context, start, failed)

        return wrapper


@dataclass
class ServerHandle:
    """A built (not yet started) server and its health servicer."""

    service: str
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    closing: bool = field(default=False, init=False)  # once set, health stays NOT_SERVING
    health_server: grpc.Server | None = None  # the plaintext health-only port, when configured
    health_port: int | None = None
    tokens: "auth.TokenTable | None" = None     # the API's callers, when authentication is on

    def set_serving(self, serving: bool) -> None:
        serving = serving and not self.closing
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("",) + self.service_names:
            self.health.set(name, status)
        metrics.SERVICE_READY.labels(self.service).set(1 if serving else 0)
        log.info("%s health: %s", self.service, "SERVING" if serving else "NOT_SERVING")


@dataclass(frozen=True)
class ServerSecurity:
    """How a server's port is protected: TLS files (paths), a token file, and whether plaintext
    may face the network. The default is what a laptop needs: plaintext on loopback, no tokens."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""   # mutual TLS: client certificates must chain to this bundle
    auth_tokens: str = ""     # rstar.auth token file; '' = no authentication
    allow_plaintext: bool = False
    health_port: int = -1     # a plaintext health-only port for probes (-1 = none)

    @classmethod
    def from_config(cls, config: Any) -> "ServerSecurity":
        """The `rstar.config.ServingSecurity` fields of a service config (absent ones: the defaults)."""
        return cls(**{f: getattr(config, f, getattr(cls, f)) for f in
                      ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens", "allow_plaintext", "health_port")})

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def check(self, service: str, host: str) -> None:
        """ValueError for a combination that must not start (as `ServingSecurity.validate_security`)."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{service}: tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls:
            raise ValueError(f"{service}: tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not self.tls and not self.allow_plaintext and not auth.loopback_host(host):
            raise ValueError(f"{service}: plaintext gRPC on {host} would reach the network: give tls_cert and "
                             "tls_key, or allow_plaintext where the network already protects it")

    def credentials(self, service: str) -> grpc.ServerCredentials:
        def read(what: str, path: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise OSError(f"{service}: cannot read {what} {path}: {e.strerror}") from None

        pair = (read("tls_key", self.tls_key), read("tls_cert", self.tls_cert))
        ca = read("tls_client_ca", self.tls_client_ca) if self.tls_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def create_grpc_server(
    service: str,
    register: Callable[[grpc.Server], Iterable[str]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 16,
    reflection: bool = True,
    security: ServerSecurity | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> ServerHandle:
    """Build a server; `register` adds servicers and returns their full service names.

    At most `max_workers` RPCs run at once; one more is answered RESOURCE_EXHAUSTED at once
    instead of queueing without bound behind busy handler threads (where a health check
    would starve too: probes that must answer under saturation use the health port).
    `max_message_bytes` bounds requests and responses (the public search API uses a few MiB).

    `reflection` (each service's `reflection` setting) serves gRPC server reflection
    (for grpcurl/grpcui); off, the server answers reflection calls with UNIMPLEMENTED.
    `security` (`ServerSecurity.from_config(config)`): TLS, mutual TLS, tokens; default
    plaintext, refused on a non-loopback host."""
    security = security or ServerSecurity()
    security.check(service, host)
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(service)]
    tokens = auth.TokenTable(security.auth_tokens) if security.auth_tokens else None
    if tokens is not None:
        interceptors.append(auth.AuthInterceptor(service, tokens))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{service}-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_INTERVAL_S * 1000)),
            ("grpc.max_connection_age_ms", int(MAX_CONNECTION_AGE_S * 1000)),
        ],
        maximum_concurrent_rpcs=max_workers,
    )
    names = tuple(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        grpc_reflection.enable_server_reflection(
            names + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, grpc_reflection.SERVICE_NAME),
            server,
        )
    if security.tls:
        bound = server.add_secure_port(f"{host}:{port}", security.credentials(service))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{service}: cannot bind {host}:{port}")
    handle = ServerHandle(service, server, bound, health_servicer, names, tokens=tokens)
    if security.health_port >= 0:
        # the same health servicer on a port of its own: probes see exactly the status clients see
        handle.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                                      thread_name_prefix=f"{service}-health"),
                                           options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handle.health_server)
        handle.health_port = handle.health_server.add_insecure_port(f"{host}:{security.health_port}")
        if handle.health_port == 0:
            raise OSError(f"{service}: cannot bind the health port {host}:{security.health_port}")
    log.info("%s: %s%s on %s:%d", service, "mutual TLS" if security.tls_client_ca else "TLS" if security.tls
             else "plaintext", ", bearer tokens" if security.auth_tokens else "", host, bound)
    handle.set_serving(False)
    return handle


@dataclass
class Service:
    """One built service, the same for all four: what `create_server(config, core=None)` returns.

    `start()` starts answering (health NOT_SERVING and RPCs UNAVAILABLE until the core
    is there; an injected core is there at once); `load()` runs the load step that
    builds the real core (model loading, the sandbox pool, waiting for downstream
    services), nothing when the core was injected; `close(grace)` flips health to
    NOT_SERVING, gives in-flight RPCs `grace` seconds, then releases the core.
    """

    handle: ServerHandle
    servicer: Any
    load_step: Callable[[], None] | None = None   # builds the real core; None when it was injected
    release: Callable[[], None] | None = None     # frees the core's resources once the server stopped
    core_of: Callable[[], Any] = lambda: None     # the core served now (None while loading)
    _started: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)

    @property
    def name(self) -> str:
        return self.handle.service

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.handle.port}"

    @property
    def core(self) -> Any:
        return self.core_of()

    def start(self) -> "Service":
        if not self._started:
            self.handle.server.start()
            if self.handle.health_server is not None:
                self.handle.health_server.start()
            self._started = True
            log.info("%s listening on port %d", self.name, self.port)
        return self

    def load(self) -> None:
        if self.load_step is not None:
            self.load_step()

    def close(self, grace: float = 0.0) -> None:
        """Idempotent: NOT_SERVING, stop the server (in-flight RPCs get `grace` s), release the core."""
        if self._closed:
            return
        self._closed = True
        self.handle.closing = True
        self.handle.set_serving(False)
        self.handle.server.stop(grace).wait()
        if self.handle.health_server is not None:
            self.handle.health_server.stop(0).wait()
        if self.release is not None:
            self.release()

    stop = close

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- local stacks (`rstar up`)
#
# Two environment variables, set by `rstar up` for the services it starts and read (then
# removed from the environment, so nothing the service spawns inherits them) by `serve`:
#   RSTAR_PARENT_PID  the service ends when that process does (`rstar up` without --detach)
#   RSTAR_RUN_DIR     the service records itself in RUN_DIR/<name>-<port>.pid while it runs
#                     (JSON: service, module, pid, port, metrics_port, started_at, start_ticks,
#                     parent_pid), so `rstar down` can find a stack it did not start detached.
# Neither is set in a pod, so Kubernetes services write no pid files and follow no parent.
PARENT_PID_ENV = "RSTAR_PARENT_PID"
RUN_DIR_ENV = "RSTAR_RUN_DIR"
PARENT_POLL_S = 0.5
KILL_AFTER_S = 20.0  # beyond the drain grace: a service that does not finish shutting down is killed


def process_start_ticks(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (/proc/PID/stat field 22), None off Linux.
    Together with the pid it names one process: a recycled pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def follow_parent(parent_pid: int, grace: float, poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """End this process when `parent_pid` is no longer its parent (the parent died, however it died).

    A daemon thread polls getppid(): on a change it sends this process SIGTERM (the normal
    drain) and, if it is still alive `grace + KILL_AFTER_S` seconds later, SIGKILL. Polling the
    parent pid, not PR_SET_PDEATHSIG: the death signal follows the *thread* that forked the
    child, so a launcher that starts services from a worker thread would stop them when that
    thread ends."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        log.warning("parent process %d is gone; shutting down", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace + KILL_AFTER_S)
        log.error("still running %.0f s after the parent died; killing this process", grace + KILL_AFTER_S)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _take_env(name: str) -> str:
    return os.environ.pop(name, "").strip()


def write_pid_file(run_dir: Path, service: "Service") -> Path:
    """Record this process in `run_dir` (atomically); returns the file's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = SERVICES.get(service.name)
    mhost_port = metrics.serving_address()
    record = {
        "service": service.name,
        "module": spec.module if spec else sys.argv[0],
        "pid": os.getpid(),
        "port": service.port,
        "metrics_port": mhost_port[1] if mhost_port else None,
        "started_at": time.time(),
        "start_ticks": process_start_ticks(os.getpid()),
        "parent_pid": os.getppid(),
    }
    path = run_dir / f"{service.name}-{service.port}.pid"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _remove_pid_file(path: Path) -> None:
    """Remove our pid file (not one a later process with the same name and port wrote)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def serve(service: Service, grace: float = 10.0, ready: threading.Event | None = None) -> None:
    """Start the service, run its load step in this thread, serve until SIGTERM/SIGINT.

    The server answers from the start (health NOT_SERVING, RPCs UNAVAILABLE) and
    its health follows the core from then on. `ready` is set once the load step
    returned. On a signal, health flips to NOT_SERVING first so load balancers stop
    sending, in-flight RPCs get `grace` seconds, then the core is released (at
    once when none is in flight); a second signal cuts the drain short. A service
    whose calls are long passes its own drain grace (the search service:
    `drain_grace_s`); the pod's terminationGracePeriodSeconds must be longer.
    Started by `rstar up` (RSTAR_PARENT_PID, RSTAR_RUN_DIR; see above), the service also
    ends when `rstar up` does and records itself in a pid file while it runs.
    """
    stop = threading.Event()

    def _signal(signum, _frame):
        if stop.is_set():   # a second signal: an operator who will not wait for the drain
            log.warning("%s: received %s again, stopping in-flight calls now", service.name,
                        signal.Signals(signum).name)
            service.handle.server.stop(0)
            return
        log.info("%s: received %s, shutting down (in-flight calls get %.0f s)", service.name,
                 signal.Signals(signum).name, grace)
        stop.set()
        if loading.is_set():  # interrupt a model load too
            raise KeyboardInterrupt

    loading = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    parent, run_dir = _take_env(PARENT_PID_ENV), _take_env(RUN_DIR_ENV)
    if parent:
        follow_parent(int(parent), grace)
    pid_file = None
    service.start()
    if service.name == "search":   # the tree viewer asks for the API's tokens when the API does
        tokens = service.handle.tokens
        mount_tree_viewer(service, auth.http_authorizer(tokens) if tokens is not None else None)
    try:
        if run_dir:
            pid_file = write_pid_file(Path(run_dir), service)
        loading.set()
        try:
            if not stop.is_set():
                service.load()
        finally:
            loading.clear()
        if not stop.is_set():
            if ready is not None:
                ready.set()
            stop.wait()
    except KeyboardInterrupt:
        log.info("%s: interrupted while loading", service.name)
    finally:
        service.close(grace)
        if pid_file is not None:
            _remove_pid_file(pid_file)
        log.info("%s stopped", service.name)


def mount_tree_viewer(service: Service, authorize: Callable[[str | None], bool] | None = None) -> bool:
    """The search service's read-only tree viewer at /view/ beside /metrics (its store's trees).

    `authorize(Authorization header or None) -> allowed` guards the view data: `serve` passes
    `rstar.auth.http_authorizer` over the API's own token table when authentication is on
    (a token with the solve, synthesize or admin scope may read trees); None allows every
    request (a loopback stack without tokens).
    False when there is no /metrics server or no store to show."""
    store = getattr(service.core, "store", None)
    if store is None or metrics.serving_address() is None:
        return False
    from rstar.viewer.http import mount_store_viewer

    mount_store_viewer(store, authorize)
    return True


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
