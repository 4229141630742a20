"""The real search gRPC server, in-process, against tiny fake policy/PPM/sandbox gRPC servers.

The fakes implement the real protos (policy.proto, ppm.proto, sandbox.proto) on
top of the deterministic protocol fakes, so the clients, servicer, validation,
deadlines, streaming and synthesis are exercised over real gRPC.
"""

import json
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rstar.store import LocalStore
from rstar.v1 import (common_pb2, policy_pb2, policy_pb2_grpc, ppm_pb2, ppm_pb2_grpc, sandbox_pb2,
                      sandbox_pb2_grpc, search_pb2, search_pb2_grpc)
from rstar import trees as tj
from rstar.clients import PolicyClient
from search_svc.config import SearchConfig
from rstar.search.engine import CallScope
from rstar_testing.fakes import HashScorer, InProcessExecutor, WalkPolicy
from rstar.search.mcts import GenerationItem, SamplingParams
from search_svc.server import create_server

CODES = {"ok": sandbox_pb2.OK, "error": sandbox_pb2.ERROR, "timeout": sandbox_pb2.TIMEOUT}


class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self):
        self.walk = WalkPolicy(version="fake-policy-7")
        self.delay = 0.0
        self.fail_next = 0           # answer UNAVAILABLE this many times
        self.calls = 0
        self.in_flight = 0

    def Generate(self, request, context):
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "model loading")
        self.in_flight += 1
        try:
            end = time.monotonic() + self.delay
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
            items = [GenerationItem(it.prefix.question, tuple(it.prefix.steps), it.n, it.seed) for it in request.items]
            sp = request.sampling
            res = self.walk.generate(items, SamplingParams(sp.temperature, sp.top_p, sp.max_tokens))
            return policy_pb2.GenerateResponse(model_version=res.model_version, results=[
                policy_pb2.ItemCandidates(prompt_tokens=10, candidates=[
                    policy_pb2.Candidate(text=c.text, finish_reason=c.finish_reason, num_tokens=c.num_tokens)
                    for c in cands]) for cands in res])
        finally:
            self.in_flight -= 1

    def Info(self, request, context):
        return common_pb2.InfoResponse(service="policy", ready=True,
                                       models=[common_pb2.ModelVersion(name="policy", version="fake-policy-7")])


class FakePPM(ppm_pb2_grpc.PPMServiceServicer):
    def __init__(self):
        self.scorer = HashScorer(version="fake-ppm-3")

    def Score(self, request, context):
        res = self.scorer.score([(p.question, tuple(p.steps)) for p in request.prefixes])
        return ppm_pb2.ScoreResponse(scores=list(res), model_version=res.model_version)

    def Info(self, request, context):
        return common_pb2.InfoResponse(service="ppm", ready=True,
                                       models=[common_pb2.ModelVersion(name="ppm", version="fake-ppm-3")])


class FakeSandbox(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self):
        self.calls = 0

    def Execute(self, request, context):
        self.calls += 1
        out = []
        for p in request.programs:
            r = InProcessExecutor.run_one(p.code)
            out.append(sandbox_pb2.ExecutionResult(stdout=r.stdout, stderr=r.stderr, exit_code=0 if r.failure == "ok"
                                                   else 1, failure=CODES[r.failure], duration_seconds=r.duration))
        return sandbox_pb2.ExecuteResponse(results=out)

    def Info(self, request, context):
        return common_pb2.InfoResponse(service="sandbox", ready=True)


def start_fake(add, servicer):
    server = grpc.server(futures.ThreadPoolExecutor(8))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    policy, ppm, sandbox = FakePolicy(), FakePPM(), FakeSandbox()
    servers = []
    addrs = []
    for add, svc in ((policy_pb2_grpc.add_PolicyServiceServicer_to_server, policy),
                     (ppm_pb2_grpc.add_PPMServiceServicer_to_server, ppm),
                     (sandbox_pb2_grpc.add_SandboxServiceServicer_to_server, sandbox)):
        s, a = start_fake(add, svc)
        servers.append(s)
        addrs.append(a)
    store_dir = tmp_path_factory.mktemp("store")
    cfg = SearchConfig(port=0, metrics_port=-1, policy_address=addrs[0], ppm_address=addrs[1],
                       sandbox_address=addrs[2], store_url=str(store_dir), health_poll_s=0.1, rollouts=4,
                       candidates=3, max_concurrent_searches=1, max_queued_searches=1, retry_backoff_s=0.01,
                       max_problem_chars=4096)
    service = create_server(cfg).start()
    servicer, handle = service.servicer, service.handle
    servicer.monitor.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    stub = search_pb2_grpc.SearchServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + 10
    while time.time() < deadline and not servicer.monitor.ready:
        time.sleep(0.05)
    yield dict(stub=stub, health=health, policy=policy, sandbox=sandbox, servicer=servicer, store_dir=store_dir,
               handle=handle, policy_address=addrs[0])
    service.close()
    for s in servers:
        s.stop(0)


