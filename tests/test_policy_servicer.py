"""PolicyService in-process: the real gRPC server (`create_server(config, core=fake)`) called
through `rstar.clients.PolicyClient`. No vLLM: the core is a protocol fake, so this runs in
about a second. Covers Generate/Info, INVALID_ARGUMENT, UNAVAILABLE and health while no core
is loaded, deadlines reaching the core, and hot reload through the model slot (beside: the
in-flight request finishes on the old version; drain: NOT_SERVING while swapping)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_svc.config import PolicyConfig
from policy_svc.server import create_server
from rstar import steps
from rstar.clients import DownstreamError, PolicyClient
from rstar.protocols import CallScope, GenerationItem, SamplingParams
from rstar.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rstar_testing.fakes import Gated, WalkPolicy

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config(**kw) -> PolicyConfig:
    return PolicyConfig(port=0, metrics_port=-1, max_items=4, max_candidates=3, default_max_tokens=64, **kw)


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
    """A service with a WalkPolicy injected, and a client of it."""
    core = WalkPolicy()
    service = create_server(config(), core=core).start()
    client = PolicyClient(service.address, timeout=5, retries=1)
    yield service, client, core
    client.close()
    service.close()


ITEMS = [GenerationItem("What is 2 + 3?", (), 3, 7),
         GenerationItem("What is 2 + 3?", ("<code>\n# Step 1: Start.\nv = 2\n<end_of_step>",), 2, 8)]


def test_generate_translates_to_and_from_the_protocol(served):
    service, client, core = served
    got = client.generate(ITEMS, SamplingParams(temperature=0.7, max_tokens=32))
    want = WalkPolicy().generate(ITEMS, SamplingParams(temperature=0.7, max_tokens=32))
    assert [list(c) for c in got] == [list(c) for c in want]       # same candidates, same order, same fields
    assert got.model_version == "walk-1" and got.prompt_tokens == want.prompt_tokens
    assert service.core is core and core.calls == 1


def test_info_and_health_with_an_injected_core(served):
    service, client, _ = served
    info = client.info()
    assert info.service == "policy" and info.ready
    assert [(m.name, m.version) for m in info.models] == [("policy", "walk-1")]
    assert health(service) == SERVING


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(DownstreamError) as e:
        fn()
    return e.value.code


@pytest.mark.parametrize("items,params,why", [
    ([], SamplingParams(), "empty"),
    ([GenerationItem("q", (), 1, 0)] * 5, SamplingParams(), "exceed"),
    ([GenerationItem("  ", (), 1, 0)], SamplingParams(), "question is empty"),
    ([GenerationItem("q", (), 4, 0)], SamplingParams(), "outside"),
    ([GenerationItem("q", ("x" * 300_000,), 1, 0)], SamplingParams(), "characters"),
    ([GenerationItem("q", (), 1, 0)], SamplingParams(temperature=-1), "sampling"),
    ([GenerationItem("q", (), 1, 0)], SamplingParams(top_p=1.5), "sampling"),
], ids=["no-items", "too-many-items", "empty-question", "too-many-candidates", "too-long", "temperature",
        "top-p"])
def test_bad_requests_are_invalid_argument(served, items, params, why):
    _, client, core = served
    with pytest.raises(DownstreamError) as e:
        client.generate(items, params)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details
    assert core.calls == 0  # refused before reaching the core


def test_stop_strings_are_the_step_formats(served):
    service, _, _ = served
    other = PolicyClient(service.address, timeout=5, retries=1, stop=["</s>"])
    same = PolicyClient(service.address, timeout=5, retries=1, stop=list(steps.GENERATION_STOPS))
    try:
        assert _code(lambda: other.generate(ITEMS[:1], SamplingParams())) == grpc.StatusCode.INVALID_ARGUMENT
        assert len(same.generate(ITEMS[:1], SamplingParams())[0]) == 3
    finally:
        other.close()
        same.close()


def test_unavailable_and_not_serving_until_a_core_is_there():
    service = create_server(config()).start()  # no core, and its load step (vLLM) never runs here
    client = PolicyClient(service.address, timeout=5, retries=1)
    try:
        assert service.core is None
        assert _code(lambda: client.generate(ITEMS, SamplingParams())) == grpc.StatusCode.UNAVAILABLE
        assert health(service) == NOT_SERVING
        info = client.info()
        assert not info.ready and list(info.models) == []
        service.servicer.slot.swap(WalkPolicy(version="walk-late"), "walk-late")  # what the load step does
        assert wait_health(service, SERVING) == SERVING
        assert client.generate(ITEMS, SamplingParams()).model_version == "walk-late"
    finally:
        client.close()
        service.close()
    assert health_after_close(service) != SERVING


def health_after_close(service) -> int | None:
    try:
        return health(service)
    except grpc.RpcError:
        return None  # the server is gone


def test_deadline_reaches_the_core_and_the_service_stays_healthy():
    core = Gated(WalkPolicy())
    service = create_server(config(), core=core).start()
    try:
        with grpc.insecure_channel(service.address) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            req = policy_pb2.GenerateRequest(items=[policy_pb2.GenerationItem(
                prefix=common_pb2.Prefix(question="What is 2 + 3?"), n=1, seed=1)])
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            end = time.monotonic() + 5
            while not core.scopes[0].stopped and time.monotonic() < end:
                time.sleep(0.01)
            assert core.scopes[0].stopped             # the engine learns the caller is gone
            core.gate.set()
            assert len(stub.Generate(req, timeout=5).results) == 1
        assert health(service) == SERVING
    finally:
        core.gate.set()
        service.close()


def _in_flight(client, out: list) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(
        client.generate(ITEMS[:1], SamplingParams(), CallScope(time.monotonic() + 20))))
    t.start()
    return t


def test_beside_reload_keeps_the_in_flight_request_on_the_old_version():
    old = Gated(WalkPolicy(version="v1"))
    service = create_server(config(), core=old).start()
    client = PolicyClient(service.address, timeout=10, retries=1)
    out: list = []
    try:
        t = _in_flight(client, out)
        assert old.entered.wait(5)
        service.servicer.slot.loader(lambda v, _dir: WalkPolicy(version=v))("v2", None)
        assert client.generate(ITEMS[:1], SamplingParams()).model_version == "v2"  # new requests: new version
        assert health(service) == SERVING                                         # never left SERVING
        old.gate.set()
        t.join(5)
        assert out[0].model_version == "v1"                                       # in flight: old version
    finally:
        old.gate.set()
        client.close()
        service.close()


def test_drain_reload_is_not_serving_while_it_swaps():
    old = Gated(WalkPolicy(version="v1"))
    service = create_server(config(), core=old).start()
    slot = service.servicer.slot
    slot.two_copies = False  # what --reload-mode drain sets
    client = PolicyClient(service.address, timeout=10, retries=1)
    out: list = []
    try:
        t = _in_flight(client, out)
        assert old.entered.wait(5)
        swapper = threading.Thread(target=slot.loader(lambda v, _dir: WalkPolicy(version=v)), args=("v2", None))
        swapper.start()
        assert wait_health(service, NOT_SERVING) == NOT_SERVING   # draining: load balancers stop sending
        assert swapper.is_alive()                                 # waits for the in-flight request
        old.gate.set()
        t.join(5)
        swapper.join(5)
        assert out[0].model_version == "v1"
        assert wait_health(service, SERVING) == SERVING
        assert client.generate(ITEMS[:1], SamplingParams()).model_version == "v2"
    finally:
        old.gate.set()
        client.close()
        service.close()


@pytest.mark.timeout(120)
def test_overload_is_resource_exhausted_at_once_and_the_health_port_answers():
    """Every handler busy: one more call is refused at once (not queued), health still answers."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import free_port

    core = Gated(WalkPolicy())
    hport = free_port()
    service = create_server(config(health_port=hport), core=core).start()
    busy = [PolicyClient(service.address, timeout=60, retries=1) for _ in range(16)]
    pool = ThreadPoolExecutor(16)
    try:
        futures = [pool.submit(c.generate, ITEMS[:1], SamplingParams(max_tokens=8)) for c in busy]
        end = time.monotonic() + 20
        while len(core.scopes) < 16 and time.monotonic() < end:   # all 16 handler threads inside the core
            time.sleep(0.02)
        assert len(core.scopes) == 16
        t0 = time.monotonic()
        with grpc.insecure_channel(service.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                policy_pb2_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{hport}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        assert status == SERVING and time.monotonic() - t0 < 1.0
        core.gate.set()
        assert all(len(f.result(30)) == 1 for f in futures)    # the admitted calls all finish
    finally:
        core.gate.set()
        pool.shutdown(wait=True)
        for c in busy:
            c.close()
        service.close()
