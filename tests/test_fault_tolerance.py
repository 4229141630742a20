"""Fault tolerance of the search path: real servers, real faults.

The policy and PPM services are the real servers (`policy_svc`, `ppm_svc`) with protocol fakes
as their cores; the sandbox is the real service with its worker pool; the search service is the
real one, in-process or (for SIGTERM) as `python -m search_svc`. Each test causes one fault:
- the policy server stopped mid-search, restarted on the same port and answering UNAVAILABLE
  while its model loads: the search waits (`wait_for_ready`, then retries within the budget)
  and completes inside its deadline; retries of a service that stays unavailable end with the
  retry budget or the request's deadline, whichever comes first;
- SIGTERM during a solve: the solve finishes inside the drain grace (longer than the old 10 s),
  new calls are refused, the process exits by itself;
- the sandbox's queue full (RESOURCE_EXHAUSTED): the client backs off and splits the batch, the
  search succeeds;
- a cancelled PPM Score stops between batches;
- the internal channels' keepalive and round_robin options, and round_robin sharing calls
  between two replicas.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_svc.config import PolicyConfig
from policy_svc.server import create_server as create_policy
from ppm_svc.config import PPMConfig
from ppm_svc.server import create_server as create_ppm
from rstar import clients
from rstar.clients import ClientSecurity, PolicyClient, SandboxClient, make_channel
from rstar.protocols import CallScope, GenerationItem, SamplingParams
from rstar.sandbox.config import SandboxConfig
from rstar.sandbox.pool import QueueFull
from rstar.v1 import common_pb2, ppm_pb2, ppm_pb2_grpc, sandbox_pb2, sandbox_pb2_grpc, search_pb2, \
    search_pb2_grpc
from rstar_testing.fakes import HashScorer, WalkPolicy
from sandbox_svc.server import create_server as create_sandbox
from search_svc.config import SearchConfig
from search_svc.server import create_server as create_search
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Tom has 3 boxes with 12 apples each. How many apples does he have?"
OUTAGE_S = float(os.environ.get("RSTAR_TEST_OUTAGE_S", "8"))   # the policy's downtime (issue: 30 s)
LOADING_S = 3.0                                                 # then UNAVAILABLE while "loading"
OLD_GRACE_S = 10.0                                              # serve()'s fixed grace before drain_grace_s


class Observed:
    """A protocol fake as a service core that counts calls, can be slowed down and held at a gate."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner = inner
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def generate(self, items, params, scope=None):
        with self._lock:
            self.calls += 1
            self.in_flight += 1
        try:
            self.entered.set()
            end = time.monotonic() + self.delay
            while not self.gate.is_set() or time.monotonic() < end:
                if scope is not None:
                    scope.check()
                time.sleep(0.01)
            return self.inner.generate(items, params, scope=scope)
        finally:
            with self._lock:
                self.in_flight -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


def start_policy(core, port: int = 0):
    return create_policy(PolicyConfig(port=port, metrics_port=-1), core=core).start()


@pytest.fixture(scope="module")
def sandbox():
    """The real sandbox service with room for a search's batches."""
    cfg = SandboxConfig(port=0, pool_size=2, max_concurrent=2, max_queue=64, max_programs=64, wall_seconds=5.0,
                        require_layers=["rlimits"])
    cfg.start_timeout = 60
    svc = create_sandbox(cfg).start()
    svc.load()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def ppm():
    svc = create_ppm(PPMConfig(port=0, metrics_port=-1), core=HashScorer(version="hash-ppm-ft")).start()
    yield svc
    svc.close()


def search_config(tmp_path, policy_address, ppm_address, sandbox_address, **kw) -> SearchConfig:
    return SearchConfig(port=0, metrics_port=-1, policy_address=policy_address, ppm_address=ppm_address,
                        sandbox_address=sandbox_address, store_url=str(tmp_path / "store"), health_poll_s=0.2,
                        **kw)


def solve_request(rollouts: int, k: int = 3, depth: int = 6, seed: int = 5) -> search_pb2.SolveRequest:
    return search_pb2.SolveRequest(problem=QUESTION, seed=seed, budget=search_pb2.Budget(
        rollouts=rollouts, candidates_per_expansion=k, max_depth=depth))


