"""`rstar.client.SearchClient` against the real search service, in-process, with the
deterministic protocol fakes downstream (`rstar_testing.fakes`): typed results, streams
in order, deadlines, cancellation that reaches the search, retried UNAVAILABLE, the token
in the request metadata (insecure loopback and TLS), synthesis, error classes, and the
module docstring's example.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import json_format

import rstar.client as client_mod
from rstar.client import (Cancelled, DeadlineExceeded, EventStream, InvalidArgument, Problem, ResourceExhausted,
                          SearchClient, SearchError, SolveDone, SolveProgress, SolveResult, Step, SynthesisDone,
                          SynthesisProgress, TreeDone, Unavailable)
from rstar.search.core import SearchCore
from rstar.server import MAX_MESSAGE_BYTES
from rstar.services import SERVICES
from rstar.store import LocalStore
from rstar.v1 import search_pb2, search_pb2_grpc
from rstar_testing.fakes import Gated, HashScorer, InProcessExecutor, SimulatedLatency, WalkPolicy
from search_svc.config import SearchConfig
from search_svc.server import create_server
from search_svc.servicer import SearchServicer
from tests.conftest import free_port

PROBLEM = "Add some numbers."


def _config(port: int = 0) -> SearchConfig:
    return SearchConfig(port=port, metrics_port=-1, rollouts=4, candidates=3, max_concurrent_searches=2,
                        max_queued_searches=2, max_problem_chars=4096)


@pytest.fixture
def serve(tmp_path):
    """serve(policy=None, port=0) -> the started search service (closed at teardown)."""
    started = []

    def start(policy=None, port: int = 0):
        service = create_server(_config(port), policy=policy or WalkPolicy(), scorer=HashScorer(),
                                executor=InProcessExecutor(), store=LocalStore(tmp_path / "store")).start()
        started.append(service)
        return service

    yield start
    for s in started:
        s.close()


def _wait(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _idle(service) -> bool:
    return _wait(lambda: service.core.admission.running == 0)


# ---------------------------------------------------------------- solve


def test_solve_returns_typed_results(serve):
    service = serve()
    with SearchClient(service.address) as client:
        result = client.solve(PROBLEM, rollouts=4, trajectories=2, seed=4)
        # the same request on the raw stub: the client adds nothing and loses nothing
        with grpc.insecure_channel(service.address) as ch:
            raw = search_pb2_grpc.SearchServiceStub(ch).Solve(search_pb2.SolveRequest(
                problem=PROBLEM, seed=4, budget=search_pb2.Budget(rollouts=4, trajectories=2)), timeout=30)
    assert isinstance(result, SolveResult) and isinstance(result.raw, search_pb2.SolveResponse)
    copies = [search_pb2.SolveResponse.FromString(m.SerializeToString()) for m in (raw, result.raw)]
    for msg in copies:
        msg.stats.ClearField("times")                             # wall times differ between two runs
    assert copies[0] == copies[1]
    assert result.answer == raw.answer and result.answer and result.strategy == "top_ppm"
    assert all(isinstance(s, Step) for s in result.trajectory)
    assert [s.index for s in result.trajectory] == list(range(len(result.trajectory)))
    first, last = result.trajectory[0], result.trajectory[-1]
    assert first.text.startswith("<code>") and first.code and first.terminal_kind in ("", "exhausted")
    assert last.terminal and last.terminal_kind == "answer" and last.answer is not None
    ran = [s for s in result.trajectory if s.ends_code]
    assert ran and ran[0].output.strip().lstrip("-").isdigit()       # the real program output
    assert result.final_score == pytest.approx(raw.trajectory.final_score)
    assert sum(a.votes for a in result.alternatives) == len(result.trajectories) == len(raw.trajectories)
    st = result.stats
    assert st.trees == 2 and 1 <= st.rollouts <= 8 and st.nodes >= len(result.trajectory) and st.executions > 0
    t = st.times
    assert t.generate_seconds + t.ppm_seconds + t.sandbox_seconds + t.other_seconds == pytest.approx(
        t.total_seconds, rel=1e-6)
    assert st.stop_reason in ("budget", "exhausted")
    assert result.model_versions == {"policy": "walk-1", "ppm": "hash-ppm-1"}
    d = result.to_dict()
    assert "raw" not in d and d["stats"]["times"]["total_seconds"] == t.total_seconds
    assert d["trajectory"][0]["code"] == first.code
    json.dumps(d)                                    # plain values only, no protobuf
    assert SolveResult.from_proto(result.raw) == result and result.raw is not raw   # `raw`: not in equality


def test_solve_without_budget_uses_the_server_default_and_info_reports_ready(serve):
    service = serve()
    with SearchClient(service.address) as client:
        result = client.solve(PROBLEM)
        info = client.info()
    assert 1 <= result.stats.rollouts <= 4                # the config's default budget: 4 rollouts
    assert info.ready and info.details["default_rollouts"] == "4"


def test_solve_stream_events_arrive_in_order_and_the_last_carries_the_result(serve):
    service = serve()
    with SearchClient(service.address) as client:
        stream = client.solve_stream(PROBLEM, rollouts=5, seed=2)
        assert isinstance(stream, EventStream)
        events = list(stream)
        again = client.solve(PROBLEM, rollouts=5, seed=2)
    *progress, done = events
    assert progress and all(isinstance(e, SolveProgress) for e in progress)
    assert isinstance(done, SolveDone) and isinstance(done.result, SolveResult)
    counts = [p.rollouts_done for p in progress]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert progress[-1].rollouts_total == 5 and done.result.stats.rollouts == counts[-1]
    assert [p.elapsed_seconds for p in progress] == sorted(p.elapsed_seconds for p in progress)
    assert stream.result() is done.result                 # drained: the result stays available
    assert done.result.answer == again.answer and done.result.trajectory == again.trajectory   # seeded


# ---------------------------------------------------------------- deadlines and cancellation


def test_deadline_raises_deadline_exceeded_and_frees_the_search(serve):
    gated = Gated(WalkPolicy())              # every policy call blocks until the gate opens
    service = serve(policy=gated)
    try:
        with SearchClient(service.address) as client:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as e:
                client.solve(PROBLEM, rollouts=4, deadline=0.5)
            assert time.monotonic() - t0 < 3 and e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert isinstance(e.value, TimeoutError) and isinstance(e.value, SearchError)
            assert _idle(service)
            with pytest.raises(DeadlineExceeded):
                list(client.solve_stream(PROBLEM, rollouts=4, deadline=0.5))
            assert _idle(service)
            assert all(s.stopped for s in gated.scopes)         # the service stopped every search
    finally:
        gated.gate.set()


def test_cancelling_a_stream_stops_the_search(serve):
    gated = Gated(WalkPolicy())
    service = serve(policy=gated)
    try:
        with SearchClient(service.address) as client:
            stream = client.solve_stream(PROBLEM, rollouts=200)
            assert gated.entered.wait(5)                         # the search is in its first policy call
            scope = gated.scopes[0]
            assert not scope.stopped
            stream.cancel()
            assert _wait(lambda: scope.stopped, 5)               # the service saw the cancellation
            assert scope.reason == "cancelled"
            assert _idle(service)                                # and freed the search slot
            assert list(stream) == [] and stream.cancelled
            with pytest.raises(Cancelled):
                stream.result()
    finally:
        gated.gate.set()


def test_leaving_a_stream_early_cancels_it(serve):
    policy = SimulatedLatency(WalkPolicy(), "policy", base=0.03, step_base=0.0, step_per_seq=0.0)
    service = serve(policy=policy)
    with SearchClient(service.address) as client:
        with client.solve_stream(PROBLEM, rollouts=400, candidates=2) as stream:
            seen = [next(stream), next(stream)]
        assert all(isinstance(e, SolveProgress) for e in seen)
        assert _idle(service)
        calls = policy.inner.calls
        time.sleep(0.3)
        assert policy.inner.calls == calls                       # nothing searches on


# ---------------------------------------------------------------- retries


def test_unavailable_is_retried_until_the_server_comes_up(serve):
    port = free_port()
    timer = threading.Timer(0.8, lambda: serve(port=port))
    with SearchClient(f"127.0.0.1:{port}", retries=50, retry_budget_s=20, backoff=0.05, max_backoff=0.3) as client:
        t0 = time.monotonic()
        timer.start()
        try:
            result = client.solve(PROBLEM, rollouts=2)
        finally:
            timer.join()
        assert time.monotonic() - t0 >= 0.7 and result.stats.rollouts >= 1


def test_a_stream_that_failed_before_its_first_message_is_retried_across_a_restart(serve):
    port = free_port()
    first = serve(port=port)
    with SearchClient(f"127.0.0.1:{port}", retries=50, retry_budget_s=20, backoff=0.05, max_backoff=0.3) as client:
        assert client.solve(PROBLEM, rollouts=2).answer is not None
        first.close()                                            # the server goes away...
        timer = threading.Timer(0.6, lambda: serve(port=port))   # ...and comes back on the same port
        timer.start()
        try:
            events = list(client.solve_stream(PROBLEM, rollouts=3))
        finally:
            timer.join()
    assert isinstance(events[-1], SolveDone) and events[-1].result.stats.rollouts >= 1


def test_unavailable_past_the_retry_budget_raises_unavailable():
    port = free_port()                                           # nothing listens there
    with SearchClient(f"127.0.0.1:{port}", retries=100, retry_budget_s=0.6, backoff=0.05) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            client.solve(PROBLEM)
        assert 0.2 < time.monotonic() - t0 < 5 and isinstance(e.value, ConnectionError)
        with pytest.raises(Unavailable):
            list(client.solve_stream(PROBLEM))
    with SearchClient(f"127.0.0.1:{port}", retries=0) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.solve(PROBLEM)
        assert time.monotonic() - t0 < 2


# ---------------------------------------------------------------- metadata, token, TLS


class Recorder(grpc.ServerInterceptor):
    """Records each call's metadata; answers UNAVAILABLE to the first `fail` calls (a loading server)."""

    def __init__(self, fail: int = 0):
        self.metadata: list[tuple[str, dict[str, str]]] = []
        self.fail = fail

    def intercept_service(self, continuation, details):
        self.metadata.append((details.method.rsplit("/", 1)[-1], dict(details.invocation_metadata)))
        if self.fail > 0:
            self.fail -= 1

            def unavailable(request, context):
                context.abort(grpc.StatusCode.UNAVAILABLE, "loading")

            return grpc.unary_unary_rpc_method_handler(unavailable)
        return continuation(details)


