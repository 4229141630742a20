"""Local stacks (issue 16, item 8): `rstar up`'s services end when it ends, however it ends
(SIGKILL; SIGTERM, then SIGKILL 10 s later; Ctrl-C), so nothing keeps the ports; `--detach`
stacks keep running and are recorded; `rstar down` finds and stops any recorded stack (detached,
foreground, or services started by hand with pid files) and never signals a recycled pid.

Real processes on free loopback ports: `rstar up --only sandbox,search` (the policy and PPM need
vLLM and a model; search without them stays NOT_SERVING but listens, which is all these tests
need), with one warm sandbox worker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rstar_cli import stack
from rstar_cli.stack import port_free

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 8.0  # "within a few seconds": the services notice their parent is gone within 0.5 s, then drain


def free_base() -> int:
    """A base port with BASE..BASE+3 and BASE+100..BASE+103 free on all interfaces."""
    for _ in range(200):
        base = random.randrange(20000, 40000, 10)
        if all(port_free(base + d) for d in (0, 1, 2, 3, 100, 101, 102, 103)):
            return base
    raise RuntimeError("no free base port")


def stack_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RSTAR_", "PYTEST_"))}
    env.update(RSTAR_HOME=str(home), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               RSTAR_SANDBOX_POOL_SIZE="1", RSTAR_SANDBOX_MAX_CONCURRENT="1", RSTAR_SEARCH_HEALTH_POLL_S="5")
    return env


def rstar(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rstar_cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(fn, timeout: float, what: str):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def pid_files(home: Path) -> dict[str, dict]:
    out = {}
    for p in (home / "run").glob("*.pid"):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # being written
        out[d["service"]] = d
    return out


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid` (the sandbox's fork server and its warm workers)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Up:
    """`rstar up` in a subprocess, and what it started."""

    def __init__(self, tmp_path: Path, *extra: str, only: str = "sandbox,search", env: dict | None = None):
        self.home = tmp_path / "home"
        self.env = {**stack_env(self.home), **(env or {})}
        self.base = free_base()
        self.names = only.split(",")
        self.eps = stack.endpoints("127.0.0.1", self.base, self.names)
        self.log = open(tmp_path / "up.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "rstar_cli.main", "up", "--only", only,
                                      "--base-port", str(self.base), "--no-registry", "--timeout", "300", *extra],
                                     cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pids: dict[str, int] = {}
        self.descendants: list[int] = []

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_started(self, timeout: float = 120) -> None:
        """Every selected service recorded and listening, the sandbox SERVING (its workers forked)."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"rstar up exited ({self.proc.returncode}):\n{self.output()}\n{self.logs()}")
            recs = pid_files(self.home)
            if set(recs) != set(self.names):
                return None
            states = {n: stack.health(self.eps[n].address, 1.0) for n in self.names}
            if states.get("sandbox", "SERVING") != "SERVING" or "UNREACHABLE" in states.values():
                return None
            return recs

        recs = wait_for(ready, timeout, "the stack to start")
        self.pids = {n: r["pid"] for n, r in recs.items()}
        for n, r in recs.items():
            assert r["port"] == self.eps[n].port and r["metrics_port"] == self.eps[n].metrics_port
            assert r["parent_pid"] == self.proc.pid and r["module"] == f"{n}_svc"
        self.descendants = [c for pid in self.pids.values() for c in children_of(pid)]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (self.home / "logs").glob("*.log"))

    def ports(self) -> list[int]:
        return [p for ep in self.eps.values() for p in (ep.port, ep.metrics_port)]

    def assert_all_gone(self, within: float = GONE_WITHIN_S) -> None:
        everything = list(self.pids.values()) + self.descendants
        wait_for(lambda: not any(stack.pid_alive(p) for p in everything), within,
                 f"services {self.pids} and their children {self.descendants} to end\n{self.logs()}")
        wait_for(lambda: all(port_free(p) for p in self.ports()), 3, f"ports {self.ports()} to be free")
        # they shut down cleanly (drained, removed their pid files) rather than being killed
        wait_for(lambda: not list((self.home / "run").glob("*.pid")), 3, "the pid files to go")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in list(self.pids.values()) + self.descendants:
            if stack.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def up(tmp_path):
    made: list[Up] = []

    def start(*extra: str, only: str = "sandbox,search", env: dict | None = None) -> Up:
        u = Up(tmp_path, *extra, only=only, env=env)
        made.append(u)
        return u

    yield start
    for u in made:
        u.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("only", ["sandbox", "sandbox,search"], ids=["running", "starting"])