def wait_until(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------- a policy outage mid-search


def test_policy_outage_mid_search_then_back_completes_inside_the_deadline(tmp_path, sandbox, ppm):
    core = Observed(WalkPolicy(version="walk-ft"), delay=0.15)
    port = free_port()
    policy = start_policy(core, port)
    cfg = search_config(tmp_path, f"127.0.0.1:{port}", ppm.address, sandbox.address, retry_budget_s=60,
                        retry_max_backoff_s=1.0)
    search = create_search(cfg).start()
    search.load()   # until policy, ppm and sandbox answer ready
    deadline = OUTAGE_S + 60
    try:
        with grpc.insecure_channel(search.address) as ch:
            start = time.monotonic()
            fut = search_pb2_grpc.SearchServiceStub(ch).Solve.future(solve_request(rollouts=8), timeout=deadline)
            wait_until(lambda: core.calls >= 2 and core.in_flight > 0, 30, "the search to be generating")
            policy.close()                     # the server goes away with a Generate in flight
            down_at = time.monotonic()
            time.sleep(OUTAGE_S)
            assert not fut.done(), "the search must still be waiting for the policy"
            calls_before = core.calls
            # restarted on the same port (a pod behind its name): it answers UNAVAILABLE while its
            # model loads, as a real policy does for minutes, then the model is there
            policy = create_policy(PolicyConfig(port=port, metrics_port=-1)).start()
            time.sleep(LOADING_S)
            assert not fut.done()
            policy.servicer.slot.swap(core, "walk-ft")   # what the load step does
            resp = fut.result()
            elapsed = time.monotonic() - start
        assert elapsed < deadline and time.monotonic() - down_at >= OUTAGE_S + LOADING_S
        assert resp.stats.rollouts == 8 and {m.name: m.version for m in resp.model_versions}["policy"] == "walk-ft"
        assert core.calls > calls_before, "the search went on with the restarted policy"
    finally:
        search.close()
        policy.close()


def test_retries_end_with_the_budget_or_the_request_deadline_whichever_is_first():
    loading = create_policy(PolicyConfig(port=0, metrics_port=-1)).start()   # UNAVAILABLE until a model comes
    items = [GenerationItem("What is 2 + 3?", (), 1, 0)]
    try:
        for budget, deadline, within in ((1.5, None, (1.0, 4.0)), (60.0, 1.5, (1.0, 4.0))):
            client = PolicyClient(loading.address, timeout=30, retries=0, backoff=0.05, retry_budget_s=budget,
                                  max_backoff=0.2)
            scope = CallScope(None if deadline is None else time.monotonic() + deadline)
            start = time.monotonic()
            with pytest.raises(clients.DownstreamError) as e:
                client.generate(items, SamplingParams(), scope)
            took = time.monotonic() - start
            client.close()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details
            assert within[0] <= took <= within[1], (budget, deadline, took)
    finally:
        loading.close()


# ---------------------------------------------------------------- SIGTERM during a solve


def _health(address: str, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_sigterm_during_a_solve_lets_it_finish_inside_the_drain_grace(tmp_path, sandbox, ppm):
    core = Observed(WalkPolicy(version="walk-term"))
    policy = start_policy(core)
    port = free_port()
    env = {**os.environ, "RSTAR_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("RSTAR_INTERNAL_TOKEN", None)
    log = (tmp_path / "search.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "search_svc", "--port", str(port), "--metrics-port", "-1",
                             "--policy-address", policy.address, "--ppm-address", ppm.address,
                             "--sandbox-address", sandbox.address, "--store-url", str(tmp_path / "store"),
                             "--health-poll-s", "0.2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        def serving() -> bool:
            try:
                return _health(address) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until(serving, 90, "the search process to serve")
        with grpc.insecure_channel(address) as ch:
            core.gate.clear()   # hold the search inside a Generate call
            core.entered.clear()
            fut = search_pb2_grpc.SearchServiceStub(ch).Solve.future(solve_request(rollouts=2, depth=4),
                                                                     timeout=120)
            assert core.entered.wait(30)
            proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic()
            wait_until(lambda: not serving(), 10, "health to leave SERVING")   # new work goes elsewhere
            with grpc.insecure_channel(address) as fresh, pytest.raises(grpc.RpcError) as refused:
                search_pb2_grpc.SearchServiceStub(fresh).Solve(solve_request(rollouts=1), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(max(0.0, term_at + OLD_GRACE_S + 2 - time.monotonic()))   # past the old fixed grace
            assert proc.poll() is None and not fut.done()
            core.gate.set()
            resp = fut.result(timeout=60)
        assert resp.stats.rollouts == 2 and {m.name: m.version for m in resp.model_versions}["policy"] == "walk-term"
        assert proc.wait(30) == 0                 # it exits by itself once the drain is over
        assert time.monotonic() - term_at < SearchConfig().drain_grace_s
    finally:
        core.gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        policy.close()
    assert "shutting down" in (tmp_path / "search.log").read_text()


# ---------------------------------------------------------------- sandbox back-pressure


class Hog:
    """Keeps `n` slow programs in the sandbox at all times (n threads, one program each)."""

    CODE = "import time\ntime.sleep(0.2)\nprint('HOG')"

    def __init__(self, address: str, n: int):
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(address)
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self.channel)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self):
        req = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code=self.CODE)])
        while not self.stop.is_set():
            try:
                self.stub.Execute(req, timeout=30)
            except grpc.RpcError:
                time.sleep(0.002)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.channel.close()