@contextlib.contextmanager
def recorded_server(tmp_path, recorder: Recorder, credentials=None):
    """The real SearchServicer on a plain grpc server with `recorder` in front; yields the port."""
    core = SearchCore(WalkPolicy(), InProcessExecutor(), HashScorer(), LocalStore(tmp_path / "store"))
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[recorder])
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(_config(), core), server)
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else \
        server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def test_the_token_is_sent_as_bearer_metadata_on_every_call(tmp_path, monkeypatch):
    # no default token (rstar.auth.user_token) for the anonymous client below
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RSTAR_TOKEN", raising=False)
    rec = Recorder()
    with recorded_server(tmp_path, rec) as port:
        with SearchClient(f"127.0.0.1:{port}", token="s3cret") as client:
            client.solve(PROBLEM, rollouts=1)
            client.solve_stream(PROBLEM, rollouts=1).result()
            client.synthesize([("a", PROBLEM, "3")], rollouts=1).result()
        with SearchClient(f"127.0.0.1:{port}") as anonymous:
            anonymous.solve(PROBLEM, rollouts=1)
    calls = {}
    for method, md in rec.metadata:
        calls.setdefault(method, []).append(md.get("authorization"))
    assert calls == {"Solve": ["Bearer s3cret", None], "SolveStream": ["Bearer s3cret"],
                     "Synthesize": ["Bearer s3cret"]}