def test_sigkill_of_rstar_up_ends_its_services(up, only):
    """Killed while it runs (everything SERVING) or while it still waits for health (search)."""
    u = up(only=only)
    u.wait_started()
    if only == "sandbox":
        wait_for(lambda: "Ctrl-C stops them all" in u.output(), 30, "rstar up to report the stack up")
    assert u.descendants, "the sandbox should have forked its fork server and a warm worker"
    u.proc.send_signal(signal.SIGKILL)
    u.proc.wait()
    u.assert_all_gone()
    # and the next `rstar up` on the same ports starts
    assert not stack.busy_ports(u.eps)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("only,stuck", [("sandbox", False), ("sandbox,search", False), ("sandbox", True)],
                         ids=["running", "starting", "stuck"])
def test_sigterm_then_sigkill_10s_later_ends_its_services(up, only, stuck):
    """As a supervisor stops a process: TERM, then KILL after 10 s. `stuck`: rstar up cannot act on
    the TERM at all (stopped), so it is the KILL that ends it, with no chance to clean up."""
    u = up(only=only)
    u.wait_started()
    if stuck:
        u.proc.send_signal(signal.SIGSTOP)
    u.proc.send_signal(signal.SIGTERM)
    try:
        u.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        u.proc.kill()
        u.proc.wait()
    u.assert_all_gone()


@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_stack(up):
    u = up(only="sandbox")
    u.wait_started()
    wait_for(lambda: "Ctrl-C stops them all" in u.output(), 30, "rstar up to report the stack up")
    u.proc.send_signal(signal.SIGINT)  # the terminal sends it to rstar up's group; the services have their own
    assert u.proc.wait(timeout=30) == 0, u.output()
    assert "stopping" in u.output()
    u.assert_all_gone(within=1)  # rstar up waited for them


@pytest.mark.timeout(180)
def test_rstar_down_stops_a_foreground_stack(up):
    u = up(only="sandbox")
    u.wait_started()
    out = rstar("down", env=u.env)
    assert out.returncode == 0, out.stderr
    assert f"stopped sandbox (pid {u.pids['sandbox']}, port {u.eps['sandbox'].port})" in out.stdout
    u.assert_all_gone(within=1)
    assert u.proc.wait(timeout=30) == 1  # rstar up saw its service go and stopped
    # rstar up may still have been in its health wait when the service went: either message says it
    assert "sandbox (code 0) exited" in u.output() or "sandbox exited with code 0" in u.output()
    assert rstar("down", env=u.env).stdout.strip() == "no services recorded"


@pytest.mark.timeout(180)
def test_detached_stack_keeps_running_and_down_stops_it(tmp_path):
    home = tmp_path / "home"
    env = stack_env(home)
    base = free_base()
    eps = stack.endpoints("127.0.0.1", base, ["sandbox"])
    out = rstar("up", "--only", "sandbox", "--base-port", str(base), "--no-registry", "--detach", env=env)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "detached" in out.stdout
        (rec,) = pid_files(home).values()
        state = json.loads((home / "run" / "services.json").read_text())
        assert state["pids"] == {"sandbox": rec["pid"]} and state["endpoints"] == {"sandbox": eps["sandbox"].address}
        time.sleep(1.5)  # well past the 0.5 s parent check: a detached service does not follow rstar up
        assert stack.pid_alive(rec["pid"]) and stack.health(eps["sandbox"].address) == "SERVING"
        # a second `rstar up` on the same ports names the running service
        again = rstar("up", "--only", "sandbox", "--base-port", str(base), "--no-registry", env=env)
        assert again.returncode == 1 and f"sandbox (pid {rec['pid']}" in again.stderr
        down = rstar("down", env=env)
        assert down.returncode == 0 and f"stopped sandbox (pid {rec['pid']}" in down.stdout
        assert not stack.pid_alive(rec["pid"]) and port_free(eps["sandbox"].port)
        assert not list((home / "run").iterdir())
    finally:
        for r in pid_files(home).values():
            if stack.pid_alive(r["pid"]):
                os.kill(r["pid"], signal.SIGKILL)