@pytest.fixture
def tight_sandbox():
    """The real sandbox with room for 4 programs (2 running, 2 queued); records what it took and refused."""
    cfg = SandboxConfig(port=0, pool_size=2, max_concurrent=2, max_queue=2, max_programs=4, wall_seconds=5.0,
                        require_layers=["rlimits"])
    cfg.start_timeout = 60
    svc = create_sandbox(cfg).start()
    svc.load()
    pool = svc.core
    taken, refused = [], []
    execute = pool.execute

    def recording(programs, *a, **kw):
        ours = not any("HOG" in p for p in programs)
        try:
            out = execute(programs, *a, **kw)
        except QueueFull:
            if ours:
                refused.append(len(programs))
            raise
        if ours:
            taken.append(len(programs))
        return out

    pool.execute = recording
    yield svc, taken, refused
    svc.close()


def test_sandbox_client_backs_off_and_splits_a_batch_the_queue_cannot_take(tight_sandbox):
    svc, taken, refused = tight_sandbox
    client = SandboxClient(svc.address, timeout=30, retries=0, backoff=0.02, retry_budget_s=30, max_backoff=0.2)
    programs = [f"print({i} * 7)" for i in range(4)]
    try:
        with Hog(svc.address, 3):   # 3 of the 4 places taken all the time: only single programs fit
            wait_until(lambda: svc.core._outstanding >= 3, 10, "the hog to fill the queue")
            results = client.execute(programs, CallScope(time.monotonic() + 60))
    finally:
        client.close()
    assert [r.stdout for r in results] == [f"{i * 7}\n" for i in range(4)]   # in order across the splits
    assert all(r.failure == "ok" for r in results)
    assert 4 in refused and sum(taken) == 4 and max(taken) < 4


def test_search_succeeds_under_sandbox_back_pressure(tmp_path, tight_sandbox, ppm):
    svc, taken, refused = tight_sandbox
    policy = start_policy(WalkPolicy(version="walk-bp"))
    cfg = search_config(tmp_path, policy.address, ppm.address, svc.address, retry_backoff_s=0.02,
                        retry_max_backoff_s=0.2, retry_budget_s=60)
    search = create_search(cfg).start()
    search.load()
    try:
        with Hog(svc.address, 3), grpc.insecure_channel(search.address) as ch:
            wait_until(lambda: svc.core._outstanding >= 3, 10, "the hog to fill the queue")
            resp = search_pb2_grpc.SearchServiceStub(ch).Solve(solve_request(rollouts=2, depth=5), timeout=120)
    finally:
        search.close()
        policy.close()
    assert resp.stats.rollouts == 2 and resp.stats.executions > 0
    assert any(n > 1 for n in refused), "the search's batches met a full queue"
    assert sum(taken) == resp.stats.executions     # every program ran, in the parts that fitted


# ---------------------------------------------------------------- PPM cancellation between batches


