"""The sandbox: run untrusted, model-written Python programs, isolated, limited and fast.

`Sandbox` owns a fork-server process (`rstar.sandbox.forkserver`) with a warm pool
of pre-forked, pre-isolated workers (`rstar.sandbox.child`), talks to it in the
frames of `rstar.sandbox.protocol`, and runs batches of programs on it
concurrently, results in order. It knows nothing of gRPC.

Contract, per execution:
- Guaranteed, on any Linux: its own fresh process forked from a clean warm
  interpreter (math, fractions, sympy, numpy... already imported) that exits
  afterwards, so no state passes between runs; a clean environment (no
  variables of the service); its own empty scratch directory as cwd, HOME and
  TMPDIR, deleted afterwards; no inherited file descriptors but its pipes; a
  wall-time limit enforced from outside (SIGKILL) plus a CPU-time rlimit; an
  address-space limit (MemoryError -> MEMORY); a file-size limit; a disk cap
  on its scratch directory (`disk_bytes`, `disk_files`: a tmpfs of that size
  where the fork server may mount, else scanned; past it the run is killed,
  KILLED with "disk cap" on stderr); an output cap on stdout + stderr enforced
  by the reader (the program is killed, output truncated); the service never
  waits on a program past its limits.
- With the `seccomp` layer (PyPI pyseccomp + libseccomp.so.2): no sockets at
  all (no network, no unix sockets), no fork/exec (no os.system, subprocess,
  fork bombs), no signals to any other process, no ptrace, mounts, namespaces,
  kernel modules, bpf, or raising limits. Denied calls fail with EPERM.
- With `landlock` (Linux >= 5.13, enabled LSM): the filesystem shrinks to
  read-only interpreter libraries plus the read-write scratch directory: no
  reading /etc, /proc, the service's source, secrets or other runs' files, no
  writing anywhere else; with ABI >= 4 no TCP, with ABI >= 6 no signals out.
- With `namespaces`: a private network namespace (no interfaces), IPC and UTS.
- With `pidns` (root): its own PID namespace (pid 2, nothing else visible) and
  an empty /proc.
- With `unprivileged`: uid 65534 (when root and the interpreter is readable
  by it) or, failing that, no capabilities at all.
The service detects which layers work at start, logs them, exports
`rstar_sandbox_isolation_layer{layer}` and `Info.details`, and refuses to start
without the layers in `require_layers`, or when no active layer set hides other
processes (`isolation.processes_hidden`: landlock, or pidns with seccomp or
unprivileged), unless `allow_unisolated`: then a program could read the
environment and memory of the service's processes.

Not guaranteed: protection against kernel exploits (the kernel is shared: use
the gVisor runtime class in Kubernetes for that); CPU fairness beyond the
concurrency limit; a disk cap without overshoot when scratch directories are
scanned (what a program writes between two scans, 0.1 s); a program may
misreport its own failure kind (e.g.
`sys.exit(249)` reads as MEMORY) but cannot affect any other run. In
Kubernetes the deployment adds a NetworkPolicy with no egress, a non-root user,
a read-only root filesystem with an emptyDir scratch, pod memory/CPU limits
and, optionally, `runtimeClassName: gvisor`.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rstar import metrics

from rstar.sandbox.config import SandboxConfig
from rstar.sandbox.isolation import LAYERS, processes_hidden
from rstar.sandbox.protocol import SAFE_ENV, FrameReader, send_frame

log = logging.getLogger("rstar.sandbox")

FAILURE_KINDS = ("ok", "error", "timeout", "memory", "killed", "output_limit")


class SandboxError(Exception):
    """Base of the sandbox's domain errors."""


class SandboxUnavailable(SandboxError):
    """The worker pool is not running (starting, restarting or stopped)."""


class QueueFull(SandboxError):
    """More programs waiting than `max_queue` allows."""


class IsolationTooWeak(SandboxError):
    """A required isolation layer does not work on this machine."""


@dataclass(frozen=True)
class Limits:
    wall_seconds: float
    memory_bytes: int
    output_bytes: int


@dataclass
class ExecutionResult:
    stdout: str
    stderr: str
    exit_code: int
    failure: str          # one of FAILURE_KINDS
    duration_seconds: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.failure == "ok"


@dataclass
class _Pending:
    future: cf.Future
    msg: dict