def wait_idle(servicer, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end and servicer.core.admission.running:
        time.sleep(0.02)
    return servicer.core.admission.running == 0


def test_health_serving_once_downstream_ready(env):
    resp = env["health"].Check(health_pb2.HealthCheckRequest(service="rstar.v1.SearchService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    info = env["stub"].Info(common_pb2.InfoRequest())
    assert info.ready and {m.name: m.version for m in info.models} == {"policy": "fake-policy-7",
                                                                        "ppm": "fake-ppm-3"}


def test_solve_returns_an_executed_trajectory_and_stats_that_add_up(env):
    resp = env["stub"].Solve(search_pb2.SolveRequest(problem="Add some numbers.", seed=4,
                                                     budget=search_pb2.Budget(rollouts=4, trajectories=2)), timeout=30)
    assert resp.answer and resp.strategy == "top_ppm"
    steps = resp.trajectory.steps
    assert steps[0].text.startswith("<code>") and "\\boxed" in steps[-1].text
    code_end = [s for s in steps if "<end_of_code>" in s.text]
    assert code_end and code_end[0].output.strip().lstrip("-").isdigit()
    assert resp.trajectories[0].final_score >= resp.trajectories[-1].final_score
    assert sum(a.votes for a in resp.alternatives) == len(resp.trajectories)
    st = resp.stats
    t = st.times
    assert t.generate_seconds + t.ppm_seconds + t.sandbox_seconds + t.other_seconds == pytest.approx(
        t.total_seconds, rel=1e-6)
    assert st.trees == 2 and st.rollouts <= 8 and st.policy_calls >= 1 and st.executions > 0
    assert st.sandbox_calls <= st.policy_calls and st.ppm_calls <= st.policy_calls
    assert {m.name: m.version for m in resp.model_versions} == {"policy": "fake-policy-7", "ppm": "fake-ppm-3"}
    again = env["stub"].Solve(search_pb2.SolveRequest(problem="Add some numbers.", seed=4,
                                                      budget=search_pb2.Budget(rollouts=4, trajectories=2)))
    assert again.trajectory == resp.trajectory and again.answer == resp.answer      # seeded


@pytest.mark.parametrize("request_kw, code", [
    (dict(problem=""), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="   \n"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="x" * 1_000_000), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", budget=search_pb2.Budget()), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", budget=search_pb2.Budget(rollouts=0, candidates_per_expansion=4)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", budget=search_pb2.Budget(rollouts=-1)), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", budget=search_pb2.Budget(rollouts=2, max_wall_seconds=-1)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", exploration=-1), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", strategy=42), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(problem="2+2?", budget=search_pb2.Budget(rollouts=100000)), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_requests(env, request_kw, code):
    with pytest.raises(grpc.RpcError) as e:
        env["stub"].Solve(search_pb2.SolveRequest(**request_kw), timeout=10)
    assert e.value.code() == code
    assert "Traceback" not in (e.value.details() or "")


def test_deadline_expiry_returns_deadline_exceeded_and_stays_healthy(env):
    env["policy"].delay = 0.3
    try:
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as e:
            env["stub"].Solve(search_pb2.SolveRequest(problem="slow", budget=search_pb2.Budget(rollouts=50)),
                              timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.time() - t0 < 2
        assert wait_idle(env["servicer"])                   # the search stopped and freed its slot
        end = time.time() + 3
        while env["policy"].in_flight and time.time() < end:
            time.sleep(0.02)
        assert env["policy"].in_flight == 0                 # the downstream call was cancelled too
    finally:
        env["policy"].delay = 0.0
    assert env["health"].Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert env["stub"].Solve(search_pb2.SolveRequest(problem="fast now"), timeout=30).stats.rollouts > 0


def test_solve_stream_reports_progress_then_the_result(env):
    events = list(env["stub"].SolveStream(search_pb2.SolveRequest(
        problem="stream me", seed=2, budget=search_pb2.Budget(rollouts=5)), timeout=30))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert events[-1].HasField("result") and progress
    done = [p.rollouts_done for p in progress]
    assert done == sorted(done) and len(set(done)) == len(done) and progress[-1].rollouts_total == 5
    assert any(p.best_answer for p in progress) and progress[-1].generated_tokens > 0
    assert events[-1].result.stats.rollouts == done[-1]


def test_client_cancellation_frees_the_search(env):
    env["policy"].delay = 0.2
    try:
        call = env["stub"].SolveStream(search_pb2.SolveRequest(problem="cancel me",
                                                               budget=search_pb2.Budget(rollouts=200)), timeout=30)
        end = time.time() + 5
        while env["servicer"].core.admission.running == 0 and time.time() < end:
            time.sleep(0.01)
        time.sleep(0.1)
        call.cancel()
        assert wait_idle(env["servicer"], 3)
    finally:
        env["policy"].delay = 0.0


def test_full_queue_is_resource_exhausted(env):
    env["policy"].delay = 0.2
    results = {}

    def run(name):
        try:
            env["stub"].Solve(search_pb2.SolveRequest(problem=name, budget=search_pb2.Budget(rollouts=2)),
                              timeout=30)
            results[name] = "ok"
        except grpc.RpcError as e:
            results[name] = e.code()

    try:
        threads = [threading.Thread(target=run, args=(f"p{i}",)) for i in range(3)]   # 1 slot + 1 queued
        for th in threads:
            th.start()
            time.sleep(0.1)
        for th in threads:
            th.join(30)
    finally:
        env["policy"].delay = 0.0
    assert sorted(map(str, results.values())) == sorted(["ok", "ok", str(grpc.StatusCode.RESOURCE_EXHAUSTED)])


def test_synthesize_streams_trees_and_stores_a_shard(env):
    req = search_pb2.SynthesizeRequest(
        problems=[search_pb2.Problem(id=f"q{i}", problem=f"sum problem {i}", answer=str(8 + i)) for i in range(5)],
        budget=search_pb2.Budget(rollouts=3, candidates_per_expansion=2), annotation=search_pb2.PPM_AUGMENTED,
        seed=9, round=1, shard="svc-test", store=True, return_trees=True)
    events = list(env["stub"].Synthesize(req, timeout=60))
    trees = [e.tree for e in events if e.HasField("tree")]
    done = events[-1].done
    assert sorted(t.problem_id for t in trees) == [f"q{i}" for i in range(5)]
    assert any(e.HasField("progress") for e in events)
    assert done.shard_key == "trajectories/round-1/api-svc-test.jsonl.gz" and done.problems == 5
    assert done.solved == sum(t.solved for t in trees)
    d = json.loads(trees[0].tree_json)
    assert d["schema"] == tj.TREE_SCHEMA and d["settings"]["annotation"] == "ppm_augmented"
    stored = list(tj.read_shard(LocalStore(env["store_dir"]), 1, "api-svc-test"))
    assert [t.problem_id for t in stored] == [f"q{i}" for i in range(5)]


def test_synthesize_validation(env):
    bad = [
        search_pb2.SynthesizeRequest(),
        search_pb2.SynthesizeRequest(problems=[search_pb2.Problem(problem="p", answer="")]),
        search_pb2.SynthesizeRequest(problems=[search_pb2.Problem(problem="p", answer="1")], shard="../x"),
        search_pb2.SynthesizeRequest(problems=[search_pb2.Problem(problem="p", answer="1")],
                                     budget=search_pb2.Budget()),
    ]
    for req in bad:
        with pytest.raises(grpc.RpcError) as e:
            list(env["stub"].Synthesize(req, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_retries_unavailable(env):
    env["policy"].fail_next = 2
    client = PolicyClient(env["policy_address"], timeout=5, retries=4, backoff=0.01)
    try:
        res = client.generate([GenerationItem("q", (), 2, 1)], SamplingParams(), CallScope())
        assert len(res[0]) == 2 and res.model_version == "fake-policy-7"
        env["policy"].fail_next = 5
        with pytest.raises(Exception, match="UNAVAILABLE"):
            client.generate([GenerationItem("q", (), 2, 1)], SamplingParams(), CallScope())
    finally:
        env["policy"].fail_next = 0
        client.close()


def test_health_follows_downstream_availability():
    servers, addrs = [], []
    for add, svc in ((policy_pb2_grpc.add_PolicyServiceServicer_to_server, FakePolicy()),
                     (ppm_pb2_grpc.add_PPMServiceServicer_to_server, FakePPM()),
                     (sandbox_pb2_grpc.add_SandboxServiceServicer_to_server, FakeSandbox())):
        s, a = start_fake(add, svc)
        servers.append(s)
        addrs.append(a)
    cfg = SearchConfig(port=0, metrics_port=-1, policy_address=addrs[0], ppm_address=addrs[1],
                       sandbox_address=addrs[2], health_poll_s=0.1, call_retries=1)
    service = create_server(cfg, store=object()).start()
    servicer = service.servicer
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{service.port}"))

    def status():
        return health.Check(health_pb2.HealthCheckRequest()).status

    def wait_for(want):
        end = time.time() + 5
        while time.time() < end and status() != want:
            time.sleep(0.05)
        return status()

    try:
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING    # before the first poll
        servicer.monitor.start()
        assert wait_for(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
        servers[2].stop(0)                                                # the sandbox goes away
        assert wait_for(health_pb2.HealthCheckResponse.NOT_SERVING) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        service.close()
        for s in servers:
            s.stop(0)


def test_injected_core_is_served_at_once(tmp_path):
    """`create_server(config, core=...)`: the protocol fakes in-process, no downstream services to wait for."""
    from rstar.search.core import SearchCore

    core = SearchCore(WalkPolicy(), InProcessExecutor(), HashScorer(), LocalStore(tmp_path / "store"))
    service = create_server(SearchConfig(port=0, metrics_port=-1, rollouts=4, candidates=3), core=core).start()
    try:
        assert service.core is core and service.load_step is None
        with grpc.insecure_channel(service.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            resp = search_pb2_grpc.SearchServiceStub(ch).Solve(
                search_pb2.SolveRequest(problem="Add some numbers.", seed=4), timeout=30)
            assert resp.answer and resp.trajectory
    finally:
        service.close()