def test_a_token_never_goes_in_clear_to_a_remote_host():
    with pytest.raises(ValueError, match="tls"):
        SearchClient("10.1.2.3:50054", token="s3cret")
    SearchClient("10.1.2.3:50054", token="s3cret", allow_insecure_token=True).close()
    SearchClient("localhost:50054", token="s3cret").close()
    with pytest.raises(ValueError):
        SearchClient("127.0.0.1:1", client_cert=b"x")           # a client certificate needs its key


def _self_signed(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "ca.pem").write_bytes(cert_pem)
    return cert_pem, key_pem, tmp_path / "ca.pem"


def test_tls_with_a_token_as_call_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("RSTAR_TOKEN", raising=False)  # the second client sends no token
    cert_pem, key_pem, ca_path = _self_signed(tmp_path)
    rec = Recorder()
    with recorded_server(tmp_path, rec, grpc.ssl_server_credentials([(key_pem, cert_pem)])) as port:
        with SearchClient(f"localhost:{port}", token="tls-token", root_certs=ca_path) as client:   # a path
            assert client.tls and client.solve(PROBLEM, rollouts=1).stats.rollouts == 1
        with SearchClient(f"localhost:{port}", tls=True, root_certs=cert_pem) as client:           # PEM bytes
            client.solve(PROBLEM, rollouts=1)
        with SearchClient(f"localhost:{port}", retries=0, timeout=5) as plain:
            with pytest.raises(SearchError):                    # plaintext to a TLS port fails
                plain.solve(PROBLEM, rollouts=1)
    auth = [md.get("authorization") for method, md in rec.metadata if method == "Solve"]
    assert auth[:2] == ["Bearer tls-token", None]


