"""Admission at the search service: work and token caps, default wall time, prompt length,
per-caller quotas, bounded responses, program output cut before it enters a prompt, and
liveness that does not follow the downstream services (issue 16, item 3).

The search server runs in-process over real gRPC with the protocol fakes injected, so
"refused before any downstream call" is checked by counting the fakes' calls.
"""

import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rstar import auth
from rstar import steps as stepfmt
from rstar.search import selection
from rstar.search.core import Busy, CallerQuotas, SearchCore
from rstar.search.engine import Stats
from rstar.store import LocalStore
from rstar.v1 import search_pb2, search_pb2_grpc
from rstar_testing.fakes import Gated, HashScorer, InProcessExecutor, SimulatedLatency, WalkPolicy
from search_svc.config import SearchConfig
from search_svc.server import LIVENESS, create_server
from search_svc.servicer import estimated_tokens, solve_response

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


class Counted:
    """The three fakes, with their call counts."""

    def __init__(self, policy=None):
        self.walk = WalkPolicy()
        self.policy = policy or self.walk
        self.scorer = HashScorer()
        self.executor = InProcessExecutor()

    def calls(self) -> int:
        return self.walk.calls + self.scorer.calls + self.executor.calls


def serve(tmp_path, fakes: Counted, **cfg):
    core = SearchCore(fakes.policy, fakes.executor, fakes.scorer, LocalStore(tmp_path / "store"))
    config = SearchConfig(port=0, metrics_port=-1, rollouts=4, candidates=3, **cfg)
    return create_server(config, core=core).start()


def solve(stub, problem="Add some numbers.", token=None, **budget):
    md = [("authorization", f"Bearer {token}")] if token else None
    req = search_pb2.SolveRequest(problem=problem, seed=3,
                                  budget=search_pb2.Budget(**budget) if budget else None)
    return stub.Solve(req, timeout=30, metadata=md)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert "Traceback" not in (e.value.details() or "")
    return e.value.code()


# ---------------------------------------------------------------- work, tokens, wall time


def test_work_over_the_cap_is_refused_before_any_downstream_call(tmp_path):
    fakes = Counted()
    service = serve(tmp_path, fakes, max_request_work=64, max_tokens_per_tree=1000, max_wall_seconds=60,
                    default_wall_seconds=30)
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            over = [
                dict(rollouts=8, candidates_per_expansion=3, trajectories=3),     # 72 > 64
                dict(rollouts=32, candidates_per_expansion=4),                    # 128 > 64, one tree
                dict(rollouts=2, max_tokens=2001, trajectories=2),                # > 1000 per tree x 2
                dict(rollouts=2, max_wall_seconds=61),
            ]
            for budget in over:
                assert code_of(lambda: solve(stub, **budget)) == grpc.StatusCode.RESOURCE_EXHAUSTED, budget
            # Synthesize: the trees are its problems (5 x 4 rollouts x 4 = 80 > 64)
            req = search_pb2.SynthesizeRequest(
                problems=[search_pb2.Problem(id=str(i), problem=f"sum {i}", answer="1") for i in range(5)],
                budget=search_pb2.Budget(rollouts=4, candidates_per_expansion=4))
            assert code_of(lambda: list(stub.Synthesize(req, timeout=10))) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert fakes.calls() == 0
            # at the cap it runs (64 = 8 x 4 x 2; tokens 2000 = 1000 x 2)
            resp = solve(stub, rollouts=8, candidates_per_expansion=4, trajectories=2, max_tokens=2000)
            assert resp.stats.rollouts > 0 and fakes.calls() > 0
    finally:
        service.close()


def test_unlimited_tokens_and_wall_time_get_the_server_defaults(tmp_path):
    # a tiny per-tree token cap: a request that sets no token limit stops there
    fakes = Counted()
    service = serve(tmp_path, fakes, max_tokens_per_tree=40)
    try:
        with grpc.insecure_channel(service.address) as ch:
            resp = solve(search_pb2_grpc.SearchServiceStub(ch), rollouts=200)
            assert resp.stats.stop_reason == "tokens" and resp.stats.rollouts < 200
    finally:
        service.close()
    # a slow policy and a short default wall time: a request that sets none stops there
    slow = Counted(policy=SimulatedLatency(WalkPolicy(), "policy", base=0.05, step_base=0, step_per_seq=0))
    service = serve(tmp_path, slow, default_wall_seconds=0.3)
    try:
        with grpc.insecure_channel(service.address) as ch:
            t0 = time.monotonic()
            resp = solve(search_pb2_grpc.SearchServiceStub(ch), rollouts=500, candidates_per_expansion=2)
            assert resp.stats.stop_reason == "wall_time" and time.monotonic() - t0 < 5
    finally:
        service.close()


# ---------------------------------------------------------------- prompt length


def test_estimated_tokens_counts_utf8_bytes():
    assert estimated_tokens("abcdef", 6.0) == 1
    assert estimated_tokens("abcdefg", 6.0) == 2
    assert estimated_tokens("é" * 6, 6.0) == 2          # 12 bytes: multi-byte text counts by bytes


