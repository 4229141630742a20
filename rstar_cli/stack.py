"""Local stacks of the four services: start them as processes, wait for health, find and stop them.

`rstar up`, `rstar demo` and `rstar down` are thin commands over this module; the
integration tests use it too (through `rstar_cli.main`). The services are started
as `python -m <module>` subprocesses (the CLI imports no service), each in a
session of its own (a Ctrl-C in the terminal is `rstar up`'s to handle, which then
stops them in order), with two environment variables the services' shared
`rstar.server.serve` reads:

- `RSTAR_PARENT_PID` (foreground stacks: `rstar up` without `--detach`, `rstar demo`
  without `--keep`): the service ends when that process does, however it ends
  (SIGKILL, SIGTERM then SIGKILL, a closed terminal): it notices its parent is
  gone within half a second, drains, and is killed if the drain does not finish.
  So nothing outlives `rstar up` or keeps its ports.
- `RSTAR_RUN_DIR` (every stack): while it runs, each service keeps a pid file
  `RUN_DIR/<name>-<port>.pid` (JSON: service, module, pid, port, metrics_port,
  started_at, start_ticks, parent_pid). `rstar down` stops every live recorded
  service, foreground or detached, checking first that the pid is still that
  service (its /proc cmdline names the module and its start time matches), so a
  recycled pid is never signalled. Detached stacks are also listed in
  `RUN_DIR/services.json` (pids and endpoints).

Kubernetes pods set neither variable: they write no pid files and follow no parent.

Local stacks are authenticated (`auth=True`, what `rstar up` and `rstar demo` get): on
first start `rstar.auth.ensure_local_tokens` writes `$RSTAR_HOME/auth/` (the hashed
token table every service reads with `--auth-tokens`, the user token the CLI and
`SearchClient` send, the internal token search sends downstream with
`--downstream-token-file`), owner-only, and later starts reuse it. They speak
plaintext: every port binds loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rstar import auth as rstar_auth
from rstar.config import home_dir
from rstar.services import SERVICES as SERVICE_TABLE, START_ORDER

PARENT_PID_ENV = "RSTAR_PARENT_PID"  # read by rstar.server.serve (the CLI imports no service code)
RUN_DIR_ENV = "RSTAR_RUN_DIR"
STATE_FILE = "services.json"
METRICS_HOST = "127.0.0.1"  # /metrics of a local stack: loopback only


def _eprint(*a, **kw) -> None:
    print(*a, file=sys.stderr, **kw)


# ---------------------------------------------------------------- endpoints


@dataclass
class Endpoint:
    name: str
    address: str
    metrics_url: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_url.rsplit(":", 1)[1].split("/")[0])


def endpoints(host: str = "127.0.0.1", base_port: int | None = None,
              names: Iterable[str] | None = None) -> dict[str, Endpoint]:
    """The services' addresses: the default ports, or BASE+offset (metrics BASE+100+offset)."""
    wanted = set(SERVICE_TABLE if names is None else names)
    out = {}
    for name, spec in SERVICE_TABLE.items():
        if name not in wanted:
            continue
        port = spec.port if base_port is None else base_port + spec.offset
        mport = spec.metrics_port if base_port is None else base_port + 100 + spec.offset
        out[name] = Endpoint(name, f"{host}:{port}", f"http://{host}:{mport}/metrics")
    return out


def run_dir() -> Path:
    return home_dir() / "run"


def _home_of(env: dict[str, str]) -> Path:
    """`rstar.config.home_dir()` as a process with environment `env` sees it."""
    return Path(env.get("RSTAR_HOME", Path.home() / ".rstar")).expanduser()


def token_metadata(address: str) -> tuple[tuple[str, str], ...]:
    """Call metadata with the user token for `address` ($RSTAR_TOKEN, or a loopback stack's own),
    for the CLI's raw calls (`rstar status`'s Info); empty when there is none."""
    token = rstar_auth.user_token(address)
    return (("authorization", f"Bearer {token}"),) if token else ()