def test_a_server_answering_unavailable_is_retried(tmp_path):
    rec = Recorder(fail=2)
    with recorded_server(tmp_path, rec) as port:
        with SearchClient(f"127.0.0.1:{port}", backoff=0.01) as client:
            assert client.solve(PROBLEM, rollouts=1).stats.rollouts == 1
        assert [m for m, _ in rec.metadata] == ["Solve"] * 3
        rec.fail = 5
        with SearchClient(f"127.0.0.1:{port}", retries=2, backoff=0.01) as client:
            with pytest.raises(Unavailable, match="loading"):
                client.solve(PROBLEM, rollouts=1)


# ---------------------------------------------------------------- errors, synthesis, the example


def test_errors_carry_the_status_code_and_the_servers_message(serve):
    service = serve()
    with SearchClient(service.address) as client:
        with pytest.raises(InvalidArgument, match="problem is empty") as e:
            client.solve("   ")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and isinstance(e.value, ValueError)
        with pytest.raises(InvalidArgument, match="rollouts"):
            client.solve(PROBLEM, rollouts=0)
        with pytest.raises(ResourceExhausted, match="limit"):
            client.solve(PROBLEM, rollouts=100000)
        with pytest.raises(InvalidArgument):
            list(client.solve_stream(""))
        with pytest.raises(ValueError, match="rollouts is required"):    # client-side: no request sent
            client.solve(PROBLEM, candidates=2)
        with pytest.raises(ValueError, match="strategy"):
            client.solve(PROBLEM, strategy="best")


def test_synthesize_streams_trees_then_the_shard(serve, tmp_path):
    service = serve()
    problems = [("q0", "sum problem 0", "8"), Problem("q1", "sum problem 1", "9"),
                {"id": "q2", "problem": "sum problem 2", "answer": "10"}]
    with SearchClient(service.address) as client:
        events = list(client.synthesize(problems, rollouts=3, candidates=2, annotation="ppm-augmented", seed=9,
                                        round=1, shard="client-test", store=True, return_trees=True))
        with pytest.raises(InvalidArgument, match="answer"):
            client.synthesize([("x", "p", "")], rollouts=1).result()
    trees = [e for e in events if isinstance(e, TreeDone)]
    done = events[-1]
    assert isinstance(done, SynthesisDone) and any(isinstance(e, SynthesisProgress) for e in events)
    assert sorted(t.problem_id for t in trees) == ["q0", "q1", "q2"]
    assert trees[0].tree["settings"]["annotation"] == "ppm_augmented" and trees[0].nodes > 0
    r = done.result
    assert r.shard_key == "trajectories/round-1/api-client-test.jsonl.gz" and r.problems == 3
    assert r.solved == sum(t.solved for t in trees) and r.trees == trees
    assert r.model_versions == {"policy": "walk-1", "ppm": "hash-ppm-1"}
    json.dumps(r.to_dict())


def test_the_module_docstring_example_runs_as_written(serve):
    doc = client_mod.__doc__
    lines = doc.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("    from rstar.client"))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() and not lines[i].startswith("    "))
    code = "\n".join(ln[4:] for ln in lines[start:end])                     # the indented block
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 5
    assert f'"{client_mod.DEFAULT_ADDRESS}"' in code and client_mod.DEFAULT_ADDRESS.endswith(
        f":{SERVICES['search'].port}")                                          # where `rstar up` serves
    service = serve()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace(client_mod.DEFAULT_ADDRESS, service.address), {})      # noqa: S102
    assert re.match(r"\S+ \d+ \{'policy': 'walk-1', 'ppm': 'hash-ppm-1'\}", out.getvalue()), out.getvalue()


def test_the_clients_message_limit_is_the_services():
    assert client_mod.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES


def test_json_of_the_raw_response_is_the_services_message(serve):
    service = serve()
    with SearchClient(service.address) as client:
        result = client.solve(PROBLEM, rollouts=2, seed=1)
    parsed = json_format.Parse(json_format.MessageToJson(result.raw), search_pb2.SolveResponse())
    assert parsed == result.raw and SolveResult.from_proto(parsed) == result


def test_solve_result_carries_the_totals_beyond_the_listed_trajectories():
    from rstar.client import SolveResult
    from rstar.v1 import search_pb2

    r = search_pb2.SolveResponse(answer="4", alternatives=[search_pb2.Alternative(answer="4", votes=3)],
                                 alternatives_total=7, trajectories_total=40)
    res = SolveResult.from_proto(r)
    assert (res.alternatives_total, res.trajectories_total) == (7, 40)
    old = SolveResult.from_proto(search_pb2.SolveResponse(alternatives=[search_pb2.Alternative(answer="1")]))
    assert old.alternatives_total == 1   # a server without totals: the list is the whole