class CountingForward:
    """Wraps the PPM's model: counts forward passes; the first one waits until released."""

    def __init__(self, model):
        self.__dict__.update(model=model, n=0, first=threading.Event(), release=threading.Event())

    def __call__(self, *a, **kw):
        self.n += 1
        if self.n == 1:
            self.first.set()
            self.release.wait(30)
        return self.model(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_cancelled_score_stops_between_batches(tiny_model_dir):
    from rstar.ppm import PPMScorer

    scorer = PPMScorer(tiny_model_dir, "tiny-ppm", batch_size=1, prefix_reuse=False)
    forward = CountingForward(scorer.model)
    scorer.model = forward
    service = create_ppm(PPMConfig(port=0, metrics_port=-1), core=scorer).start()
    prefixes = [common_pb2.Prefix(question=f"What is {i} + {i}?") for i in range(8)]   # 8 batches of 1
    try:
        with grpc.insecure_channel(service.address) as ch:
            fut = ppm_pb2_grpc.PPMServiceStub(ch).Score.future(ppm_pb2.ScoreRequest(prefixes=prefixes), timeout=60)
            assert forward.first.wait(30)
            fut.cancel()
            time.sleep(0.5)            # the server sees the cancellation while batch 1 runs
            forward.release.set()
            wait_until(lambda: not scorer._infer.locked(), 30, "the scorer to stop")
            assert forward.n == 1, f"{forward.n} of 8 batches ran though the call was cancelled during the first"
            assert fut.cancelled()
            # the service goes on serving
            resp = ppm_pb2_grpc.PPMServiceStub(ch).Score(ppm_pb2.ScoreRequest(prefixes=prefixes[:2]), timeout=60)
            assert len(resp.scores) == 2
    finally:
        forward.release.set()
        service.close()


# ---------------------------------------------------------------- channels: keepalive, round_robin


def _recording(monkeypatch):
    made: list[tuple[str, dict]] = []
    insecure, secure = grpc.insecure_channel, grpc.secure_channel

    def rec_insecure(target, options=None, *a, **kw):
        made.append((target, dict(options or ())))
        return insecure(target, options, *a, **kw)

    def rec_secure(target, creds, options=None, *a, **kw):
        made.append((target, dict(options or ())))
        return secure(target, creds, options, *a, **kw)

    monkeypatch.setattr(grpc, "insecure_channel", rec_insecure)
    monkeypatch.setattr(grpc, "secure_channel", rec_secure)
    return made


def _assert_balanced_keepalive(options: dict) -> None:
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000     # a restarted service is found within seconds


def test_search_builds_its_downstream_channels_with_keepalive_and_round_robin(monkeypatch, tmp_path):
    made = _recording(monkeypatch)
    cfg = search_config(tmp_path, "dns:///policy.test:50051", "dns:///ppm.test:50052", "dns:///sandbox.test:50053")
    service = create_search(cfg, store=object())
    try:
        by_target = dict(made)
        assert set(by_target) == {cfg.policy_address, cfg.ppm_address, cfg.sandbox_address}
        for options in by_target.values():
            _assert_balanced_keepalive(options)
    finally:
        service.close()
    made.clear()
    make_channel("dns:///policy.test:50051", ClientSecurity(tls=True)).close()   # the TLS path (gpu-prod)
    ((_, options),) = made
    _assert_balanced_keepalive(options)


def test_servers_accept_the_clients_keepalive_pings(monkeypatch):
    from rstar import server as scaffold

    made = []
    real = grpc.server

    def rec_server(*a, options=None, **kw):
        made.append(dict(options or ()))
        return real(*a, options=options, **kw)

    monkeypatch.setattr(grpc, "server", rec_server)
    handle = scaffold.create_grpc_server("policy", lambda server: [], port=0)
    handle.server.stop(0)
    options = made[0]
    assert options["grpc.keepalive_permit_without_calls"] == 1
    # a server that wants pings further apart than the clients send them answers GOAWAY too_many_pings
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= clients.KEEPALIVE_TIME_S * 1000
    assert options["grpc.max_connection_age_ms"] > 0   # clients re-resolve and find replicas added later


def test_round_robin_shares_calls_between_replicas():
    a, b = Observed(WalkPolicy(version="r")), Observed(WalkPolicy(version="r"))
    one, two = start_policy(a), start_policy(b)
    client = PolicyClient(f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}", timeout=10)   # one name, two pods
    try:
        for i in range(12):
            client.generate([GenerationItem("What is 2 + 3?", (), 1, i)], SamplingParams())
    finally:
        client.close()
        one.close()
        two.close()
    assert a.calls + b.calls == 12 and min(a.calls, b.calls) >= 4, (a.calls, b.calls)
