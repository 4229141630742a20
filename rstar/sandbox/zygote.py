"""The fork server: one warm interpreter that forks an isolated worker per execution.

The service starts this module as a separate process (never forking the
multi-threaded gRPC process itself) with a clean environment. It imports the
common libraries of math code once, then keeps `pool_size` workers forked
ahead of demand: each worker has already entered its isolation layers
(`rstar.sandbox.isolation`) and blocks reading one job from a pipe. A job runs in
exactly one worker, which exits afterwards, so nothing leaks between runs; the
pool refills itself in the background.

The loop is single-threaded (selectors + SIGCHLD wakeup fd). It enforces the
wall-time limit and the output cap from outside the worker and classifies how
each run ended. It talks to the service over one socket with length-prefixed
JSON frames:

  service -> zygote: {"op": "run", "id", "code", "wall", "memory", "output"} |
                     {"op": "cancel", "id"} | {"op": "stop"}
  zygote -> service: {"op": "hello", layers...} | {"op": "result", "id", ...} |
                     {"op": "stats", "idle", "running", "queued"} | {"op": "fatal", "message"}
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback

from rstar.sandbox import isolation

log = logging.getLogger("rstar.sandbox.zygote")

PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools", "collections",
           "heapq", "bisect", "random", "re", "string", "operator", "datetime", "json", "numpy", "sympy")
EXIT_MEMORY = 249         # the program raised MemoryError (address-space limit)
EXIT_SETUP_FAILED = 248   # the worker could not enter its isolation layers
SAFE_ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
_HEADER = struct.Struct(">I")
_baseline_as = 0          # worker: address space before the program (the memory limit adds to it)
_lock_limits = False      # worker: add a seccomp rule against setrlimit after applying the job's limits
namespaces_ok = False  # the fork server entered its namespaces (workers inherit them)
namespaces_error = "disabled by configuration"
_READ_CHUNK = 65536


# ------------------------------------------------------------------ framing
def send_frame(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


class FrameReader:
    """Accumulates bytes and yields complete frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(json.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out


# ------------------------------------------------------------------ preloading
def preload() -> list[str]:
    """Import the usual libraries of math code and touch their lazy parts once."""
    loaded = []
    for name in PRELOAD:
        try:
            __import__(name)
            loaded.append(name)
        except Exception as e:  # noqa: BLE001 - an optional library missing is not fatal
            log.warning("preload: cannot import %s: %s", name, e)
    try:
        import sympy

        x = sympy.Symbol("x")
        sympy.solve(x**2 - 2 * x - 3, x)
        sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.factorint(360), sympy.Rational(1, 3) + sympy.Rational(1, 6), sympy.sqrt(8), sympy.pi.evalf(5)
        sympy.integrate(x**2, (x, 0, 1)), sympy.diff(sympy.exp(x) * x, x), sympy.latex(x / 2)
        sympy.Matrix([[1, 2], [3, 4]]).det(), sympy.binomial(10, 3), sympy.nsimplify(0.5)
    except Exception:  # noqa: BLE001
        pass
    try:
        import numpy

        numpy.linalg.solve(numpy.eye(2), numpy.ones(2)), numpy.mean(numpy.arange(10))
    except Exception:  # noqa: BLE001
        pass
    return loaded


# ------------------------------------------------------------------ worker side (runs in the forked child)
def worker_main(fds: dict[str, int], scratch: str, layers: list[str], strict: bool,
                readable: list[str], can_switch_uid: bool) -> None:
    """Enter the isolation layers, report ready, read one job, run it, exit. Never returns."""
    try:
        status = _enter_sandbox(fds, scratch, layers, strict, readable, can_switch_uid)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(3, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(EXIT_SETUP_FAILED)
    os.write(3, json.dumps(status).encode() + b"\n")
    if status.get("probe"):
        os._exit(0)
    _run_job()


def _enter_sandbox(fds, scratch, layers, strict, readable, can_switch_uid) -> dict:
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-large files fail with EFBIG instead of killing
    signal.set_wakeup_fd(-1)
    isolation.set_parent_death_signal(signal.SIGKILL)
    os.setsid()
    import fcntl

    # move every fd above the targets first, so no dup2 below clobbers a source
    high = {name: fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for name, fd in fds.items()}
    high["devnull"] = fcntl.fcntl(os.open("/dev/null", os.O_RDWR), fcntl.F_DUPFD, 100)
    for target, name in ((0, "job"), (1, "out"), (2, "err"), (3, "status"), (4, "devnull")):
        os.dup2(high[name], target)
    os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update(SAFE_ENV, HOME=scratch, TMPDIR=scratch)
    tempfile.tempdir = scratch
    sys.path[:] = [p for p in sys.path if any(p == r or p.startswith(r + os.sep) for r in readable)]
    sys.path_importer_cache.clear()
    for name in [m for m in sys.modules if m == "rstar" or m.startswith("rstar.")]:
        del sys.modules[name]
    for lim in (resource.RLIMIT_CORE, resource.RLIMIT_NOFILE):
        soft = 0 if lim == resource.RLIMIT_CORE else 64
        resource.setrlimit(lim, (soft, soft))

    active, errors, info = [], {}, {"probe": not strict}
    global _baseline_as
    _baseline_as = isolation.current_address_space()  # /proc is out of reach once Landlock is on
    for layer in layers:
        try:
            if layer == "rlimits":
                resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
            elif layer == "namespaces":
                if not namespaces_ok:
                    raise isolation.LayerUnavailable(namespaces_error)
            elif layer == "unprivileged":
                info["unprivileged_mode"] = isolation.apply_unprivileged(scratch, can_switch_uid)
            elif layer == "landlock":
                info["landlock_abi"] = isolation.apply_landlock(scratch, readable)
            elif layer == "seccomp":
                isolation.apply_seccomp()
            active.append(layer)
        except (isolation.LayerUnavailable, OSError) as e:
            if strict:
                raise
            errors[layer] = str(e)
    info.update(layers=active, errors=errors)
    global _lock_limits
    # without the unprivileged layer a root worker could raise its own limits again
    _lock_limits = "seccomp" in active and "unprivileged" not in active
    return info


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, _READ_CHUNK)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _run_job() -> None:
    try:
        job = json.loads(_read_all(0))
    except BaseException:  # noqa: BLE001 - the zygote closed the pipe without a job
        os._exit(EXIT_SETUP_FAILED)
    os.dup2(4, 0)
    os.close(4)
    os.close(3)  # the status channel closes before untrusted code runs, so it cannot forge one
    import builtins
    import io

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    try:
        wall = float(job["wall"])
        isolation.apply_job_rlimits(int(job["memory"]), int(math.ceil(wall)) + 1, int(job["file_bytes"]),
                                    _baseline_as)
        if _lock_limits:
            isolation.forbid_raising_limits()
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"[sandbox] cannot apply limits: {e}\n".encode())
        os._exit(EXIT_SETUP_FAILED)
    code = job["code"]
    del job
    rc = 0
    try:
        compiled = compile(code, "<program>", "exec")
        exec(compiled, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102 - the point of a sandbox
    except SystemExit as e:
        rc = _exit_code(e)
    except MemoryError:
        rc = EXIT_MEMORY
        _print_exception()
    except BaseException:  # noqa: BLE001
        rc = 1
        _print_exception()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - e.g. the program closed stdout
            pass
    os._exit(rc)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    try:
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _print_exception() -> None:
    try:
        etype, value, tb = sys.exc_info()
        tb = tb.tb_next if tb is not None else None  # hide this module's frame
        traceback.print_exception(etype, value, tb)
    except BaseException:  # noqa: BLE001 - out of memory while printing
        pass


# ------------------------------------------------------------------ zygote side
class Worker:
    def __init__(self, pid: int, scratch: str, job_w: int, out_r: int, err_r: int, st_r: int):
        self.pid, self.scratch = pid, scratch
        self.job_w, self.out_r, self.err_r, self.st_r = job_w, out_r, err_r, st_r
        self.status_buf = b""
        self.ready = False
        self.job: dict | None = None
        self.started = 0.0
        self.deadline = math.inf
        self.out, self.err = bytearray(), bytearray()
        self.cap = 0
        self.truncated = False
        self.killed_for: str | None = None
        self.exit_status: int | None = None
        self.open_streams = 2


class Zygote:
    def __init__(self, sock: socket.socket, cfg: dict):
        self.sock = sock
        self.cfg = cfg
        self.pool_size = int(cfg["pool_size"])
        self.max_concurrent = int(cfg["max_concurrent"])
        self.base = tempfile.mkdtemp(prefix="rstar-sandbox-", dir=cfg.get("scratch_root") or None)
        os.chmod(self.base, 0o711)
        self.readable = isolation.read_only_paths()
        # uid 65534 only if it can still import from the interpreter's directories
        self.can_switch_uid = (
            isolation.readable_by(isolation.NOBODY, isolation.NOBODY, isolation.interpreter_paths())
            and isolation.readable_by(isolation.NOBODY, isolation.NOBODY, [self.base], final_bit="x")
        )
        self.layers: list[str] = []
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, Worker] = {}  # by pid
        self.idle: collections.deque[Worker] = collections.deque()
        self.starting: set[int] = set()
        self.running: dict[int, Worker] = {}
        self.queue: collections.deque[dict] = collections.deque()
        self.deadlines: list[tuple[float, int]] = []
        self.reader = FrameReader()
        self.stopping = False
        self.setup_failures = 0
        self.last_stats: tuple | None = None

    # --------------------------------------------------------------- lifecycle
    def probe(self, wanted: list[str]) -> dict:
        w = self._fork(wanted, strict=False)
        os.close(w.job_w)
        w.job_w = -1
        data = _read_all(w.st_r)
        _, status = os.waitpid(w.pid, 0)
        self._discard(w)
        try:
            return json.loads(data)
        except ValueError:
            return {"layers": [], "errors": {"probe": f"probe worker failed (status {status}): {data[:200]!r}"}}

    def run(self) -> None:
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wfd)
        self.sel.register(rfd, selectors.EVENT_READ, ("sigchld", None))
        self.sock.setblocking(True)
        self.sel.register(self.sock, selectors.EVENT_READ, ("control", None))
        self._refill()
        while not self.stopping:
            timeout = None
            if self.deadlines:
                timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
            for key, _ in self.sel.select(timeout):
                kind, w = key.data
                if kind == "control":
                    self._on_control()
                elif kind == "sigchld":
                    try:
                        os.read(rfd, 4096)
                    except BlockingIOError:
                        pass
                elif kind == "status":
                    self._on_status(w)
                else:
                    self._on_output(w, kind)
            self._reap()
            self._expire()
            self._dispatch()
            self._refill()
            self._send_stats()
        self.shutdown()

    def shutdown(self) -> None:
        for w in list(self.workers.values()):
            _kill(w.pid)
        for w in list(self.workers.values()):
            try:
                os.waitpid(w.pid, 0)
            except ChildProcessError:
                pass
            self._discard(w)
        shutil.rmtree(self.base, ignore_errors=True)

    # --------------------------------------------------------------- workers
    def _fork(self, layers: list[str], strict: bool) -> Worker:
        scratch = tempfile.mkdtemp(prefix="run-", dir=self.base)
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                worker_main({"job": job_r, "out": out_w, "err": err_w, "status": st_w}, scratch, layers, strict,
                            self.readable, self.can_switch_uid)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        for fd in (job_r, out_w, err_w, st_w):
            os.close(fd)
        w = Worker(pid, scratch, job_w, out_r, err_r, st_r)
        self.workers[pid] = w
        return w

    def _refill(self) -> None:
        while not self.stopping and len(self.idle) + len(self.starting) < self.pool_size:
            w = self._fork(self.layers, strict=True)
            os.set_blocking(w.st_r, False)
            self.sel.register(w.st_r, selectors.EVENT_READ, ("status", w))
            self.starting.add(w.pid)

    def _on_status(self, w: Worker) -> None:
        try:
            data = os.read(w.st_r, 4096)
        except BlockingIOError:
            return
        if data:
            w.status_buf += data
            if w.status_buf.endswith(b"\n") and not w.ready:
                w.ready = True
                self.starting.discard(w.pid)
                self.idle.append(w)
                self.setup_failures = 0
            return
        self.sel.unregister(w.st_r)  # EOF: worker died before (or while) getting a job
        os.close(w.st_r)
        w.st_r = -1

    def _dispatch(self) -> None:
        while self.queue and self.idle and len(self.running) < self.max_concurrent:
            w = self.idle.popleft()
            if w.exit_status is not None or w.pid not in self.workers:
                continue
            self._start(w, self.queue.popleft())

    def _start(self, w: Worker, job: dict) -> None:
        wall = float(job["wall"])
        w.job = job
        w.cap = int(job["output"])
        w.started = time.monotonic()
        w.deadline = w.started + wall
        self.running[w.pid] = w
        heapq.heappush(self.deadlines, (w.deadline, w.pid))
        for fd, kind in ((w.out_r, "out"), (w.err_r, "err")):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, (kind, w))
        try:
            payload = json.dumps({k: job[k] for k in ("code", "wall", "memory", "file_bytes")}).encode()
            # the worker is blocked reading this pipe, so a blocking write completes
            os.write(w.job_w, payload) if len(payload) < 65536 else _write_all(w.job_w, payload)
        except OSError:
            pass  # worker died; reaping reports it
        os.close(w.job_w)
        w.job_w = -1

    def _on_output(self, w: Worker, kind: str) -> None:
        fd = w.out_r if kind == "out" else w.err_r
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self._close_stream(w, kind)
            return
        room = w.cap - len(w.out) - len(w.err)
        buf = w.out if kind == "out" else w.err
        if len(data) > room:
            buf += data[:max(room, 0)]
            w.truncated = True
            if w.killed_for is None:
                w.killed_for = "output"
                _kill(w.pid)
            self._close_stream(w, kind)
        else:
            buf += data

    def _close_stream(self, w: Worker, kind: str) -> None:
        fd = w.out_r if kind == "out" else w.err_r
        if fd < 0:
            return
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)
        if kind == "out":
            w.out_r = -1
        else:
            w.err_r = -1
        w.open_streams -= 1
        self._maybe_finish(w)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.get(pid)
            if w is None:
                continue
            w.exit_status = status
            if w.job is None:
                self._lost_idle(w)
            else:
                self._drain(w)
                self._maybe_finish(w)

    def _drain(self, w: Worker) -> None:
        """Read what is left in an exited worker's pipes; a pipe still held open elsewhere is closed."""
        _kill(w.pid)  # the process group: anything the program left behind
        for kind in ("out", "err"):
            while (w.out_r if kind == "out" else w.err_r) >= 0:
                before = (len(w.out), len(w.err), w.out_r, w.err_r)
                self._on_output(w, kind)
                if (len(w.out), len(w.err), w.out_r, w.err_r) == before:  # EAGAIN: a leftover holds the pipe
                    self._close_stream(w, kind)

    def _lost_idle(self, w: Worker) -> None:
        msg = w.status_buf.decode(errors="replace").strip()
        if os.WIFEXITED(w.exit_status) and os.WEXITSTATUS(w.exit_status) == EXIT_SETUP_FAILED:
            self.setup_failures += 1
            log.error("sandbox worker %d failed to enter its isolation layers: %s", w.pid, msg or "no detail")
            if self.setup_failures >= 20:
                self._fatal(f"workers keep failing to start: {msg}")
        elif not self.stopping:
            log.warning("idle sandbox worker %d died (status %d); replacing it", w.pid, w.exit_status)
        self.starting.discard(w.pid)
        try:
            self.idle.remove(w)
        except ValueError:
            pass
        self._discard(w)

    def _maybe_finish(self, w: Worker) -> None:
        if w.exit_status is None or w.open_streams > 0 or w.job is None:
            return
        job, w.job = w.job, None
        self.running.pop(w.pid, None)
        failure, code = classify(w.exit_status, w.killed_for)
        result = {
            "op": "result", "id": job["id"], "stdout": w.out.decode("utf-8", "replace"),
            "stderr": w.err.decode("utf-8", "replace"), "exit_code": code, "failure": failure,
            "duration": time.monotonic() - w.started, "truncated": w.truncated,
        }
        if failure == "timeout" and w.killed_for == "timeout":
            result["stderr"] += f"\n[sandbox] killed after the wall-time limit of {job['wall']:g} s\n"
        elif failure == "output_limit":
            result["stderr"] += f"\n[sandbox] killed: output exceeded {w.cap} bytes\n"
        self._discard(w)
        self._send(result)

    def _discard(self, w: Worker) -> None:
        for fd in (w.job_w, w.out_r, w.err_r, w.st_r):
            if fd >= 0:
                try:
                    self.sel.unregister(fd)
                except (KeyError, ValueError):
                    pass
                os.close(fd)
        w.job_w = w.out_r = w.err_r = w.st_r = -1
        self.workers.pop(w.pid, None)
        shutil.rmtree(w.scratch, ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, pid = heapq.heappop(self.deadlines)
            w = self.running.get(pid)
            if w is not None and w.killed_for is None and w.deadline <= now:
                w.killed_for = "timeout"
                _kill(pid)

    # --------------------------------------------------------------- control
    def _on_control(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.stopping = True  # the service went away
            return
        for msg in self.reader.feed(data):
            op = msg.get("op")
            if op == "run":
                self.queue.append(msg)
            elif op == "cancel":
                self._cancel(msg["id"])
            elif op == "stop":
                self.stopping = True

    def _cancel(self, job_id: int) -> None:
        for job in list(self.queue):
            if job["id"] == job_id:
                self.queue.remove(job)
                return
        for w in self.running.values():
            if w.job is not None and w.job["id"] == job_id and w.killed_for is None:
                w.killed_for = "cancel"
                _kill(w.pid)

    def _send(self, msg: dict) -> None:
        try:
            send_frame(self.sock, msg)
        except OSError:
            self.stopping = True

    def _send_stats(self) -> None:
        stats = (len(self.idle), len(self.running), len(self.queue))
        if stats != self.last_stats:
            self.last_stats = stats
            self._send({"op": "stats", "idle": stats[0], "running": stats[1], "queued": stats[2]})

    def _fatal(self, message: str) -> None:
        self._send({"op": "fatal", "message": message})
        self.stopping = True


def classify(status: int, killed_for: str | None) -> tuple[str, int]:
    """(failure kind, exit code) of a finished worker; signals give negative exit codes like subprocess."""
    if killed_for == "output":
        return "output_limit", -signal.SIGKILL
    if killed_for == "timeout":
        return "timeout", -signal.SIGKILL
    if killed_for == "cancel":
        return "killed", -signal.SIGKILL
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ("timeout" if sig == signal.SIGXCPU else "killed"), -sig
    code = os.WEXITSTATUS(status)
    if code == 0:
        return "ok", 0
    if code == EXIT_MEMORY:
        return "memory", code
    return "error", code


def _kill(pid: int) -> None:
    """SIGKILL a worker and its process group (it called setsid, so the group is its own)."""
    for fn in (os.killpg, os.kill):
        try:
            fn(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def main() -> None:
    """Entry point: `python -I -c ... zygote.main()` with the control socket fd and JSON config in argv."""
    fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    isolation.set_parent_death_signal(signal.SIGKILL)
    isolation.set_child_subreaper()  # orphans of a worker come back to us and get reaped
    sock = socket.socket(fileno=fd)
    loaded = preload()
    global namespaces_ok, namespaces_error
    if "namespaces" in cfg["layers"]:
        try:
            isolation.apply_namespaces()
            namespaces_ok = True
        except isolation.LayerUnavailable as e:
            namespaces_error = str(e)
    isolation.preload_seccomp()  # libseccomp is found via ldconfig: impossible once a worker is isolated
    zygote = Zygote(sock, cfg)
    try:
        probe = zygote.probe([layer for layer in isolation.LAYERS if layer in cfg["layers"]])
        zygote.layers = probe.get("layers", [])
        send_frame(sock, {"op": "hello", "pid": os.getpid(), "layers": zygote.layers,
                          "errors": probe.get("errors", {}), "landlock_abi": probe.get("landlock_abi", 0),
                          "unprivileged_mode": probe.get("unprivileged_mode", ""), "preloaded": loaded,
                          "python": sys.version.split()[0], "readable": zygote.readable})
        zygote.run()
    except BaseException:
        log.exception("sandbox fork server crashed")
        zygote.shutdown()
        raise