@pytest.mark.timeout(180)
def test_down_finds_services_started_another_way(tmp_path):
    """A service started by hand (not by `rstar up`, not in a session of its own) with RSTAR_RUN_DIR
    records itself; `rstar down` finds and stops it."""
    home = tmp_path / "home"
    env = stack_env(home)
    port, mport = free_base(), free_base() + 1
    log = open(tmp_path / "sandbox.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sandbox_svc", "--port", str(port), "--metrics-port", str(mport)],
                            cwd=ROOT, env={**env, "RSTAR_RUN_DIR": str(home / "run")}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        rec = wait_for(lambda: pid_files(home).get("sandbox"), 60, "the pid file")
        assert rec["pid"] == proc.pid and rec["port"] == port and rec["metrics_port"] == mport
        assert rec["start_ticks"] and rec["started_at"] <= time.time()
        # /metrics on loopback by default
        assert not port_free(mport, "127.0.0.1")
        down = rstar("down", env=env)
        assert down.returncode == 0, down.stderr
        assert down.stdout.strip() == f"stopped sandbox (pid {proc.pid}, port {port})"
        assert proc.wait(timeout=5) == 0  # a clean drain, not a kill
        assert not list((home / "run").glob("*.pid")) and port_free(port)
        assert rstar("down", env=env).stdout.strip() == "no services recorded"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(60)