def health(address: str, timeout: float = 2.0) -> str:
    """grpc.health.v1 status of a service: SERVING, NOT_SERVING, UNREACHABLE or a status code name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
            else e.code().name


# ---------------------------------------------------------------- starting


def start_services(eps: dict[str, Endpoint], extra_env: dict[str, str] | None = None,
                   log_dir: Path | None = None, service_args: dict[str, list[str]] | None = None,
                   store_url: str | None = None, *, follow: bool = True,
                   record_dir: Path | None = None, auth: bool = True) -> dict[str, subprocess.Popen]:
    """Start the services named in `eps` (in START_ORDER) as subprocesses.

    With `store_url`, policy and PPM serve the registry's promoted versions (and hot-reload),
    search writes trees there. `follow`: the services end when this process does (a
    foreground stack); off for `--detach`. Every service records itself in `record_dir`
    (default: `run/` under the RSTAR_HOME the services see). /metrics binds loopback.
    `auth`: every service requires the stack's tokens (created on first start, see above)."""
    log_dir = log_dir or home_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[RUN_DIR_ENV] = str(record_dir or _home_of(env) / "run")
    if follow:
        env[PARENT_PID_ENV] = str(os.getpid())
    else:
        env.pop(PARENT_PID_ENV, None)
    all_eps = endpoints()
    all_eps.update(eps)  # search's downstream addresses: the stack's, else the default ports
    tokens = None
    if auth:
        tokens, created = rstar_auth.ensure_local_tokens(_home_of(env))
        if created:
            _eprint(f"created this stack's tokens in {tokens.directory} (the CLI sends {tokens.user.name}; "
                    f"other clients: RSTAR_TOKEN=$(cat {tokens.user}))")
    procs = {}
    for name in (n for n in START_ORDER if n in eps):
        ep = eps[name]
        args = [sys.executable, "-m", SERVICE_TABLE[name].module, "--port", str(ep.port),
                "--metrics-port", str(ep.metrics_port), "--metrics-host", METRICS_HOST]
        if name == "search":
            args += ["--policy-address", all_eps["policy"].address, "--ppm-address", all_eps["ppm"].address,
                     "--sandbox-address", all_eps["sandbox"].address]
        if store_url and name in ("policy", "ppm", "search"):
            args += ["--store-url", store_url]
        if tokens is not None:
            args += ["--auth-tokens", str(tokens.table)]
            if name == "search":
                args += ["--downstream-token-file", str(tokens.internal)]
        args += (service_args or {}).get(name, [])
        with open(log_dir / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=sandbox_env(env) if name == "sandbox" else env,
                                           start_new_session=True)
    return procs


# what the sandbox service may see of the user's environment: it runs untrusted programs, so
# no credentials (S3 keys, tokens, cloud variables) reach it, only what Python and the stack need
_SANDBOX_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONUNBUFFERED",
                     "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "RSTAR_HOME", RUN_DIR_ENV,
                     PARENT_PID_ENV)


def sandbox_env(env: dict[str, str]) -> dict[str, str]:
    """The sandbox service's environment: the allowed names above plus its own RSTAR_SANDBOX_* settings."""
    return {k: v for k, v in env.items() if k in _SANDBOX_ENV_KEEP or k.startswith("RSTAR_SANDBOX_")}


def busy_ports(eps: dict[str, Endpoint]) -> list[str]:
    """The endpoints whose gRPC or metrics port is already taken on this host."""
    out = []
    for name, ep in eps.items():
        for what, port in (("grpc", ep.port), ("metrics", ep.metrics_port)):
            if not port_free(port, "0.0.0.0" if what == "metrics" else ep.address.rsplit(":", 1)[0]):
                out.append(f"{name} {what} port {port}")
    return out


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            return True
        except OSError:
            return False


def check_ports(eps: dict[str, Endpoint]) -> bool:
    """False (and a message naming who holds them, when it is a recorded service) if a port is taken."""
    taken = busy_ports(eps)
    if taken:
        ports = {p for ep in eps.values() for p in (ep.port, ep.metrics_port)}
        owners = [r for r in live_services() if {r.port, r.metrics_port} & ports]
        why = ("held by " + ", ".join(r.describe() for r in owners) + "; stop them with `rstar down`") if owners \
            else "services already running? `rstar status`, `rstar down`, or pick other ports with --base-port"
        _eprint("error: in use: " + ", ".join(taken) + f" ({why})")
    return not taken


def wait_healthy(eps: dict[str, Endpoint], procs: dict[str, subprocess.Popen] | None = None,
                 timeout: float = 900.0, quiet: bool = False) -> None:
    """Wait until every service in `eps` is SERVING; RuntimeError if one exits, TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    pending = set(eps)
    start = time.monotonic()
    while pending:
        for name in sorted(pending):
            if procs and name in procs and procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {procs[name].returncode}; see its log "
                                   f"({home_dir() / 'logs' / (name + '.log')})")
            if health(eps[name].address, 1.0) == "SERVING":
                pending.discard(name)
                if not quiet:
                    _eprint(f"  {name:8s} SERVING after {time.monotonic() - start:5.1f} s")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(sorted(pending))}")
        if pending:
            time.sleep(0.5)


# ---------------------------------------------------------------- stopping


def _signal_group_or_pid(pid: int, sig: int) -> None:
    """Signal the service's process group when it leads one (started by `rstar up`), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_services(procs: dict[str, subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM every service (they drain), SIGKILL what is left after `grace` seconds; reaps them."""
    for p in procs.values():
        if p.poll() is None:
            _signal_group_or_pid(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group_or_pid(p.pid, signal.SIGKILL)
            p.wait()


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (see `signals_raise`); a BaseException, like KeyboardInterrupt, so
    no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn the first of `signums` into `Terminated` in the main thread (so `finally:` blocks stop
    the services in order); later ones are ignored while that shutdown runs. A no-op off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, _frame):
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    # Ctrl-C must stop the stack even when this process started with SIGINT ignored (a shell's
    # background job, nohup, some supervisors): Python then installs no KeyboardInterrupt handler
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- recorded services (rstar down)


