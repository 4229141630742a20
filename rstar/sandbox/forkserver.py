"""The fork server: one warm interpreter that forks an isolated worker per execution.

Responsibility: the loop of the fork-server process and nothing inside a worker.
The service's `Sandbox` (`rstar.sandbox.pool`) starts this module as a separate
process (never forking the multi-threaded gRPC process itself) with a clean
environment. `main` imports the common libraries of math code once (`preload`),
enters the shared namespaces, sends a probe worker to find which isolation layers
work, says hello, then runs `ForkServer.run`, a single-threaded loop (selectors +
SIGCHLD wakeup fd) that:

- keeps `pool_size` workers forked ahead of demand (each has already entered its
  isolation layers and blocks on its job pipe) and refills the pool as they are used;
- queues jobs from the control socket, hands each to exactly one idle worker
  (`max_concurrent` at most running), which exits afterwards, so nothing leaks
  between runs;
- forks each worker into a PID namespace of its own when `pidns` is wanted
  (`isolation.PidNamespaces`), with a scratch directory of its own that is a
  size-capped tmpfs where the fork server may mount (`rstar.sandbox.scratch`);
- enforces the wall-time limit, the output cap and the disk cap from outside the
  worker (SIGKILL to its process group), honours cancels, reaps every child,
  removes each worker's scratch directory, and classifies how each run ended
  (`classify`);
- reports results, pool stats and fatal errors to the service.

What it does not do: run untrusted code or apply isolation to itself beyond the
shared namespaces (the forked child does, `rstar.sandbox.child`), define the
frames and messages it speaks (`rstar.sandbox.protocol`), or know about batches,
deadlines of callers, restarts or metrics (the pool in the service does).
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time

from rstar.sandbox import isolation
from rstar.sandbox.scratch import POLL_SECONDS, Scratch, enter_private_mounts
from rstar.sandbox.child import worker_main
from rstar.sandbox.protocol import (EXIT_MEMORY, EXIT_SETUP_FAILED, READ_CHUNK, FrameReader, read_all,
                                    send_frame, write_all)

log = logging.getLogger("rstar.sandbox.forkserver")

PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools", "collections",
           "heapq", "bisect", "random", "re", "string", "operator", "datetime", "json", "numpy", "sympy")


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


# ------------------------------------------------------------------ the loop
class Worker:
    """The fork server's view of one forked worker: its pipes, its job, what it printed, how it ended."""

    def __init__(self, pid: int, scratch: str, job_w: int, out_r: int, err_r: int, st_r: int,
                 holder: tuple[int, int] | None):
        self.pid, self.scratch = pid, scratch
        # (pid, pipe fd) of the init of its PID namespace; closing the pipe ends it
        self.holder_pid, self.holder_w = holder if holder is not None else (0, -1)
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


