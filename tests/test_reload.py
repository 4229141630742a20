"""Hot reload, the one mechanism of the policy and PPM services: ModelSlot swap semantics (beside
and drain, readiness reported to health, close), ModelWatcher outcomes and metrics, and a steady
request stream through a promotion and a broken promotion (zero failures)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from rstar.registry import ModelRegistry
from rstar.reload import ModelSlot, ModelWatcher, SlotUnavailable
from rstar.store import LocalStore
from s3_gateway import private_s3_gateway, s3_gateway  # noqa: F401  (pytest fixtures)


class FakeModel:
    """Stands in for an engine: knows its version, can be closed, refuses work once closed."""

    def __init__(self, version: str, path: Path | None = None):
        self.version, self.path, self.closed = version, path, False
        if path is not None:
            cfg = json.loads((path / "config.json").read_text())
            if cfg.get("broken"):
                raise RuntimeError("weights do not fit the architecture")

    def infer(self, x: int) -> str:
        assert not self.closed, "request ran on a closed model"
        return f"{self.version}:{x}"

    def close(self) -> None:
        self.closed = True


def build(version: str, path: Path) -> FakeModel:
    return FakeModel(version, path)


def reloads(service: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("rstar_model_reloads_total",
                                     {"service": service, "model": "policy", "outcome": outcome}) or 0.0


def info(service: str, version: str) -> float | None:
    return REGISTRY.get_sample_value("rstar_model_info", {"service": service, "model": "policy", "version": version})


def closed_soon(model: FakeModel, timeout: float = 2.0) -> bool:
    """The last request to let go of a retired model closes it in the background."""
    end = time.monotonic() + timeout
    while not model.closed and time.monotonic() < end:
        time.sleep(0.005)
    return model.closed


def make_model(path: Path, tag: str, broken: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"tag": tag, "broken": broken}))
    (path / "model.safetensors").write_bytes(tag.encode() * 1000)
    return path


# --------------------------------------------------------------------------- ModelSlot


def test_in_flight_request_finishes_on_the_old_model():
    slot: ModelSlot[FakeModel] = ModelSlot("t-slot", "policy", close=FakeModel.close)
    with pytest.raises(SlotUnavailable, match="no policy model"):
        with slot.acquire(timeout=0.05):
            pass
    slot.swap(FakeModel("v1"), "v1")
    assert info("t-slot", "v1") == 1
    with slot.acquire() as held:
        slot.swap(FakeModel("v2"), "v2")
        assert slot.version == "v2"
        assert held.version == "v1" and not held.model.closed  # still usable mid-request
        assert held.model.infer(1) == "v1:1"
        with slot.acquire() as fresh:
            assert fresh.version == "v2"
    assert closed_soon(held.model)  # closed once the last request let go
    assert info("t-slot", "v2") == 1 and info("t-slot", "v1") is None


def test_slot_reports_readiness_and_close_waits_for_the_last_request():
    ready: list[bool] = []
    slot: ModelSlot[FakeModel] = ModelSlot("t-ready", "policy", close=FakeModel.close, on_ready=ready.append)
    assert not slot.ready and ready == []
    slot.swap(FakeModel("v1"), "v1")
    slot.swap(FakeModel("v2"), "v2")                 # beside: stays ready, told once
    assert slot.ready and ready == [True]
    with slot.acquire() as held:
        slot.close()
        assert ready == [True, False] and not slot.ready
        assert not held.model.closed and held.model.infer(1) == "v2:1"  # the in-flight request finishes
        with pytest.raises(SlotUnavailable):
            with slot.acquire(timeout=1):
                pass
    assert closed_soon(held.model) and info("t-ready", "v2") is None


def test_drain_mode_waits_for_in_flight_and_blocks_new_requests(tmp_path):
    events: list[str] = []
    slot: ModelSlot[FakeModel] = ModelSlot("t-drain", "policy", close=lambda m: (events.append(f"close {m.version}"),
                                                                                 m.close()),
                                           two_copies=False, on_ready=lambda r: events.append(f"ready {r}"))
    load = slot.loader(build)
    load("v1", make_model(tmp_path / "v1", "v1"))
    release = threading.Event()

    def long_request():
        with slot.acquire() as m:
            release.wait(5)
            events.append(f"request done on {m.model.infer(0)}")

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.05)
    swapper = threading.Thread(target=load, args=("v2", make_model(tmp_path / "v2", "v2")))
    swapper.start()
    time.sleep(0.1)
    assert swapper.is_alive()  # waiting for the in-flight request
    with pytest.raises(SlotUnavailable, match="swapping"):
        with slot.acquire(timeout=0.05):
            pass
    release.set()
    t.join(5)
    swapper.join(5)
    # health: SERVING with v1, NOT_SERVING while draining, SERVING again once v2 is in
    assert events == ["ready True", "ready False", "request done on v1:0", "close v1", "ready True"]
    with slot.acquire() as m:
        assert m.version == "v2"


def test_drain_mode_failed_load_restores_the_old_version(tmp_path):
    slot: ModelSlot[FakeModel] = ModelSlot("t-drain2", "policy", close=FakeModel.close, two_copies=False)
    load = slot.loader(build)
    load("v1", make_model(tmp_path / "v1", "v1"))
    with pytest.raises(RuntimeError, match="architecture"):
        load("v2", make_model(tmp_path / "v2", "v2", broken=True))
    with slot.acquire(timeout=1) as m:
        assert m.version == "v1" and m.model.infer(3) == "v1:3"
    assert slot.ready


# --------------------------------------------------------------------------- ModelWatcher


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_watcher_loads_promotions_and_refuses_broken_versions(registry, tmp_path):
    svc = "t-watch"
    slot: ModelSlot[FakeModel] = ModelSlot(svc, "policy", close=FakeModel.close)
    calls: list[tuple[str, Path]] = []
    load = slot.loader(build)
    watcher = ModelWatcher(registry, "policy", lambda v, p: (calls.append((v, p)), load(v, p)), service=svc)
    assert watcher.check_once() == "unchanged"  # nothing promoted yet
    registry.publish("policy", make_model(tmp_path / "m1", "v1"), "v1")
    registry.promote("policy", "v1")
    assert watcher.check_once() == "ok"
    assert calls == [("v1", registry.cache_dir / "policy" / "v1")] and slot.version == "v1"
    assert watcher.check_once() == "unchanged"
    ok0, failed0 = reloads(svc, "ok"), reloads(svc, "failed")

    # a version whose loader raises: refused, old one kept, counted once, not retried
    registry.publish("policy", make_model(tmp_path / "m2", "v2", broken=True), "v2")
    registry.promote("policy", "v2")
    assert watcher.check_once() == "failed"
    assert watcher.check_once() == "skipped"
    assert slot.version == "v1" and "architecture" in watcher.last_error
    assert reloads(svc, "failed") == failed0 + 1

    # a corrupted file: the verified fetch refuses it before the loader sees it
    registry.publish("policy", make_model(tmp_path / "m3", "v3"), "v3")
    registry.promote("policy", "v3")
    good = registry.store.get("models/policy/v3/model.safetensors")
    registry.store.put("models/policy/v3/model.safetensors", good[::-1])
    n = len(calls)
    assert watcher.check_once() == "failed"
    assert len(calls) == n and slot.version == "v1" and "sha256" in watcher.last_error
    assert not (registry.cache_dir / "policy" / "v3").exists()

    # a good version afterwards is picked up
    registry.publish("policy", make_model(tmp_path / "m4", "v4"), "v4")
    registry.promote("policy", "v4")
    assert watcher.check_once() == "ok" and slot.version == "v4"
    assert reloads(svc, "ok") == ok0 + 1 and reloads(svc, "failed") == failed0 + 2

    # rollback to a version that failed earlier is tried again (CURRENT moved)
    registry.store.put("models/policy/CURRENT", b"v1")
    assert watcher.check_once() == "ok" and slot.version == "v1"


def test_watcher_retries_after_the_store_comes_back(private_s3_gateway, tmp_path):
    gw = private_s3_gateway
    svc = "t-watch-s3"
    reg = ModelRegistry(gw.store(prefix="reg"), cache_dir=tmp_path / "cache")
    reg.publish("policy", make_model(tmp_path / "m1", "v1"), "v1")
    reg.promote("policy", "v1")
    slot: ModelSlot[FakeModel] = ModelSlot(svc, "policy", close=FakeModel.close)
    watcher = ModelWatcher(reg, "policy", slot.loader(build), service=svc)
    assert watcher.check_once() == "ok"
    reg.publish("policy", make_model(tmp_path / "m2", "v2"), "v2")
    reg.promote("policy", "v2")
    gw.stop()
    assert watcher.check_once() == "failed"  # store down: transient, old model keeps serving
    assert "unavailable" in watcher.last_error and slot.version == "v1"
    gw.start()
    assert watcher.check_once() == "ok" and slot.version == "v2"


def _stream_requests(slot: ModelSlot[FakeModel], stop: threading.Event, per_client: list[list[str]],
                     failures: list[str], clients: int = 3) -> list[threading.Thread]:
    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                with slot.acquire(timeout=5) as m:
                    time.sleep(0.002)  # a request that takes a while, so swaps land mid-request
                    per_client[i].append(m.model.infer(n).split(":")[0])
            except Exception as e:
                failures.append(repr(e))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def _switches(seq: list[str]) -> list[str]:
    return [v for i, v in enumerate(seq) if i == 0 or seq[i - 1] != v]


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("two_copies", [True, False], ids=["beside", "drain"])
def test_hot_reload_under_load(backend, two_copies, tmp_path, request):
    """Steady request stream; promote v2: zero failures, each client switches exactly once.
    Then promote a broken v3: zero failures, v2 still served, failure counted."""
    if backend == "local":
        st = LocalStore(tmp_path / "store")
    else:
        st = request.getfixturevalue("s3_gateway").store(prefix="reg")
    reg = ModelRegistry(st, cache_dir=tmp_path / "cache")
    svc = f"t-load-{backend}-{two_copies}"
    reg.publish("policy", make_model(tmp_path / "m1", "v1"), "v1")
    reg.promote("policy", "v1")
    slot: ModelSlot[FakeModel] = ModelSlot(svc, "policy", close=FakeModel.close, two_copies=two_copies)
    watcher = ModelWatcher(reg, "policy", slot.loader(build), service=svc, interval_s=0.05)
    assert watcher.check_once() == "ok"  # initial load before serving
    watcher.start()
    stop, failures = threading.Event(), []
    per_client: list[list[str]] = [[] for _ in range(3)]
    threads = _stream_requests(slot, stop, per_client, failures)
    try:
        time.sleep(0.2)
        reg.publish("policy", make_model(tmp_path / "m2", "v2"), "v2")
        reg.promote("policy", "v2")
        deadline = time.monotonic() + 10
        while slot.version != "v2" and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        failed_before = reloads(svc, "failed")
        reg.publish("policy", make_model(tmp_path / "m3", "v3", broken=True), "v3")
        reg.promote("policy", "v3")
        deadline = time.monotonic() + 10
        while reloads(svc, "failed") == failed_before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        watcher.stop()
    assert failures == []
    for seq in per_client:
        assert _switches(seq) == ["v1", "v2"], _switches(seq)  # exactly one switch, never back
        assert seq.count("v1") > 2 and seq.count("v2") > 2
    assert slot.version == "v2" and reloads(svc, "failed") == failed_before + 1
    assert reloads(svc, "ok") >= 2
