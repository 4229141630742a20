"""SandboxService over gRPC: contract, status codes, health, metrics, recovery, startup modes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rstar import metrics
from rstar.v1 import common_pb2, sandbox_pb2, sandbox_pb2_grpc
from rstar.sandbox.config import SandboxConfig
from sandbox_svc.server import create_server

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def service():
    config = SandboxConfig(port=0, pool_size=2, max_concurrent=2, max_queue=4, max_programs=6, wall_seconds=2.0,
                           require_layers=["rlimits"])
    config.start_timeout = 60
    svc = create_server(config).start()
    svc.load()                      # starts the pool this service owns
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    yield svc.handle, svc.core, channel
    channel.close()
    svc.close()                     # stops the server, then closes the pool


def stub(channel):
    return sandbox_pb2_grpc.SandboxServiceStub(channel)


def execute(channel, *codes, timeout=30, **limits):
    req = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code=c) for c in codes],
                                     limits=sandbox_pb2.Limits(**limits))
    return stub(channel).Execute(req, timeout=timeout)


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(channel, status, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health(channel) == status:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"health never became {status}")


def test_execute_returns_results_in_order_with_failure_kinds(service):
    _, _, channel = service
    resp = execute(channel, "print('a')", "1/0", "while True: pass", "print('x' * 10**6)",
                   "x = bytearray(10**10)", wall_seconds=0.5, output_bytes=1000)
    got = [(r.failure, r.exit_code) for r in resp.results]
    assert got == [(sandbox_pb2.OK, 0), (sandbox_pb2.ERROR, 1), (sandbox_pb2.TIMEOUT, -9),
                   (sandbox_pb2.OUTPUT_LIMIT, -9), (sandbox_pb2.MEMORY, 249)]
    assert resp.results[0].stdout == "a\n" and resp.results[3].truncated
    assert all(r.duration_seconds > 0 for r in resp.results)
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_runs_an_assembled_step_program(service):
    from rstar import steps

    prefix = ["<code>\n# Step 1: total apples\ntotal = 3 * 12\n<end_of_step>"]
    program = steps.assemble_program(prefix, "\n# Now print the final answer\nprint(total - 10)\n<end_of_code>")
    (r,) = execute(service[2], program).results
    assert (r.failure, r.stdout) == (sandbox_pb2.OK, "26\n")


@pytest.mark.parametrize("codes, limits", [
    ((), {}),
    (("print(1)",) * 7, {}),
    (("print(1)",), {"wall_seconds": -1}),
    (("print(1)",), {"wall_seconds": 1e9}),
    (("print(1)",), {"memory_bytes": -5}),
    (("print(1)",), {"output_bytes": 1 << 40}),
    (("x = 1\n" * 100_000,), {}),
])
def test_bad_requests_are_invalid_argument(service, codes, limits):
    with pytest.raises(grpc.RpcError) as e:
        execute(service[2], *codes, **limits)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details()


def test_full_queue_is_resource_exhausted(service):
    # max_concurrent 2 + max_queue 4 = 6 programs in flight at most
    channel = service[2]
    busy = stub(channel).Execute.future(sandbox_pb2.ExecuteRequest(
        programs=[sandbox_pb2.Program(code="import time\ntime.sleep(0.5)")] * 5), timeout=30)
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as e:
        execute(channel, "print(1)", "print(2)")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in e.value.details()
    assert len(busy.result().results) == 5
    assert len(execute(channel, *["print(1)"] * 6).results) == 6


def test_deadline_exceeded_leaves_the_service_healthy(service):
    _, sandbox, channel = service
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        execute(channel, "import time\ntime.sleep(20)", timeout=0.5, wall_seconds=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    deadline = time.monotonic() + 5
    while sandbox.state.running and time.monotonic() < deadline:  # the program was killed, not left running
        time.sleep(0.05)
    assert sandbox.state.running == 0
    assert execute(channel, "print(2)").results[0].stdout == "2\n"


def test_info_reports_layers_and_pool(service):
    _, sandbox, channel = service
    info = stub(channel).Info(common_pb2.InfoRequest(), timeout=5)
    assert info.service == "sandbox" and info.ready
    assert info.details["isolation_layers"] == ",".join(sandbox.state.layers)
    assert info.details["pool_size"] == "2"
    assert "sympy" in info.details["preloaded"]


def test_metrics_are_exported(service):
    port = metrics.start_metrics_server(0, host="127.0.0.1")
    execute(service[2], "print(1)")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert re.search(r'rstar_sandbox_executions_total\{outcome="ok"\} [1-9]', body)
    assert "rstar_sandbox_execution_seconds_bucket" in body
    assert re.search(r"rstar_sandbox_pool_size \d", body)
    assert "rstar_sandbox_queue_depth" in body
    assert 'rstar_sandbox_isolation_layer{layer="rlimits"} 1.0' in body
    assert 'rstar_rpc_requests_total{code="OK",method="Execute",service="sandbox"}' in body


def test_fork_server_crash_is_recovered(service):
    _, sandbox, channel = service
    old = sandbox.state.info["pid"]
    os.kill(old, signal.SIGKILL)
    wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
    wait_health(channel, health_pb2.HealthCheckResponse.SERVING, timeout=60)
    assert sandbox.state.info["pid"] != old and sandbox.state.restarts == 1
    assert execute(channel, "print(3)").results[0].stdout == "3\n"


# ---------------------------------------------------------------- the real process
def start_process(*flags, wrapper: str = ""):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "sandbox_svc", "--port", "0", "--metrics-port", "-1", *flags]
    if wrapper:
        cmd = [sys.executable, "-c", wrapper, *cmd[1:]]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc, pattern: str, timeout: float = 60) -> tuple[re.Match | None, str]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m, "".join(seen)
    return None, "".join(seen)


def test_python_m_sandbox_svc_serves_and_stops_on_sigterm():
    proc = start_process()
    try:
        m, log = read_until(proc, r"sandbox listening on port (\d+)")
        assert m, log
        channel = grpc.insecure_channel(f"127.0.0.1:{m.group(1)}")
        wait_health(channel, health_pb2.HealthCheckResponse.SERVING)
        assert execute(channel, "print(6 * 7)").results[0].stdout == "42\n"
        zygote = int(stub(channel).Info(common_pb2.InfoRequest(), timeout=5).details["pid"])
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        rest = proc.stdout.read()
        assert "sandbox stopped" in rest and "restarting" not in rest
        assert not Path(f"/proc/{zygote}").exists() or "zombie" in Path(f"/proc/{zygote}/status").read_text()
    finally:
        proc.kill()


# a container runtime whose seccomp profile predates Landlock: its syscalls fail with ENOSYS
NO_LANDLOCK = textwrap.dedent("""
    import errno, os, sys, pyseccomp as sc
    f = sc.SyscallFilter(sc.ALLOW)
    for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    f.load()
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
""")


def test_degrades_without_landlock_and_says_so():
    pytest.importorskip("pyseccomp")
    proc = start_process(wrapper=NO_LANDLOCK)
    try:
        m, log = read_until(proc, r"sandbox listening on port (\d+)")
        assert m, log
        channel = grpc.insecure_channel(f"127.0.0.1:{m.group(1)}")
        wait_health(channel, health_pb2.HealthCheckResponse.SERVING)
        details = stub(channel).Info(common_pb2.InfoRequest(), timeout=5).details
        assert "landlock" not in details["isolation_layers"].split(",")
        assert "Landlock not supported" in details["unavailable.landlock"]
        assert execute(channel, "print(1)").results[0].failure == sandbox_pb2.OK
        channel.close()
        proc.send_signal(signal.SIGTERM)
        _, rest = read_until(proc, r"sandbox stopped", timeout=20)
        assert "isolation layer landlock unavailable" in log + rest
    finally:
        proc.kill()


def test_refuses_to_start_below_the_required_layers():
    pytest.importorskip("pyseccomp")
    proc = start_process("--require-layers", "rlimits,seccomp,landlock", wrapper=NO_LANDLOCK)
    try:
        assert proc.wait(60) == 2
        out = proc.stdout.read()
        assert "cannot start" in out and "landlock" in out
    finally:
        proc.kill()
