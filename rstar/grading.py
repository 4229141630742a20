"""Answer equivalence ("grading"), spec section 1: the one grader of the project.

`grade(predicted, gold)` decides whether an answer equals the gold answer and
says which path decided; `answers_equal` is its boolean. Search (terminal
values), synthesis labels, majority votes and `rstar eval` all call it, so a
tree and an eval report cannot disagree on whether an answer is right.

The paths, in order:
1. exact match after normalisation (`normalize`), in-process;
2. numeric equality (relative tolerance 1e-4, percentages with or without the
   sign, simple fractions), in-process;
3. symbolic equality via `math-verify` (sympy), in a small pool of worker
   processes with a deadline of `SYMBOLIC_TIMEOUT_S` per comparison.

Why worker processes: math-verify bounds its own time with `signal.alarm`,
which works only in the main thread; called from a gRPC handler thread it
fails and the verdict silently became False (`\\sqrt{2}` vs `2^{1/2}`). We call
math-verify with its timeouts disabled (`parsing_timeout=None`,
`timeout_seconds=None`) and bound the time ourselves. A thread cannot be
interrupted inside sympy's C-level big-number arithmetic (`9^{9^{9^9}}`), but a
process can be killed: a comparison that misses its deadline is "not equal",
its worker is killed and replaced, and nothing keeps burning CPU. The verdict
is therefore the same in any thread. Results of the symbolic path are cached
(LRU), as the same pairs recur across a search and a vote.

Never raises on odd input: unparsable means "not equal". This module does not
find answers in text (`rstar.steps` does) and does not decide which step is an
answer. It must stay importable on its own (stdlib imports only at module
level): the worker processes load this file by path, without the `rstar`
package.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

log = logging.getLogger(__name__)

_REL_TOL = 1e-4

# The symbolic check's deadline per comparison, start-up of a worker excluded. Below 2 s so
# that a pathological pair, killed at the deadline, is answered within 2 s end to end.
SYMBOLIC_TIMEOUT_S = 1.5
WORKERS = max(1, min(2, os.cpu_count() or 1))
STARTUP_TIMEOUT_S = 60.0     # importing sympy on a loaded machine can take several seconds
ACQUIRE_TIMEOUT_S = 30.0     # waiting for a free worker (each is busy for at most the deadline)
CACHE_SIZE = 8192

# grade() methods: which path decided
NONE, EXACT, NUMERIC, SYMBOLIC, SYMBOLIC_TIMEOUT, SYMBOLIC_UNAVAILABLE = (
    "none", "exact", "numeric", "symbolic", "symbolic_timeout", "symbolic_unavailable")


@dataclass(frozen=True)
class Verdict:
    equal: bool
    method: str    # NONE (an empty side), EXACT, NUMERIC, SYMBOLIC, SYMBOLIC_TIMEOUT, SYMBOLIC_UNAVAILABLE

    def __bool__(self) -> bool:
        return self.equal


def normalize(ans: str) -> str:
    s = str(ans).strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", s)
    if boxed:
        s = boxed.group(1)
    s = s.replace("\\$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    return s.lower()


def _to_number(s: str) -> float | None:
    t = s.replace(",", "")
    pct = t.endswith("%") or t.endswith("\\%")
    t = t.rstrip("%").rstrip("\\")
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", t) or re.fullmatch(r"(-?\d+)/(-?\d+)", t)
    try:
        if m:
            val = float(Fraction(int(m.group(1)), int(m.group(2))))
        else:
            val = float(t)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return val / 100.0 if pct else val


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(1.0, abs(a), abs(b))


def grade(predicted: str | None, gold: str | None) -> Verdict:
    """Whether `predicted` equals `gold`, and which path decided (same verdict in any thread)."""
    if predicted is None or gold is None:
        return Verdict(False, NONE)
    p, g = normalize(predicted), normalize(gold)
    if not p or not g:
        return Verdict(False, NONE)
    if p == g:
        return Verdict(True, EXACT)
    pn, gn = _to_number(p), _to_number(g)
    if pn is not None and gn is not None:
        # a percentage may be written with or without the sign
        return Verdict(_close(pn, gn) or _close(pn * 100, gn) or _close(pn, gn * 100), NUMERIC)
    return _symbolic(str(predicted), str(gold))


def answers_equal(predicted: str | None, gold: str | None) -> bool:
    return grade(predicted, gold).equal


def warm_up(wait: bool = True) -> None:
    """Start the symbolic workers now (services call this at start so the first grading is fast)."""
    _get_pool().warm_up(wait)


def shutdown() -> None:
    """Kill the symbolic workers (they are restarted on the next symbolic comparison)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