def test_down_never_signals_a_pid_that_is_not_the_service(tmp_path):
    home = tmp_path / "home"
    run = home / "run"
    run.mkdir(parents=True)
    env = stack_env(home)
    # a live process that is not a service; one that names the module but started at another time
    # (a recycled pid); a dead pid; an unreadable file
    other = subprocess.Popen(["sleep", "60"])
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "sandbox_svc"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        def record(name: str, pid: int, **kw) -> None:
            (run / f"{name}-{pid}.pid").write_text(json.dumps(
                {"service": name, "module": f"{name}_svc", "pid": pid, "port": 1, **kw}))

        record("sandbox", other.pid)
        wait_for(lambda: b"sandbox_svc" in Path(f"/proc/{lookalike.pid}/cmdline").read_bytes(), 10, "exec")
        record("sandbox", lookalike.pid, start_ticks=1)
        record("search", dead.pid)
        (run / "ppm-9.pid").write_text("{not json")
        (run / "services.json").write_text(json.dumps({"pids": {"policy": other.pid}}))
        down = rstar("down", "--grace", "1", env=env)
        assert down.returncode == 0, down.stderr
        assert down.stdout.strip() == "no services running (removed 4 stale records)"
        assert other.poll() is None and lookalike.poll() is None  # untouched
        assert not list(run.iterdir())
        # the same check with the right start time: it is taken for the service (and stopped)
        ticks = int(Path(f"/proc/{lookalike.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        record("sandbox", lookalike.pid, start_ticks=ticks)
        down = rstar("down", "--grace", "5", env=env)
        assert down.stdout.strip() == f"stopped sandbox (pid {lookalike.pid}, port 1)"
        assert lookalike.wait(timeout=5) == -signal.SIGTERM
    finally:
        for p in (other, lookalike):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_down_with_nothing_recorded(tmp_path):
    out = rstar("down", env=stack_env(tmp_path / "home"))
    assert out.returncode == 0 and out.stdout.strip() == "no services recorded"


def test_up_rejects_unknown_services(tmp_path):
    out = rstar("up", "--only", "sandbox,nope", env=stack_env(tmp_path / "home"))
    assert out.returncode != 0 and "unknown service(s) nope" in out.stderr


# --------------------------------------------------------------------------- service settings (item 9)


def listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` ("127.0.0.1", "0.0.0.0", "::", ...)."""
    import ipaddress

    out = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # LISTEN
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                ip = ipaddress.ip_address(raw if width == 16 else raw[:4])
                out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


@pytest.mark.timeout(120)
def test_rstar_up_binds_grpc_and_metrics_to_loopback(up):
    u = up(only="sandbox", env={"RSTAR_SANDBOX_METRICS_HOST": "0.0.0.0"})  # `rstar up` passes --metrics-host
    u.wait_started()
    ep = u.eps["sandbox"]
    assert listening(ep.port) == {"127.0.0.1"}
    assert listening(ep.metrics_port) == {"127.0.0.1"}
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ep.metrics_port}/metrics", timeout=5) as r:
        assert b"rstar_service_ready" in r.read()


def test_metrics_host_and_reflection_settings():
    from rstar.config import build

    from policy_svc.config import PolicyConfig
    from ppm_svc.config import PPMConfig
    from rstar.sandbox.config import SandboxConfig
    from search_svc.config import SearchConfig

    for cls, prefix in ((PolicyConfig, "POLICY"), (PPMConfig, "PPM"), (SandboxConfig, "SANDBOX"),
                        (SearchConfig, "SEARCH")):
        default = build(cls, prefix, env={})
        assert default.metrics_host == "127.0.0.1" and default.reflection is True
        pod = build(cls, prefix, env={f"RSTAR_{prefix}_METRICS_HOST": "0.0.0.0", f"RSTAR_{prefix}_REFLECTION": "false"})
        assert pod.metrics_host == "0.0.0.0" and pod.reflection is False


@pytest.mark.parametrize("enabled", [True, False])
def test_reflection_is_switchable(enabled):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from rstar.sandbox.config import SandboxConfig
    from sandbox_svc.server import create_server

    service = create_server(SandboxConfig(port=0, reflection=enabled)).start()  # pool not started: cheap
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            if enabled:
                (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
                names = {s.name for s in resp.list_services_response.service}
                assert "rstar.v1.SandboxService" in names and "grpc.health.v1.Health" in names
            else:
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.ServerReflectionInfo(iter([request]), timeout=5))
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # health answers either way (probes)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        service.close()


@pytest.mark.timeout(180)
def test_the_sandbox_gets_no_credentials_from_rstar_up(up):
    """`rstar up` hands the sandbox service a clean environment: no S3 keys, no tokens."""
    u = up(only="sandbox,search", env={"RSTAR_S3_SECRET_KEY": "s3-secret-xyz", "AWS_SECRET_ACCESS_KEY": "aws-xyz",
                                       "RSTAR_SANDBOX_POOL_SIZE": "2"})
    u.wait_started()
    sandbox_env = open(f"/proc/{u.pids['sandbox']}/environ", "rb").read().split(b"\0")
    search_env = open(f"/proc/{u.pids['search']}/environ", "rb").read().split(b"\0")
    assert not any(b"xyz" in kv for kv in sandbox_env)
    assert b"RSTAR_SANDBOX_POOL_SIZE=2" in sandbox_env           # its own settings still reach it
    assert b"RSTAR_S3_SECRET_KEY=s3-secret-xyz" in search_env    # the search service keeps the store's


def test_sandbox_env_keeps_only_what_it_needs():
    env = {"PATH": "/bin", "RSTAR_SANDBOX_WALL_SECONDS": "3", "RSTAR_S3_ACCESS_KEY": "k", "GITHUB_TOKEN": "t",
           "HOME": "/root", "OPENAI_API_KEY": "o"}
    assert stack.sandbox_env(env) == {"PATH": "/bin", "RSTAR_SANDBOX_WALL_SECONDS": "3", "HOME": "/root"}