@dataclass
class Recorded:
    """A service some stack recorded: from its pid file, or from services.json (older/detached records)."""

    name: str
    pid: int
    module: str
    port: int | None = None
    metrics_port: int | None = None
    started_at: float | None = None
    start_ticks: int | None = None
    path: Path | None = None  # the pid file, when it came from one

    def describe(self) -> str:
        where = f", port {self.port}" if self.port else ""
        return f"{self.name} (pid {self.pid}{where})"


def _proc_stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # fields from 3 on: state, ppid, ...


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return not (stat and stat[0] in ("Z", "X"))


def is_service(rec: Recorded) -> bool:
    """`rec.pid` is alive and still that service: its command line runs the module (`-m MODULE` or
    MODULE/__main__.py) and, where recorded, its start time matches (a recycled pid has another)."""
    if not pid_alive(rec.pid):
        return False
    try:
        argv = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return not Path("/proc/self").exists()  # no /proc (not Linux): trust the live pid
    args = [a.decode(errors="replace") for a in argv if a]
    if not any(a == rec.module or Path(a).parent.name == rec.module for a in args):
        return False
    if rec.start_ticks is not None:
        stat = _proc_stat(rec.pid)
        if stat is not None and len(stat) > 19 and int(stat[19]) != rec.start_ticks:
            return False
    return True


def recorded_services(where: Path | None = None) -> list[Recorded]:
    """Every record under the run dir, live or not (pid files first, then services.json)."""
    where = where or run_dir()
    out: list[Recorded] = []
    for path in sorted(where.glob("*.pid")):
        try:
            d = json.loads(path.read_text())
            out.append(Recorded(d["service"], int(d["pid"]), d["module"], d.get("port"), d.get("metrics_port"),
                                d.get("started_at"), d.get("start_ticks"), path))
        except (OSError, ValueError, KeyError, TypeError):
            out.append(Recorded(path.stem, -1, "", path=path))  # unreadable: stale
    state = where / STATE_FILE
    if state.exists():
        try:
            d = json.loads(state.read_text())
        except (OSError, ValueError):
            d = {}
        ports = {n: int(a.rsplit(":", 1)[1]) for n, a in d.get("endpoints", {}).items() if ":" in a}
        seen = {r.pid for r in out}
        for name, pid in d.get("pids", {}).items():
            if name in SERVICE_TABLE and pid not in seen:
                out.append(Recorded(name, int(pid), SERVICE_TABLE[name].module, ports.get(name)))
    return out


def live_services(where: Path | None = None) -> list[Recorded]:
    return [r for r in recorded_services(where) if r.pid > 0 and is_service(r)]


def write_state(procs: dict[str, subprocess.Popen], eps: dict[str, Endpoint], where: Path | None = None) -> Path:
    """List a detached stack in services.json (its services keep their own pid files too)."""
    where = where or run_dir()
    where.mkdir(parents=True, exist_ok=True)
    path = where / STATE_FILE
    state = {"pids": {n: p.pid for n, p in procs.items()},
             "endpoints": {n: e.address for n, e in eps.items() if n in procs}, "detached": True}
    if path.exists():  # another detached stack in the same home: keep its live entries
        try:
            old = json.loads(path.read_text())
            for n, pid in old.get("pids", {}).items():
                if n not in state["pids"] and n in SERVICE_TABLE and is_service(
                        Recorded(n, int(pid), SERVICE_TABLE[n].module)):
                    state["pids"][n] = pid
                    state["endpoints"][n] = old.get("endpoints", {}).get(n, "")
        except (OSError, ValueError, TypeError):
            pass
    path.write_text(json.dumps(state))
    return path


def stop_recorded(where: Path | None = None, grace: float = 20.0,
                  report: Callable[[str], None] = print) -> tuple[list[Recorded], int]:
    """Stop every live recorded service (SIGTERM, SIGKILL after `grace` s); remove stale records.
    Returns (the services stopped, how many stale records were removed)."""
    where = where or run_dir()
    records = recorded_services(where)
    live, stale = [], 0
    for r in records:
        if r.pid > 0 and is_service(r):
            if all(r.pid != x.pid for x in live):
                live.append(r)
        elif r.path is not None:
            stale += 1
            with contextlib.suppress(OSError):
                r.path.unlink()
    for r in live:
        _signal_group_or_pid(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(r.pid) for r in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    for r in live:
        killed = pid_alive(r.pid)
        if killed:
            _signal_group_or_pid(r.pid, signal.SIGKILL)
        report(f"stopped {r.describe()}" + (f" (killed after {grace:.0f} s)" if killed else ""))
        if r.path is not None:  # a service that was killed could not remove its own
            with contextlib.suppress(OSError):
                r.path.unlink()
    with contextlib.suppress(OSError):
        (where / STATE_FILE).unlink()
    return live, stale