# --------------------------------------------------------------------------- the symbolic path

_CACHE: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _symbolic(predicted: str, gold: str) -> Verdict:
    key = (predicted, gold)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    verdict = _get_pool().compare(predicted, gold)
    # "unavailable" is not a property of the pair: do not remember it. A timeout is (the same
    # pathological pair would burn the deadline again each time it recurs).
    if verdict.method != SYMBOLIC_UNAVAILABLE:
        with _CACHE_LOCK:
            _CACHE[key] = verdict
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    return verdict


def _wrap(ans: str) -> str:
    ans = ans.strip()
    return ans if "$" in ans or "\\boxed" in ans else f"${ans}$"


def _math_verify_equal(predicted: str, gold: str) -> bool:
    """math-verify's verdict with its own (signal-based) timeouts off; runs inside a worker."""
    from math_verify import parse, verify

    g = parse(_wrap(gold), parsing_timeout=None)
    p = parse(_wrap(predicted), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


class _WorkerGone(Exception):
    """The worker process exited or closed its pipe."""


# How a worker process starts: load this file by path as a stand-alone module (no `rstar`
# package import, no script directory on sys.path) and serve requests on stdin/stdout.
_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "spec = importlib.util.spec_from_file_location('_rstar_grading_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n"
)


def _worker_main() -> None:  # pragma: no cover - runs in the worker process
    """One JSON line `[predicted, gold]` in, one line `1`/`0` out, until stdin closes."""
    import resource

    logging.disable(logging.CRITICAL)   # math-verify warns that its timeout is off: we know
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # whatever a library prints must not enter the protocol
    try:
        # one comparison before saying ready: sympy initialises lazily, and that first-call cost
        # must not count against a real comparison's deadline
        _math_verify_equal("x+1", "1+x")
    except ImportError:
        proto.write("unavailable\n")
        return
    except Exception:  # noqa: BLE001 - a failing warm-up is not a failing worker
        pass
    proto.write("ready\n")
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    for line in sys.stdin:
        # A safety net for a worker orphaned mid-comparison (its parent died and cannot kill it):
        # the kernel ends it after a few more CPU seconds, even inside C code.
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime) + 1
        try:
            limit = cpu + 10 if hard == resource.RLIM_INFINITY else min(cpu + 10, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))
        except (ValueError, OSError):
            pass
        try:
            predicted, gold = json.loads(line)
            eq = _math_verify_equal(str(predicted), str(gold))
        except Exception:  # noqa: BLE001 - any failure to compare is "not equal"
            eq = False
        proto.write("1\n" if eq else "0\n")