@dataclass
class PoolState:
    ready: bool = False
    layers: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    idle: int = 0
    running: int = 0
    queued: int = 0
    restarts: int = 0


class Sandbox:
    """A warm pool of isolated workers behind a thread-safe `execute`."""

    def __init__(self, config: SandboxConfig, on_ready_change: Callable[[bool], None] | None = None):
        self.config = config
        self.on_ready_change = on_ready_change
        self.state = PoolState()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._outstanding = 0
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._warm = threading.Event()
        self._hello = threading.Event()
        self._closing = False
        self._fatal = ""
        for layer in LAYERS:
            metrics.SANDBOX_ISOLATION.labels(layer).set(0)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the fork server and wait until the pool is warm; raise if isolation is too weak."""
        timeout = self.config.start_timeout if timeout is None else timeout
        self._spawn()
        deadline = time.monotonic() + timeout
        if not self._hello.wait(timeout) or self._fatal:
            self.close()
            raise SandboxUnavailable(f"fork server did not start within {timeout:.0f} s: {self._fatal or 'no report'}")
        missing = [layer for layer in self.config.require_layers if layer not in self.state.layers]
        if missing:
            detail = "; ".join(f"{k}: {self.state.errors.get(k, 'not attempted')}" for k in missing)
            self.close()
            raise IsolationTooWeak(f"required isolation layers unavailable: {detail}")
        if not processes_hidden(self.state.layers):
            detail = "; ".join(f"{k}: {self.state.errors.get(k, 'disabled by configuration')}"
                               for k in ("landlock", "pidns", "seccomp", "unprivileged") if k not in self.state.layers)
            if not self.config.allow_unisolated:
                self.close()
                raise IsolationTooWeak(
                    "no active isolation layer hides other processes, so programs could read the service's "
                    "environment and memory (needs landlock, or pidns with seccomp or unprivileged; "
                    f"active: {', '.join(self.state.layers) or 'none'}; {detail}); "
                    "allow_unisolated (--allow-unisolated) starts anyway")
            log.warning("sandbox started UNISOLATED (allow_unisolated): programs can read other processes' "
                        "environment and memory, the service's included (%s)", detail)
        if not self._warm.wait(max(0.0, deadline - time.monotonic())) or self._fatal:
            self.close()
            raise SandboxUnavailable(f"worker pool did not warm up in {timeout:.0f} s: {self._fatal}")

    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the `rstar` package
        cfg = {
            "pool_size": self.config.pool_size, "max_concurrent": self.config.max_concurrent,
            "layers": list(self.config.layers), "scratch_root": self.config.scratch_root,
            "disk_bytes": self.config.disk_bytes, "disk_files": self.config.disk_files,
            "log_level": self.config.log_level,
        }
        boot = f"import sys; sys.path.insert(0, {root!r}); from rstar.sandbox.forkserver import main; main()"
        env = dict(SAFE_ENV, PATH="/usr/bin:/bin")
        self._hello.clear()
        self._warm.clear()
        # a clean environment: /proc/<pid>/environ of the fork server and its workers holds no secrets
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", boot, str(child.fileno()), json.dumps(cfg)],
            pass_fds=[child.fileno()], env=env, cwd="/", stdin=subprocess.DEVNULL, close_fds=True,
            start_new_session=True,  # a Ctrl-C or SIGTERM to the service's group is the service's to handle
        )
        child.close()
        self._sock = parent
        threading.Thread(target=self._read_loop, args=(parent, self._proc), name="sandbox-reader",
                         daemon=True).start()
        log.info("sandbox fork server started (pid %d)", self._proc.pid)

    def close(self) -> None:
        """Stop the fork server (its workers die with it) and fail what is pending."""
        self._closing = True
        proc, sock = self._proc, self._sock
        if sock is not None:
            try:
                with self._write_lock:
                    send_frame(sock, {"op": "stop"})
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if sock is not None:
            sock.close()
        self._set_ready(False)

    # ------------------------------------------------------------------ reading the fork server
    def _read_loop(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        reader = FrameReader()
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                break
            for msg in reader.feed(data):
                self._on_message(msg)
        self._on_server_exit(proc)

    def _on_message(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "result":
            with self._lock:
                pending = self._pending.pop(msg["id"], None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(_result(msg))
        elif op == "stats":
            st = self.state
            st.idle, st.running, st.queued = msg["idle"], msg["running"], msg["queued"]
            metrics.SANDBOX_POOL_SIZE.set(st.idle)
            metrics.SANDBOX_QUEUE_DEPTH.set(st.queued)
            if st.idle >= self.config.pool_size and not self._warm.is_set():
                self._warm.set()
                log.info("sandbox pool warm: %d workers ready", st.idle)
                self._set_ready(True)
        elif op == "hello":
            self._on_hello(msg)
        elif op == "fatal":
            self._fatal = msg.get("message", "")
            log.error("sandbox fork server gave up: %s", self._fatal)

    def _on_hello(self, msg: dict) -> None:
        st = self.state
        st.layers, st.errors = list(msg["layers"]), dict(msg["errors"])
        st.info = {k: msg.get(k) for k in ("pid", "landlock_abi", "unprivileged_mode", "preloaded", "python",
                                           "scratch", "disk_cap")}
        for layer in LAYERS:
            metrics.SANDBOX_ISOLATION.labels(layer).set(1 if layer in st.layers else 0)
        log.info("sandbox isolation layers active: %s", ", ".join(st.layers) or "none")
        for layer, err in st.errors.items():
            log.warning("sandbox isolation layer %s unavailable: %s", layer, err)
        for layer in LAYERS:
            if layer not in self.config.layers:
                log.warning("sandbox isolation layer %s disabled by configuration", layer)
        log.info("sandbox preloaded modules: %s", ", ".join(msg.get("preloaded", [])))
        self._hello.set()

    def _on_server_exit(self, proc: subprocess.Popen) -> None:
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._set_ready(False)
        with self._lock:
            lost, self._pending = list(self._pending.values()), {}
        for p in lost:
            if not p.future.done():
                p.future.set_exception(SandboxUnavailable("sandbox fork server stopped while running the program"))
        metrics.SANDBOX_POOL_SIZE.set(0)
        if self._closing or proc is not self._proc:
            return
        if not self._warm.is_set() and self.state.restarts == 0:  # failed during start(): report, don't loop
            self._fatal = self._fatal or f"fork server exited with code {code} before the pool was warm"
            self._hello.set()
            self._warm.set()
            return
        self.state.restarts += 1
        log.error("sandbox fork server exited (code %s); restarting it", code)
        time.sleep(min(5.0, 0.2 * self.state.restarts))
        if not self._closing:
            self._spawn()

    def _set_ready(self, ready: bool) -> None:
        if self.state.ready != ready:
            self.state.ready = ready
            if self.on_ready_change is not None:
                self.on_ready_change(ready)

    # ------------------------------------------------------------------ executing
    def resolve_limits(self, wall_seconds: float = 0, memory_bytes: int = 0, output_bytes: int = 0) -> Limits:
        """Request limits with 0 meaning the default; out-of-range values raise ValueError."""
        c = self.config
        for name, value, top in (("wall_seconds", wall_seconds, c.max_wall_seconds),
                                 ("memory_bytes", memory_bytes, c.max_memory_bytes),
                                 ("output_bytes", output_bytes, c.max_output_bytes)):
            if value < 0 or value > top or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"limits.{name}={value} outside 0..{top}")
        return Limits(wall_seconds or c.wall_seconds, memory_bytes or c.memory_bytes, output_bytes or c.output_bytes)

    def execute(self, programs: Sequence[str], limits: Limits | None = None, timeout: float | None = None,
                cancelled: threading.Event | None = None) -> list[ExecutionResult]:
        """Run the programs concurrently; results in order.

        Raises ValueError for bad input, QueueFull when the queue cannot take
        the batch, SandboxUnavailable when the pool is down, TimeoutError when
        `timeout` (the caller's deadline) expires first. `cancelled` stops it.
        """
        limits = limits or self.resolve_limits()
        self._validate(programs)
        if not self.state.ready:
            raise SandboxUnavailable("sandbox worker pool is not ready")
        n = len(programs)
        with self._lock:
            capacity = self.config.max_concurrent + self.config.max_queue
            if self._outstanding + n > capacity:
                raise QueueFull(f"sandbox queue full: {self._outstanding} programs in flight, "
                                f"{n} more would exceed {capacity}")
            self._outstanding += n
            batch = []
            for code in programs:
                msg = {"op": "run", "id": next(self._ids), "code": code, "wall": limits.wall_seconds,
                       "memory": limits.memory_bytes, "output": limits.output_bytes,
                       "file_bytes": self.config.file_bytes}
                p = _Pending(cf.Future(), msg)
                self._pending[msg["id"]] = p
                batch.append(p)
        try:
            self._send_batch(batch)
            return self._collect(batch, limits, timeout, cancelled)
        finally:
            with self._lock:
                self._outstanding -= n
                for p in batch:
                    self._pending.pop(p.msg["id"], None)

    def _validate(self, programs: Sequence[str]) -> None:
        if not programs:
            raise ValueError("no programs to execute")
        if len(programs) > self.config.max_programs:
            raise ValueError(f"{len(programs)} programs exceed the limit of {self.config.max_programs} per call")
        for i, code in enumerate(programs):
            size = len(code.encode("utf-8", "surrogatepass"))
            if size > self.config.max_code_bytes:
                raise ValueError(f"programs[{i}] is {size} bytes (limit {self.config.max_code_bytes})")
            if "\x00" in code:
                raise ValueError(f"programs[{i}] contains a NUL byte")

    def _send_batch(self, batch: list[_Pending]) -> None:
        sock = self._sock
        try:
            with self._write_lock:
                for p in batch:
                    send_frame(sock, p.msg)
        except OSError as e:
            raise SandboxUnavailable(f"sandbox fork server unreachable: {e}") from e

    def _collect(self, batch: list[_Pending], limits: Limits, timeout: float | None,
                 cancelled: threading.Event | None) -> list[ExecutionResult]:
        # a backstop so a wedged fork server can never hang a caller: every program of every
        # batch ahead of this one could use its full wall time
        c = self.config
        waves = math.ceil((self._outstanding + len(batch)) / c.max_concurrent)
        backstop = waves * (limits.wall_seconds + 2.0) + 30.0
        budget = backstop if timeout is None else min(timeout, backstop)
        end = time.monotonic() + budget
        futures = [p.future for p in batch]
        while True:
            remaining = end - time.monotonic()
            done, not_done = cf.wait(futures, timeout=max(0.0, min(remaining, 0.1)))
            if not not_done:
                break
            if cancelled is not None and cancelled.is_set():
                self._cancel(batch)
                raise TimeoutError("execution cancelled by the caller")
            if time.monotonic() >= end:
                self._cancel(batch)
                if timeout is not None and timeout <= backstop:
                    raise TimeoutError(f"deadline expired with {len(not_done)} of {len(batch)} programs unfinished")
                log.error("sandbox fork server did not answer within %.0f s; restarting it", backstop)
                self._restart()
                raise SandboxUnavailable("sandbox did not answer in time; restarted")
        results = []
        for f in futures:
            r = f.result()  # SandboxUnavailable if the fork server died meanwhile
            metrics.SANDBOX_EXECUTIONS.labels(r.failure).inc()
            metrics.SANDBOX_LATENCY.observe(r.duration_seconds)
            results.append(r)
        return results

    def _cancel(self, batch: list[_Pending]) -> None:
        try:
            with self._write_lock:
                for p in batch:
                    if not p.future.done():
                        send_frame(self._sock, {"op": "cancel", "id": p.msg["id"]})
        except OSError:
            pass

    def _restart(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # the reader thread sees EOF and respawns it

    def info(self) -> dict[str, str]:
        st = self.state
        details = {
            "isolation_layers": ",".join(st.layers),
            "required_layers": ",".join(self.config.require_layers),
            "pool_size": str(self.config.pool_size),
            "idle_workers": str(st.idle),
            "running": str(st.running),
            "queued": str(st.queued),
            "max_concurrent": str(self.config.max_concurrent),
            "restarts": str(st.restarts),
        }
        for k, v in st.info.items():
            details[k] = ",".join(v) if isinstance(v, list) else str(v)
        for layer, err in st.errors.items():
            details[f"unavailable.{layer}"] = err
        return details


def _result(msg: dict) -> ExecutionResult:
    return ExecutionResult(stdout=msg["stdout"], stderr=msg["stderr"], exit_code=int(msg["exit_code"]),
                           failure=msg["failure"], duration_seconds=float(msg["duration"]),
                           truncated=bool(msg["truncated"]))

