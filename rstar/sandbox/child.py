"""The child side of the sandbox: what runs inside one forked worker, start to exit.

Responsibility: turn a fresh fork of the warm fork server into an isolated,
one-shot runner of one untrusted program. `worker_main`, called in the child right
after `fork()`, never returns:

1. Enter the sandbox: default signal handlers, parent-death signal, its own
   session; only its pipes on fds 0-4 (job, stdout, stderr, status, /dev/null);
   its scratch directory as cwd, HOME and TMPDIR; the clean `SAFE_ENV`; `sys.path`
   cut to the readable interpreter directories; the `rstar` modules dropped from
   `sys.modules`; then each requested isolation layer (`rstar.sandbox.isolation`;
   for `pidns` the fork server has already forked it into its PID namespace).
2. Report on the status pipe (`rstar.sandbox.protocol`): one JSON line with the
   layers entered, or an error and exit `EXIT_SETUP_FAILED`. A probe worker
   (strict=False: a layer that fails is reported, not fatal) exits here.
3. Block reading one job, close the status pipe (so the program cannot forge a
   report), set the job's rlimits on itself, run the program as `__main__`, print
   its traceback without this module's frame, flush and `os._exit` with the
   program's exit code (`EXIT_MEMORY` for MemoryError).

What it does not do: fork, watch the wall time or the output size, kill, reap or
classify the end (the fork server, `rstar.sandbox.forkserver`, does all of that
from outside, where the program cannot interfere), or talk to the service.
Everything it needs is imported before the fork: once the program runs, the
`rstar` package is out of `sys.modules` and, with Landlock, out of reach on disk.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import tempfile
import traceback
from typing import NamedTuple, NoReturn

from rstar.sandbox import isolation
from rstar.sandbox.protocol import EXIT_MEMORY, EXIT_SETUP_FAILED, SAFE_ENV, read_all


class _Entered(NamedTuple):
    status: dict        # reported on the status pipe
    baseline_as: int    # address space before the program (the job's memory limit adds to it)
    lock_limits: bool   # add a seccomp rule against setrlimit after applying the job's limits


def worker_main(fds: dict[str, int], scratch: str, layers: list[str], strict: bool, readable: list[str],
                can_switch_uid: bool, namespaces_error: str | None, pidns_error: str | None) -> NoReturn:
    """Enter the isolation layers, report ready, read one job, run it, exit. Never returns.

    `namespaces_error` is None when the fork server entered its namespaces (the
    worker inherits them), else why it could not; `pidns_error` likewise for the
    PID namespace the fork server forked this worker into.
    """
    try:
        entered = _enter_sandbox(fds, scratch, layers, strict, readable, can_switch_uid, namespaces_error,
                                 pidns_error)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(3, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(EXIT_SETUP_FAILED)
    os.write(3, json.dumps(entered.status).encode() + b"\n")
    if entered.status.get("probe"):
        os._exit(0)
    _run_job(entered.baseline_as, entered.lock_limits)


def _enter_sandbox(fds: dict[str, int], scratch: str, layers: list[str], strict: bool, readable: list[str],
                   can_switch_uid: bool, namespaces_error: str | None, pidns_error: str | None) -> _Entered:
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
    baseline_as = isolation.current_address_space()  # /proc is out of reach once Landlock is on
    for layer in layers:
        try:
            if layer == "rlimits":
                resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
            elif layer == "namespaces":
                if namespaces_error is not None:
                    raise isolation.LayerUnavailable(namespaces_error)
            elif layer == "pidns":
                if pidns_error is not None:
                    raise isolation.LayerUnavailable(pidns_error)
                isolation.apply_private_proc()
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
    # without the unprivileged layer a root worker could raise its own limits again
    return _Entered(info, baseline_as, "seccomp" in active and "unprivileged" not in active)


def _run_job(baseline_as: int, lock_limits: bool) -> NoReturn:
    try:
        job = json.loads(read_all(0))
    except BaseException:  # noqa: BLE001 - the fork server closed the pipe without a job
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
                                    baseline_as)
        if lock_limits:
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
        tb = tb.tb_next if tb is not None else None  # hide this module's frame (`_run_job`)
        traceback.print_exception(etype, value, tb)
    except BaseException:  # noqa: BLE001 - out of memory while printing
        pass