class _Worker:
    """One long-lived worker process and its line protocol (read with deadlines, no threads)."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self._buf = b""
        self.ready = False

    def _readline(self, timeout: float) -> bytes | None:
        """A line (without newline), or None at the deadline; raises _WorkerGone on EOF."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        poller = select.poll()          # not select(): a busy service may hold fds above FD_SETSIZE
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(max(1, int(left * 1000))):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise _WorkerGone()
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, timeout: float) -> bool:
        if self.ready:
            return True
        line = self._readline(timeout)
        self.ready = line == b"ready"
        return self.ready

    def ask(self, predicted: str, gold: str, timeout: float) -> bool | None:
        """The verdict, or None when the deadline passed (the caller kills this worker)."""
        try:
            self.proc.stdin.write(json.dumps([predicted, gold]).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerGone() from e
        line = self._readline(timeout)
        if line is None:
            return None
        return line.strip() == b"1"

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Up to `size` workers; a caller checks one out per comparison, so callers never share a pipe."""

    def __init__(self, size: int):
        self.size = size
        self.pid = os.getpid()
        self._idle: list[_Worker] = []
        self._count = 0
        self._cv = threading.Condition()
        self._broken_until = 0.0       # after a failed start, do not retry for a while
        self._closed = False

    def warm_up(self, wait: bool) -> None:
        workers = []
        for _ in range(self.size):
            w = self._acquire(0.0)
            if w is None:
                break
            workers.append(w)
        for w in workers:
            ok = True
            if wait:
                try:
                    ok = w.wait_ready(STARTUP_TIMEOUT_S)
                except _WorkerGone:
                    ok = False
            self._release(w, ok)

    def _acquire(self, timeout: float) -> _Worker | None:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                if self._closed or time.monotonic() < self._broken_until:
                    return None
                dead = [w for w in self._idle if w.proc.poll() is not None]
                for w in dead:                  # exited while idle (killed from outside, OOM): forget it
                    self._idle.remove(w)
                    self._count -= 1
                    w.kill()
                if self._idle:
                    # a started worker first; a replacement may still be importing sympy
                    ready = [i for i, w in enumerate(self._idle) if w.ready]
                    return self._idle.pop(ready[-1] if ready else -1)
                if self._count < self.size:
                    self._count += 1
                    break
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
        try:
            return _Worker()
        except OSError as e:
            log.warning("grading: cannot start a math-verify worker (%s); symbolic answers grade as not equal", e)
            with self._cv:
                self._count -= 1
                self._broken_until = time.monotonic() + 60.0
                self._cv.notify()
            return None

    def _release(self, w: _Worker, ok: bool) -> None:
        """Return a healthy worker; kill a stuck or dead one and start its replacement at once
        (its start-up overlaps whatever the caller does next)."""
        replacement = None
        if not ok:
            w.kill()
            if not self._closed:
                try:
                    replacement = _Worker()
                except OSError:
                    replacement = None
        with self._cv:
            if ok:
                self._idle.append(w)
            elif replacement is not None:
                self._idle.append(replacement)
            else:
                self._count -= 1
            self._cv.notify()

    def compare(self, predicted: str, gold: str) -> Verdict:
        for _attempt in range(2):       # one retry when a worker died under us (not on a timeout)
            w = self._acquire(ACQUIRE_TIMEOUT_S)
            if w is None:
                return Verdict(False, SYMBOLIC_UNAVAILABLE)
            try:
                started = w.wait_ready(STARTUP_TIMEOUT_S)
            except _WorkerGone:
                started = False
            if not started:
                log.warning("grading: math-verify worker did not start; symbolic answers grade as not equal")
                w.kill()
                with self._cv:
                    self._count -= 1
                    self._broken_until = time.monotonic() + 60.0
                    self._cv.notify()
                return Verdict(False, SYMBOLIC_UNAVAILABLE)
            try:
                res = w.ask(predicted, gold, SYMBOLIC_TIMEOUT_S)
            except _WorkerGone:
                self._release(w, ok=False)
                continue
            if res is None:
                log.info("grading: symbolic check of %.80r vs %.80r passed %.1f s; not equal",
                         predicted, gold, SYMBOLIC_TIMEOUT_S)
                self._release(w, ok=False)
                return Verdict(False, SYMBOLIC_TIMEOUT)
            self._release(w, ok=True)
            return Verdict(res, SYMBOLIC)
        return Verdict(False, SYMBOLIC_UNAVAILABLE)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cv.notify_all()
        for w in idle:
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _get_pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        # after a fork the child must not talk to its parent's workers: it gets its own
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(WORKERS)
        return _POOL


atexit.register(shutdown)
