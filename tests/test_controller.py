"""Evolution-round controller: Job specs as data, and its logic against a fake Kubernetes API.

No kube-apiserver can run on this machine (see docs/kubernetes.md), so the
round logic (launch, watch, retry a failed shard, resume after a crash, stop on
the deadline) runs against `FakeBatchApi`, which implements exactly the three
BatchV1Api calls the controller makes and returns the real `kubernetes.client`
model objects. The Job manifests are validated against the Kubernetes schemas.
"""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes.client import V1Job, V1JobCondition, V1JobList, V1JobStatus, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from rstar import metrics, rounds
from rstar.store import LocalStore
from trainer import controller as ctl
from trainer.controller import Controller, ControllerConfig, Task

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: run scripts/ensure_tools.sh")

K8S_VERSIONS = ("1.33.0", "1.37.0")


def cfg(**kw) -> ControllerConfig:
    base = dict(shards=3, parallelism=2, max_attempts=2, poll_seconds=10.0, round_deadline_seconds=10_000,
                metrics_port=0, linger_seconds=0)
    base.update(kw)
    c = ControllerConfig(**base)
    c.validate()
    return c


# --------------------------------------------------------------------------- fake API


class FakeBatchApi:
    """In-memory BatchV1Api: create_namespaced_job, list_namespaced_job, delete_namespaced_job only."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}  # name -> manifest (dict), with a "_phase" key
        self.calls: list[tuple[str, str]] = []
        self.fail_list = 0  # next N list calls raise 500

    def create_namespaced_job(self, namespace, body):
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        assert body["metadata"]["namespace"] == namespace
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        job = copy.deepcopy(body)
        job["_phase"] = ("running", "")
        self.jobs[name] = job
        return job

    def list_namespaced_job(self, namespace, label_selector=None):
        self.calls.append(("list", label_selector))
        if self.fail_list:
            self.fail_list -= 1
            raise ApiException(status=500, reason="etcd hiccup")
        key, _, value = (label_selector or "").partition("=")
        items = []
        for name, job in self.jobs.items():
            if job["metadata"]["namespace"] != namespace:
                continue
            if key and job["metadata"]["labels"].get(key) != value:
                continue
            phase, reason = job["_phase"]
            conditions = None
            if phase == "succeeded":
                conditions = [V1JobCondition(type="Complete", status="True")]
            elif phase == "failed":
                conditions = [V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded",
                                             message=reason)]
            status = V1JobStatus(active=1 if phase == "running" else None,
                                 succeeded=1 if phase == "succeeded" else None,
                                 failed=1 if phase == "failed" else None, conditions=conditions)
            items.append(V1Job(metadata=V1ObjectMeta(name=name, namespace=namespace,
                                                     labels=dict(job["metadata"]["labels"])), status=status))
        return V1JobList(items=items)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append(("delete", name))
        assert propagation_policy == "Background"
        if name not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        del self.jobs[name]

    # test helpers
    def finish(self, name, ok=True, reason=""):
        self.jobs[name]["_phase"] = ("succeeded", "") if ok else ("failed", reason or "exit code 1")

    def running(self):
        return sorted(n for n, j in self.jobs.items() if j["_phase"][0] == "running")


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def make(tmp_path, api=None, **kw):
    c = cfg(**kw)
    store = LocalStore(tmp_path / "store")
    clock = Clock()
    api = api or FakeBatchApi()
    return c, store, clock, api


def drive(c, store, clock, api, on_tick, max_ticks=200):
    """Run the controller; `on_tick(api, tick)` plays the cluster between polls."""
    ticks = {"n": 0}

    def sleep(s):
        clock.t += s
        ticks["n"] += 1
        if ticks["n"] > max_ticks:
            raise AssertionError("controller did not finish")
        on_tick(api, ticks["n"])

    state, _ = ctl.choose_round(store, c, clock())
    return Controller(c, api, store, "rstar", clock=clock, sleep=sleep).run(state)


def succeed_all(api, _tick):
    for name in api.running():
        api.finish(name)


# --------------------------------------------------------------------------- Job specs as data


@pytest.mark.parametrize("task", ctl.round_tasks(cfg()), ids=lambda t: t.id)
def test_job_specs_validate_against_kubernetes_schemas(task):
    c = cfg(gpus_per_job=1, gpu_node_selector='{"nvidia.com/gpu.present": "true"}',
            gpu_tolerations='[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]')
    job = ctl.build_job(c, "rstar", 12, task, 3)
    for version in K8S_VERSIONS:
        kv.validate(job, version, strict=True)


def test_job_spec_contents():
    c = cfg(gpus_per_job=2, image="rstar-vllm:0.1.0",
            gpu_node_selector='{"pool": "gpu"}', gpu_tolerations='[{"key": "gpu", "operator": "Exists"}]')
    shard = ctl.build_job(c, "ns1", 4, Task("synthesis", 2), 1)
    assert shard["metadata"]["name"] == "rstar-r4-synthesis-2-a1"
    assert shard["metadata"]["namespace"] == "ns1"
    pod = shard["spec"]["template"]["spec"]
    (box,) = pod["containers"]
    assert box["command"] == ["rstar", "evolve", "--stage", "synthesis", "--round", "4", "--shard", "2",
                              "--shards", "3"]
    assert box["image"] == "rstar-vllm:0.1.0"
    assert "nvidia.com/gpu" not in box["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert shard["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert shard["spec"]["activeDeadlineSeconds"] == c.job_deadline_seconds
    assert shard["metadata"]["labels"]["rstar.io/round"] == "4"
    assert shard["metadata"]["labels"]["rstar.io/shard"] == "2"
    assert shard["spec"]["template"]["metadata"]["labels"] == shard["metadata"]["labels"]
    # hardening: no API token, non-root, read-only root fs, no capabilities
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = box["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert {"configMapRef": {"name": "rstar-config"}} in box["envFrom"]
    assert {"secretRef": {"name": "rstar-s3"}} in box["envFrom"]

    train = ctl.build_job(c, "ns1", 4, Task("train-policy"), 2)
    pod = train["spec"]["template"]["spec"]
    (box,) = pod["containers"]
    assert box["command"] == ["rstar", "evolve", "--stage", "train-policy", "--round", "4"]
    assert box["image"] == "rstar-vllm:0.1.0"
    assert box["resources"]["limits"]["nvidia.com/gpu"] == "2" == box["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "gpu"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])

    promote = ctl.build_job(c, "ns1", 4, Task("promote"), 1)
    assert "nvidia.com/gpu" not in promote["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # no GPU requested at all when gpus_per_job is 0 (cpu-dev)
    cpu_train = ctl.build_job(cfg(), "ns1", 4, Task("train-ppm"), 1)
    assert "nvidia.com/gpu" not in json.dumps(cpu_train)


def test_job_names_are_dns_labels_and_unique():
    c = cfg(shards=64)
    names = {ctl.job_name(9999, t, a) for t in ctl.round_tasks(c) for a in (1, 2, 10)}
    assert len(names) == len(ctl.round_tasks(c)) * 3
    with pytest.raises(ValueError):
        ctl.job_name(10**60, Task("synthesis", 1), 1)


def test_config_validation_and_env():
    with pytest.raises(ctl.ConfigError):
        ControllerConfig(round="next").validate()
    with pytest.raises(ctl.ConfigError):
        ControllerConfig(gpu_tolerations="{}").validate()
    from rstar.config import build
    c = build(ControllerConfig, "EVOLUTION", env={"RSTAR_EVOLUTION_SHARDS": "8", "RSTAR_EVOLUTION_GPUS_PER_JOB": "1"})
    assert c.shards == 8 and c.gpus_per_job == 1


# --------------------------------------------------------------------------- round logic


def test_full_round_runs_stages_in_order_with_parallel_shards(tmp_path):
    c, store, clock, api = make(tmp_path)
    order = []

    def tick(api, _):
        running = api.running()
        order.append(running)
        # synthesis runs at most `parallelism` shards at once; later stages one at a time
        assert len(running) <= 2
        succeed_all(api, _)

    store.put("rounds/round-1/synthesis.json", json.dumps({"solved": 3, "total": 4}).encode())
    state = drive(c, store, clock, api, tick)
    assert state.status == "succeeded" and state.round == 1
    created = [n for op, n in api.calls if op == "create"]
    assert created == ["rstar-r1-synthesis-0-a1", "rstar-r1-synthesis-1-a1", "rstar-r1-synthesis-2-a1",
                       "rstar-r1-train-policy-a1", "rstar-r1-train-ppm-a1", "rstar-r1-eval-a1",
                       "rstar-r1-promote-a1"]
    assert order[0] == ["rstar-r1-synthesis-0-a1", "rstar-r1-synthesis-1-a1"]
    saved = json.loads(store.get("rounds/round-1/state.json"))
    assert saved["status"] == "succeeded" and saved["finished_at"] == clock.t
    assert saved["summaries"]["synthesis"] == {"solved": 3, "total": 4}
    assert metrics.EVOLUTION_SOLVED_RATIO.labels("1")._value.get() == pytest.approx(0.75)
    assert metrics.EVOLUTION_LAST_SUCCESS._value.get() == clock.t
    assert metrics.EVOLUTION_ROUND._value.get() == 1
    assert metrics.EVOLUTION_STAGE.labels("1", "done")._value.get() == 1
    # every list call is scoped to the round's label
    assert all(sel == "rstar.io/round=1" for op, sel in api.calls if op == "list")
    # the next run starts round 2
    nxt, why = ctl.choose_round(store, c, clock())
    assert nxt.round == 2 and "starting" in why


def test_failed_shard_is_retried_as_a_new_attempt(tmp_path):
    c, store, clock, api = make(tmp_path)
    retries_before = ctl.TASK_RETRIES.labels("synthesis")._value.get()

    def tick(api, n):
        for name in api.running():
            api.finish(name, ok=(name != "rstar-r1-synthesis-1-a1"), reason="OOMKilled")

    state = drive(c, store, clock, api, tick)
    assert state.status == "succeeded"
    t = state.tasks["synthesis-1"]
    assert t.attempt == 2 and t.job == "rstar-r1-synthesis-1-a2"
    assert t.failures[0].job == "rstar-r1-synthesis-1-a1" and "OOMKilled" in t.failures[0].reason
    assert ("delete", "rstar-r1-synthesis-1-a1") in api.calls
    assert ctl.TASK_RETRIES.labels("synthesis")._value.get() == retries_before + 1


def test_task_failing_every_attempt_fails_the_round(tmp_path):
    c, store, clock, api = make(tmp_path, max_attempts=2)
    failures_before = metrics.EVOLUTION_FAILURES._value.get()

    def tick(api, n):
        for name in api.running():
            api.finish(name, ok=not name.startswith("rstar-r1-train-ppm"), reason="loss is NaN")

    state = drive(c, store, clock, api, tick)
    assert state.status == "failed"
    assert "train-ppm failed 2 times" in state.reason and "loss is NaN" in state.reason
    assert [n for op, n in api.calls if op == "create" and "train-ppm" in n] == [
        "rstar-r1-train-ppm-a1", "rstar-r1-train-ppm-a2"]
    assert not any("eval" in n for op, n in api.calls if op == "create")  # stopped: later stages never ran
    assert metrics.EVOLUTION_FAILURES._value.get() == failures_before + 1
    # auto does not resume a failed round: the next run starts a new one ...
    nxt, _ = ctl.choose_round(store, c, clock())
    assert nxt.round == 2
    # ... an explicit --round 1 re-runs only what did not succeed, with fresh tries
    c1 = cfg(round="1")
    again, why = ctl.choose_round(store, c1, clock())
    assert "re-running" in why and again.tasks["train-policy"].status == "succeeded"
    state = Controller(c1, api, store, "rstar", clock=clock, sleep=lambda s: succeed_all(api, 0)).run(again)
    assert state.status == "succeeded"
    assert state.tasks["train-ppm"].job == "rstar-r1-train-ppm-a3"


def test_round_stops_on_deadline_and_deletes_running_jobs(tmp_path):
    c, store, clock, api = make(tmp_path, round_deadline_seconds=100, poll_seconds=30)
    state = drive(c, store, clock, api, lambda api, n: None)  # Jobs never finish
    assert state.status == "failed" and "deadline" in state.reason
    assert api.jobs == {}  # both running shard Jobs deleted
    deleted = [n for op, n in api.calls if op == "delete"]
    assert sorted(deleted) == ["rstar-r1-synthesis-0-a1", "rstar-r1-synthesis-1-a1"]
    assert clock.t >= 1_000_100


def test_crashed_controller_resumes_round_and_adopts_jobs(tmp_path):
    c, store, clock, api = make(tmp_path)

    class Crash(Exception):
        pass

    def crash_after_train_policy_started(api, n):
        succeed_all(api, n) if "rstar-r1-train-policy-a1" not in api.jobs else None
        if "rstar-r1-train-policy-a1" in api.jobs:
            raise Crash

    with pytest.raises(Crash):
        drive(c, store, clock, api, crash_after_train_policy_started)
    saved = json.loads(store.get("rounds/round-1/state.json"))
    assert saved["status"] == "running" and saved["stage"] == "train-policy"
    assert saved["tasks"]["train-policy"]["job"] == "rstar-r1-train-policy-a1"
    creates_before = [n for op, n in api.calls if op == "create"]

    # a new controller process (new Controller, state read back from the store) picks the round up
    state, why = ctl.choose_round(store, c, clock())
    assert why == "resuming round 1"
    api.calls.clear()
    state = Controller(c, api, store, "rstar", clock=clock, sleep=lambda s: succeed_all(api, 0)).run(state)
    assert state.status == "succeeded"
    created = [n for op, n in api.calls if op == "create"]
    # synthesis is not re-run; the running train-policy Job is adopted, not recreated
    assert not any("synthesis" in n for n in created)
    assert "rstar-r1-train-policy-a1" not in created
    assert created == ["rstar-r1-train-ppm-a1", "rstar-r1-eval-a1", "rstar-r1-promote-a1"]
    assert len(creates_before) == 4


def test_crash_between_saving_and_creating_recreates_same_job(tmp_path):
    """State says a Job runs but the API has none (crash before create, or the Job was deleted)."""
    c, store, clock, api = make(tmp_path, shards=1)
    state = rounds.task_started(ctl.new_state(c, 5, clock()), "synthesis-0", "rstar-r5-synthesis-0-a1", clock())
    rounds.save_state(store, state, clock())
    state, why = ctl.choose_round(store, cfg(shards=1, round="5"), clock())
    state = Controller(c, api, store, "rstar", clock=clock, sleep=lambda s: None).step(state)
    assert [n for op, n in api.calls if op == "create"] == ["rstar-r5-synthesis-0-a1"]  # same name, same attempt
    assert state.tasks["synthesis-0"].attempt == 1


def test_create_conflict_is_adopted_and_api_errors_are_survived(tmp_path):
    c, store, clock, api = make(tmp_path, shards=1)
    # the Job exists already (created by a controller that crashed before saving)
    api.create_namespaced_job("rstar", ctl.build_job(c, "rstar", 1, Task("synthesis", 0), 1))
    api.fail_list = 2  # the API server is flaky for two polls
    state = drive(c, store, clock, api, succeed_all)
    assert state.status == "succeeded"
    assert [n for op, n in api.calls if op == "create"].count("rstar-r1-synthesis-0-a1") == 2  # 1 ours + 1 conflict
    assert state.tasks["synthesis-0"].attempt == 1


def test_explicit_round_that_succeeded_does_nothing(tmp_path):
    c, store, clock, api = make(tmp_path, shards=1)
    drive(c, store, clock, api, succeed_all)
    st, why = ctl.choose_round(store, cfg(round="1"), clock())
    assert st is None and "already succeeded" in why
    assert ctl.last_success_time(store) == clock.t


def test_main_runs_a_round_with_an_injected_api(tmp_path, monkeypatch):
    api = FakeBatchApi()
    monkeypatch.setattr(ctl.time, "sleep", lambda s: succeed_all(api, 0))
    rc = ctl.main(["--store-url", str(tmp_path / "s"), "--namespace", "ev", "--shards", "2", "--metrics-port", "0",
                   "--poll-seconds", "1"], api=api)
    assert rc == 0
    assert all(j["metadata"]["namespace"] == "ev" for j in api.jobs.values())
    assert json.loads(LocalStore(tmp_path / "s").get("rounds/round-1/state.json"))["status"] == "succeeded"