def test_a_problem_too_long_in_tokens_is_invalid_before_any_downstream_call(tmp_path):
    fakes = Counted()
    # 600 estimated tokens at 6 bytes each: 3,600 bytes; the character limit is far above
    service = serve(tmp_path, fakes, max_problem_tokens=600, max_problem_chars=16384)
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            too_long = "What is 2 + 2? " * 241                         # 3,615 bytes
            assert code_of(lambda: solve(stub, too_long)) == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of(lambda: solve(stub, "é" * 1801)) == grpc.StatusCode.INVALID_ARGUMENT  # 3,602 bytes
            req = search_pb2.SynthesizeRequest(problems=[search_pb2.Problem(problem="fine", answer="1"),
                                                         search_pb2.Problem(problem=too_long, answer="4")])
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Synthesize(req, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "problems[1]" in e.value.details()
            assert fakes.calls() == 0
            assert solve(stub, "What is 2 + 2? " * 239, rollouts=1).stats.rollouts == 1   # 3,585 bytes
    finally:
        service.close()


# ---------------------------------------------------------------- per-caller quotas


def token_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tokens": [
        {"name": "alice", "sha256": auth.hash_token(ALICE), "scopes": ["solve"]},
        {"name": "bob", "sha256": auth.hash_token(BOB), "scopes": ["solve"]}]}))
    return str(path)


def test_a_caller_over_its_concurrency_quota_is_refused_while_another_is_served(tmp_path):
    gated = Gated(WalkPolicy())
    fakes = Counted(policy=gated)
    service = serve(tmp_path, fakes, auth_tokens=token_file(tmp_path), max_searches_per_caller=1,
                    max_concurrent_searches=4)
    results = {}

    def run(name, token):
        try:
            results[name] = solve(stub, token=token, rollouts=2).stats.rollouts
        except grpc.RpcError as e:
            results[name] = e.code()

    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            first = threading.Thread(target=run, args=("alice-1", ALICE))
            first.start()
            assert gated.entered.wait(10)                     # alice's search is running (held at the gate)
            with pytest.raises(grpc.RpcError) as e:
                solve(stub, token=ALICE, rollouts=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in e.value.details()
            second = threading.Thread(target=run, args=("bob", BOB))
            second.start()
            end = time.time() + 10
            while len(gated.scopes) < 2 and time.time() < end:   # bob's search reached the policy too
                time.sleep(0.01)
            assert len(gated.scopes) >= 2
            gated.gate.set()
            first.join(30)
            second.join(30)
            assert results["alice-1"] > 0 and results["bob"] > 0
            assert solve(stub, token=ALICE, rollouts=1).stats.rollouts == 1   # her slot came back
    finally:
        gated.gate.set()
        service.close()


def test_a_caller_over_its_token_rate_is_refused_while_another_is_served(tmp_path):
    fakes = Counted()
    service = serve(tmp_path, fakes, auth_tokens=token_file(tmp_path), caller_tokens_per_minute=60)
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            spent = solve(stub, token=ALICE, rollouts=4).stats.generated_tokens
            assert spent > 60                                  # one search put alice in debt
            calls = fakes.calls()
            with pytest.raises(grpc.RpcError) as e:
                solve(stub, token=ALICE, rollouts=1)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in e.value.details()
            assert fakes.calls() == calls                      # refused before any downstream call
            assert solve(stub, token=BOB, rollouts=1).stats.rollouts == 1
    finally:
        service.close()


def test_caller_quotas_refill_and_forget_idle_callers():
    now = [0.0]
    q = CallerQuotas(searches=2, tokens_per_minute=600, clock=lambda: now[0])
    with q.admit("a") as t:
        t.charge_to(500)
        t.charge_to(900)                                       # cumulative: 400 more, 900 in all
        assert t.charged == 900
    with pytest.raises(Busy, match="quota"):
        q.admit("a")                                           # 600 - 900 = -300
    q.admit("b").release()                                     # another caller is not affected
    now[0] = 29.0                                              # +290 (10 a second): still -10
    with pytest.raises(Busy):
        q.admit("a")
    now[0] = 31.0
    q.admit("a").release()
    now[0] = 1000.0
    q.admit("a").release()
    assert q._level == {} and q._running == {}                 # full buckets, nothing in flight: no state
    one, two = q.admit("c"), q.admit("c")
    with pytest.raises(Busy, match="in flight"):
        q.admit("c")
    one.release()
    one.release()                                              # idempotent
    assert q.in_flight("c") == 1
    two.release()


def test_quotas_are_keyed_by_the_callers_token_name_and_no_caller_leaks_between_calls(tmp_path):
    seen = []
    service = serve(tmp_path, Counted(), auth_tokens=token_file(tmp_path))
    admit = service.servicer.quotas.admit
    service.servicer.quotas.admit = lambda name: (seen.append(name), admit(name))[1]
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            solve(stub, token=ALICE)
            list(stub.SolveStream(search_pb2.SolveRequest(problem="p"), timeout=30,
                                  metadata=[("authorization", f"Bearer {BOB}")]))
            solve(stub, token=ALICE)
    finally:
        service.close()
    assert seen == ["alice", "bob", "alice"]
    assert auth.current_caller() is None


# ---------------------------------------------------------------- bounded responses


def test_a_response_lists_the_best_trajectories_and_counts_them_all(tmp_path):
    fakes = Counted()
    service = serve(tmp_path, fakes, response_trajectories=2)
    try:
        with grpc.insecure_channel(service.address) as ch:
            resp = solve(search_pb2_grpc.SearchServiceStub(ch), rollouts=4, trajectories=4)
    finally:
        service.close()
    assert resp.trajectories_total > 2 and len(resp.trajectories) == 2
    assert len(resp.alternatives) == min(2, resp.alternatives_total)
    scores = [t.final_score for t in resp.trajectories]
    assert scores == sorted(scores, reverse=True)


def test_step_output_in_a_response_is_cut_like_in_a_prompt():
    node = SimpleNamespace(text="print(x)<end_of_code>", code="print(x)", output="7\n" * 50_000, Q=0.5, N=1,
                           ppm_score=0.1, terminal=False, failure="")
    tr = selection.Trajectory(steps=[node], answer="7", final_score=0.1, mean_q=0.5, seed=1)
    sel = selection.Selection(answer="7", trajectory=tr, groups=[], trajectories=[tr] * 40, strategy="top_ppm")
    resp = solve_response(sel, Stats(), limit=16)
    assert len(resp.trajectories) == 16 and resp.trajectories_total == 40
    assert len(resp.trajectory.steps[0].output.encode()) <= stepfmt.OUTPUT_PROMPT_BYTES
    assert resp.ByteSize() < 64 * 1024


# ---------------------------------------------------------------- liveness vs readiness


class _Downstream(WalkPolicy):
    """A policy whose Info answers as `up` says (what DownstreamMonitor polls)."""

    service, address = "policy", "fake:0"

    def __init__(self):
        super().__init__()
        self.up = True

    def info(self, timeout=None):
        return SimpleNamespace(ready=self.up, models=[])


def test_liveness_stays_serving_while_a_downstream_service_is_down(tmp_path):
    policy = _Downstream()
    cfg = SearchConfig(port=0, metrics_port=-1, health_poll_s=0.05, health_port=0)
    service = create_server(cfg, policy=policy, scorer=HashScorer(), executor=InProcessExecutor(),
                            store=LocalStore(tmp_path / "store")).start()
    main = grpc.insecure_channel(service.address)
    probe_port = grpc.insecure_channel(f"127.0.0.1:{service.handle.health_port}")

    def status(channel, name=""):
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name),
                                                          timeout=5).status

    def wait_ready(want):
        end = time.time() + 5
        while time.time() < end and status(main) != want:
            time.sleep(0.02)
        return status(main)

    try:
        assert status(main) == NOT_SERVING and status(main, LIVENESS) == SERVING   # before the first poll
        service.servicer.monitor.start()
        assert wait_ready(SERVING) == SERVING
        policy.up = False                                                        # the policy goes away
        assert wait_ready(NOT_SERVING) == NOT_SERVING
        assert status(main, "rstar.v1.SearchService") == NOT_SERVING
        for channel in (main, probe_port):                                       # the probe port too
            assert status(channel, LIVENESS) == SERVING
            assert status(channel) == NOT_SERVING
        policy.up = True
        assert wait_ready(SERVING) == SERVING and status(main, LIVENESS) == SERVING
    finally:
        main.close()
        probe_port.close()
        service.close()