class ForkServer:
    """The warm pool and the selector loop around it; `cfg` is the JSON config the pool passes in argv."""

    def __init__(self, sock: socket.socket, cfg: dict, namespaces_error: str | None, mounts_error: str | None):
        self.sock = sock
        self.namespaces_error = namespaces_error  # None: namespaces entered (workers inherit them)
        self.pool_size = int(cfg["pool_size"])
        self.max_concurrent = int(cfg["max_concurrent"])
        self.base = tempfile.mkdtemp(prefix="rstar-sandbox-", dir=cfg.get("scratch_root") or None)
        os.chmod(self.base, 0o711)
        self.scratch = Scratch(self.base, int(cfg["disk_bytes"]), int(cfg["disk_files"]), tmpfs=mounts_error is None)
        self.mounts_error = mounts_error
        self.pidns = isolation.PidNamespaces() if "pidns" in cfg["layers"] else None
        self.last_disk_check = 0.0
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
        data = read_all(w.st_r)
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
            if self.running:
                timeout = min(timeout if timeout is not None else POLL_SECONDS, POLL_SECONDS)
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
            self._check_disk()
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
        scratch = self.scratch.create()
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        holder, pidns_error = None, "disabled by configuration"
        if "pidns" in layers and self.pidns is not None:
            try:
                holder, pidns_error = self.pidns.enter(), None
            except (isolation.LayerUnavailable, OSError) as e:
                pidns_error = str(e)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if holder is not None and pid != 0:  # the parent only: the child stays where it was born
                self.pidns.leave()
        if pid == 0:
            try:
                worker_main({"job": job_r, "out": out_w, "err": err_w, "status": st_w}, scratch, layers, strict,
                            self.readable, self.can_switch_uid, self.namespaces_error, pidns_error)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        for fd in (job_r, out_w, err_w, st_w):
            os.close(fd)
        w = Worker(pid, scratch, job_w, out_r, err_r, st_r, holder)
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
            write_all(w.job_w, payload)  # the worker is blocked reading this pipe, so a blocking write completes
        except OSError:
            pass  # worker died; reaping reports it
        os.close(w.job_w)
        w.job_w = -1

    def _on_output(self, w: Worker, kind: str) -> None:
        fd = w.out_r if kind == "out" else w.err_r
        try:
            data = os.read(fd, READ_CHUNK)
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
        if w.killed_for is None and w.exit_status != 0 and self.scratch.exceeded(w.scratch):
            w.killed_for = "disk"  # it died of ENOSPC (or of what it did about it) before the next check
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
        elif w.killed_for == "disk":
            result["stderr"] += f"\n[sandbox] killed: files written exceeded the disk cap ({self.scratch.describe()})\n"
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
        if w.holder_w >= 0:
            os.close(w.holder_w)  # the holder exits, which ends the PID namespace (reaped as a stranger)
        w.job_w = w.out_r = w.err_r = w.st_r = w.holder_w = -1
        if self.workers.pop(w.pid, None) is not None:
            self.scratch.remove(w.scratch)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, pid = heapq.heappop(self.deadlines)
            w = self.running.get(pid)
            if w is not None and w.killed_for is None and w.deadline <= now:
                w.killed_for = "timeout"
                _kill(pid)

    def _check_disk(self) -> None:
        now = time.monotonic()
        if not self.running or now - self.last_disk_check < POLL_SECONDS:
            return
        self.last_disk_check = now
        for w in self.running.values():
            if w.killed_for is None and w.exit_status is None and self.scratch.exceeded(w.scratch, w.pid):
                w.killed_for = "disk"
                _kill(w.pid)

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
    if killed_for == "disk":  # a sandbox rule ended it: KILLED, with the reason on stderr
        return "killed", -signal.SIGKILL if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
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


def main() -> None:
    """Entry point: `python -I -c ... forkserver.main()` with the control socket fd and JSON config in argv."""
    fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    isolation.set_parent_death_signal(signal.SIGKILL)
    isolation.set_child_subreaper()  # orphans of a worker come back to us and get reaped
    sock = socket.socket(fileno=fd)
    loaded = preload()
    namespaces_error: str | None = "disabled by configuration"
    if "namespaces" in cfg["layers"]:
        try:
            isolation.apply_namespaces()
            namespaces_error = None
        except isolation.LayerUnavailable as e:
            namespaces_error = str(e)
    mounts_error = enter_private_mounts()  # after the user namespace: it grants the right to mount
    if mounts_error is not None:
        log.warning("sandbox scratch directories are not tmpfs (%s): the disk cap is enforced by scanning",
                    mounts_error)
    isolation.preload_seccomp()  # libseccomp is found via ldconfig: impossible once a worker is isolated
    server = ForkServer(sock, cfg, namespaces_error, mounts_error)
    try:
        probe = server.probe([layer for layer in isolation.LAYERS if layer in cfg["layers"]])
        server.layers = probe.get("layers", [])
        send_frame(sock, {"op": "hello", "pid": os.getpid(), "layers": server.layers,
                          "errors": probe.get("errors", {}), "landlock_abi": probe.get("landlock_abi", 0),
                          "unprivileged_mode": probe.get("unprivileged_mode", ""), "preloaded": loaded,
                          "scratch": server.scratch.mode, "disk_cap": server.scratch.describe(),
                          "python": sys.version.split()[0]})
        server.run()
    except BaseException:
        log.exception("sandbox fork server crashed")
        server.shutdown()
        raise
