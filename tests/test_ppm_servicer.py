"""PPMService in-process: the real gRPC server (`create_server(config, core=fake)`) called
through `rstar.clients.PPMClient`. No model: the core is a protocol fake (`HashScorer`).
Covers Score/Info, INVALID_ARGUMENT, UNAVAILABLE and health while no core is loaded,
deadlines reaching the core, and a drain-mode reload through the model slot. One test
scores with the real `PPMScorer` on the tiny model, also in-process."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ppm_svc.config import PPMConfig
from ppm_svc.server import create_server
from rstar.clients import DownstreamError, PPMClient
from rstar.protocols import CallScope
from rstar.v1 import common_pb2, ppm_pb2, ppm_pb2_grpc
from rstar_testing.fakes import Gated, HashScorer

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

PREFIXES = [("What is 2 + 3?", ()), ("What is 2 + 3?", ("<code>\n# Step 1: Start.\nv = 2\n<end_of_step>",))]


def config(**kw) -> PPMConfig:
    return PPMConfig(port=0, metrics_port=-1, max_prefixes=4, **kw)


def health(service) -> int:
    with grpc.insecure_channel(service.address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(service, want, timeout=5.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end and health(service) != want:
        time.sleep(0.02)
    return health(service)


@pytest.fixture
def served():
    core = HashScorer()
    service = create_server(config(), core=core).start()
    client = PPMClient(service.address, timeout=5, retries=1)
    yield service, client, core
    client.close()
    service.close()


def test_score_returns_the_cores_scores_and_version(served):
    service, client, core = served
    got = client.score(PREFIXES)
    assert list(got) == pytest.approx(list(HashScorer().score(PREFIXES)), abs=1e-6)  # float32 on the wire
    assert got.model_version == "hash-ppm-1"
    assert service.core is core and core.calls == 1


def test_info_and_health_with_an_injected_core(served):
    service, client, _ = served
    info = client.info()
    assert info.service == "ppm" and info.ready
    assert [(m.name, m.version) for m in info.models] == [("ppm", "hash-ppm-1")]
    assert health(service) == SERVING


@pytest.mark.parametrize("prefixes,why", [
    ([], "empty"),
    (PREFIXES * 3, "exceed"),
    ([(" ", ())], "question is empty"),
    ([("q", ("x" * 300_000,))], "characters"),
], ids=["no-prefixes", "too-many", "empty-question", "too-long"])
def test_bad_requests_are_invalid_argument(served, prefixes, why):
    _, client, core = served
    with pytest.raises(DownstreamError) as e:
        client.score(prefixes)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details
    assert core.calls == 0


def test_unavailable_and_not_serving_until_a_core_is_there():
    service = create_server(config()).start()  # no core; its load step never runs here
    client = PPMClient(service.address, timeout=5, retries=1)
    try:
        with pytest.raises(DownstreamError) as e:
            client.score(PREFIXES)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert health(service) == NOT_SERVING and not client.info().ready
        service.servicer.slot.swap(HashScorer(version="late"), "late")  # what the load step does
        assert wait_health(service, SERVING) == SERVING
        assert client.score(PREFIXES).model_version == "late"
    finally:
        client.close()
        service.close()


def test_deadline_reaches_the_core():
    core = Gated(HashScorer())
    service = create_server(config(), core=core).start()
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = ppm_pb2_grpc.PPMServiceStub(ch)
            req = ppm_pb2.ScoreRequest(prefixes=[common_pb2.Prefix(question="What is 2 + 3?")])
            with pytest.raises(grpc.RpcError) as e:
                stub.Score(req, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            end = time.monotonic() + 5
            while not core.scopes[0].stopped and time.monotonic() < end:
                time.sleep(0.01)
            assert core.scopes[0].stopped
            core.gate.set()
            assert len(stub.Score(req, timeout=5).scores) == 1
        assert health(service) == SERVING
    finally:
        core.gate.set()
        service.close()


def test_drain_reload_finishes_in_flight_then_serves_the_new_version():
    old = Gated(HashScorer(version="v1"))
    service = create_server(config(reload_mode="drain"), core=old).start()
    slot = service.servicer.slot
    assert not slot.two_copies
    client = PPMClient(service.address, timeout=10, retries=1)
    out: list = []
    try:
        t = threading.Thread(target=lambda: out.append(client.score(PREFIXES, CallScope(time.monotonic() + 20))))
        t.start()
        assert old.entered.wait(5)
        swapper = threading.Thread(target=slot.loader(lambda v, _dir: HashScorer(version=v)), args=("v2", None))
        swapper.start()
        assert wait_health(service, NOT_SERVING) == NOT_SERVING
        old.gate.set()
        t.join(5)
        swapper.join(5)
        assert out[0].model_version == "v1"
        assert wait_health(service, SERVING) == SERVING
        assert client.score(PREFIXES).model_version == "v2"
    finally:
        old.gate.set()
        client.close()
        service.close()


def test_real_scorer_in_process(tiny_model_dir):
    """The service's own core, `PPMScorer`, injected: scores in [-1, 1], the same as calling it directly."""
    from rstar.ppm import PPMScorer

    scorer = PPMScorer(tiny_model_dir, "tiny-ppm", batch_size=2)
    direct = scorer.score(PREFIXES)
    assert direct.model_version == "tiny-ppm" and all(-1 <= s <= 1 for s in direct)
    service = create_server(config(), core=scorer).start()
    client = PPMClient(service.address, timeout=30, retries=1)
    try:
        got = client.score(PREFIXES)
        assert got.model_version == "tiny-ppm" and list(got) == pytest.approx(list(direct), abs=1e-6)
        assert client.info().details["model_dir"] == str(tiny_model_dir)
    finally:
        client.close()
        service.close()
    stopped = CallScope()
    stopped.stop()
    with pytest.raises(Exception, match="cancelled"):
        scorer.score(PREFIXES, scope=stopped)  # stops before the first batch