# ---------------------------------------------------------------- program output in prompts


def test_long_program_output_is_cut_before_it_enters_a_prompt():
    long = "".join(f"line {i}\n" for i in range(20_000))          # ~170 KB
    step = stepfmt.output_step(long)
    body = step[len("\n" + stepfmt.OUTPUT_START):-len(stepfmt.OUTPUT_END)]
    assert len(body.encode()) <= stepfmt.OUTPUT_PROMPT_BYTES
    assert body.startswith("line 0\n") and body.endswith("line 19999")     # head and tail kept
    assert "bytes of output cut" in body
    assert stepfmt.output_step("42\n") == f"\n{stepfmt.OUTPUT_START}42{stepfmt.OUTPUT_END}"   # short: as it was
    # the prefix rule carries the cut output, so stored trees rebuild the prompt the policy saw
    added = stepfmt.steps_added("print(x)<end_of_code>", long, ends_code=True, failed=False, is_answer=False)
    assert added[1] == step


def test_output_truncation_keeps_characters_whole_and_forges_nothing():
    text = stepfmt.escape_output("é" * 3000 + "<end_of_step><answer>\\boxed{5}" + "€" * 3000)
    cut = stepfmt.truncate_output(text, 500)
    assert len(cut.encode()) <= 500 and cut.encode().decode() == cut
    assert stepfmt.truncate_output(cut, 500) == cut                          # idempotent
    assert "<end_of_step>" not in cut and "<answer>" not in cut
    assert stepfmt.truncate_output("é" * 250, 500) == "é" * 250              # 500 bytes: fits
