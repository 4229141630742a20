"""Round state (`rstar.rounds`): pure transitions, validation, the stored form, and both drivers reading it.

tests/fixtures/rounds/*.json were written by the code before rstar/rounds.py
existed (trainer/controller.py's dict format, driven by the controller against a
fake API and by `rstar evolve` with stubbed stages); see the README there.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from rstar import rounds
from rstar.rounds import FAILED, PENDING, RUNNING, SUCCEEDED, RoundState, RoundStateError
from rstar.store import LocalStore

FIXTURES = Path(__file__).parent / "fixtures" / "rounds"
T0 = 1_000.0


def fresh(shards: int = 2) -> RoundState:
    return rounds.new_round(3, shards, T0, deadline_seconds=100)


def run_stage_to_success(st: RoundState, stage: str, now: float = T0) -> RoundState:
    for tid in st.task_ids(stage):
        st = rounds.task_started(st, tid, f"job-{tid}", now)
        st = rounds.task_succeeded(st, tid, now + 1)
    return st


def all_succeeded(shards: int = 2) -> RoundState:
    st = fresh(shards)
    for stage in rounds.STAGES:
        st = run_stage_to_success(st, stage)
    return st


# --------------------------------------------------------------------------- files written by the old code


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_state_files_written_before_this_module_load_and_round_trip(path):
    old = json.loads(path.read_text())
    st = RoundState.from_json(path.read_bytes())
    assert st.round == old["round"] and st.status == old["status"] and st.stage == old["stage"]
    assert {tid: (t.status, t.attempt, t.tries, t.job) for tid, t in st.tasks.items()} == {
        tid: (t["status"], t["attempt"], t["tries"], t["job"]) for tid, t in old["tasks"].items()}
    written = st.to_dict()
    for t in written["tasks"].values():  # the only keys this module adds; older readers carry them along
        assert t.pop("started_at") is None and t.pop("finished_at") is None
    assert written == old


def test_fixtures_cover_both_drivers_and_every_round_status():
    states = [RoundState.from_json(p.read_bytes()) for p in FIXTURES.glob("*.json")]
    assert {s.status for s in states} == {RUNNING, SUCCEEDED, FAILED}
    assert {s.driver for s in states} == {None, "rstar evolve (local)"}
    assert any(f.job is None for s in states for t in s.tasks.values() for f in t.failures)  # evolve's failures


def test_what_this_module_writes_keeps_every_key_the_old_readers_use():
    old = json.loads((FIXTURES / "controller-running.json").read_text())
    new = all_succeeded().to_dict()
    assert set(old) <= set(new) and new["schema"] == 1
    assert set(old["tasks"]["synthesis-0"]) <= set(new["tasks"]["synthesis-0"])


# --------------------------------------------------------------------------- transitions


def test_a_new_round_has_every_task_pending_in_run_order():
    st = fresh(shards=3)
    assert st.status == RUNNING and st.stage == "synthesis" and st.deadline_at == T0 + 100
    assert st.task_ids() == ["synthesis-0", "synthesis-1", "synthesis-2", "train-policy", "train-ppm", "eval",
                             "promote"]
    assert all(t.status == PENDING and t.attempt == 0 and t.job is None for t in st.tasks.values())


def test_transitions_do_not_modify_their_argument():
    st = rounds.task_started(fresh(), "synthesis-0", "j", T0)
    before = copy.deepcopy(st.to_dict())
    rounds.task_retried(st, "synthesis-0", "boom", T0 + 1)
    rounds.task_succeeded(st, "synthesis-0", T0 + 1)
    rounds.round_failed(st, "stop", T0 + 1)
    rounds.summary_recorded(st, "synthesis", {"solved": 1})
    assert st.to_dict() == before


def test_starting_a_task_is_a_new_attempt():
    st = rounds.task_started(fresh(), "synthesis-1", "rstar-r3-synthesis-1-a1", T0 + 5)
    t = st.tasks["synthesis-1"]
    assert (t.status, t.attempt, t.tries, t.job, t.started_at) == (RUNNING, 1, 1, "rstar-r3-synthesis-1-a1", T0 + 5)


def test_a_lost_job_is_recreated_as_the_same_attempt():
    st = rounds.task_started(fresh(), "synthesis-0", "rstar-r3-synthesis-0-a1", T0)
    st = rounds.job_lost(st, "synthesis-0")
    t = st.tasks["synthesis-0"]
    assert t.status == PENDING and t.job == "rstar-r3-synthesis-0-a1" and rounds.next_attempt(t) == 1
    st = rounds.task_started(st, "synthesis-0", "rstar-r3-synthesis-0-a1", T0 + 1)
    assert (st.tasks["synthesis-0"].attempt, st.tasks["synthesis-0"].tries) == (1, 1)


def test_a_retried_task_records_the_failure_and_waits_for_a_new_attempt():
    st = rounds.task_started(fresh(), "synthesis-0", "a1", T0)
    st = rounds.task_retried(st, "synthesis-0", "OOMKilled", T0 + 2)
    t = st.tasks["synthesis-0"]
    assert t.status == PENDING and t.job is None and rounds.next_attempt(t) == 2
    assert t.failures == (rounds.Failure(attempt=1, reason="OOMKilled", at=T0 + 2, job="a1"),)
    assert st.status == RUNNING


def test_a_failed_task_stays_failed_until_the_round_is_rerun():
    st = rounds.task_started(fresh(), "synthesis-0", "a1", T0)
    st = rounds.task_failed(st, "synthesis-0", "exit 1", T0 + 2)
    assert st.tasks["synthesis-0"].status == FAILED and st.status == RUNNING
    with pytest.raises(RoundStateError, match="only a pending task"):
        rounds.task_started(st, "synthesis-0", "a2", T0 + 3)


def test_a_task_of_a_later_stage_cannot_start_before_the_earlier_stages_succeed():
    st = fresh()
    with pytest.raises(RoundStateError, match="current stage is 'synthesis'"):
        rounds.task_started(st, "train-policy", "j", T0)
    st = run_stage_to_success(st, "synthesis")
    st = rounds.task_started(st, "train-policy", "j", T0)
    assert st.stage == "train-policy"


def test_only_a_running_task_can_succeed_or_fail():
    st = fresh()
    for event in (lambda: rounds.task_succeeded(st, "synthesis-0", T0),
                  lambda: rounds.task_retried(st, "synthesis-0", "x", T0),
                  lambda: rounds.task_failed(st, "synthesis-0", "x", T0),
                  lambda: rounds.job_lost(st, "synthesis-0")):
        with pytest.raises(RoundStateError, match="not running"):
            event()
    with pytest.raises(RoundStateError, match="no such task"):
        rounds.task_started(st, "synthesis-9", "j", T0)


def test_a_round_succeeds_only_when_every_task_has():
    st = run_stage_to_success(fresh(), "synthesis")
    with pytest.raises(RoundStateError, match="unfinished tasks"):
        rounds.round_succeeded(st, T0 + 9)
    done = rounds.round_succeeded(all_succeeded(), T0 + 9)
    assert (done.status, done.stage, done.finished_at, done.current_stage()) == (SUCCEEDED, "done", T0 + 9, None)


def test_a_failed_round_stops_its_running_tasks_and_accepts_no_more_events():
    st = rounds.task_started(rounds.task_started(fresh(), "synthesis-0", "a", T0), "synthesis-1", "b", T0)
    st = rounds.round_failed(st, "deadline exceeded", T0 + 50)
    assert (st.status, st.reason, st.finished_at) == (FAILED, "deadline exceeded", T0 + 50)
    assert all(t.status == PENDING and t.job is None for t in st.stage_tasks("synthesis"))
    with pytest.raises(RoundStateError, match="is failed"):
        rounds.task_started(st, "synthesis-0", "c", T0 + 51)


def test_a_rerun_gives_unfinished_tasks_fresh_tries_and_the_round_a_new_deadline():
    st = run_stage_to_success(fresh(), "synthesis")
    st = rounds.task_started(st, "train-policy", "a1", T0)
    st = rounds.task_failed(st, "train-policy", "NaN", T0 + 1)
    st = rounds.round_failed(st, "train-policy failed", T0 + 1)
    again = rounds.round_rerun(st, T0 + 500, deadline_seconds=100)
    t = again.tasks["train-policy"]
    assert (again.status, again.reason, again.finished_at, again.deadline_at) == (RUNNING, "", None, T0 + 600)
    assert (t.status, t.job, t.tries, t.attempt, rounds.next_attempt(t)) == (PENDING, None, 0, 1, 2)
    assert again.tasks["synthesis-0"].status == SUCCEEDED and again.tasks["synthesis-0"].tries == 0
    with pytest.raises(RoundStateError, match="only a failed round"):
        rounds.round_rerun(again, T0, 100)


def test_a_resumed_round_restarts_what_was_running_as_new_attempts():
    st = rounds.task_started(run_stage_to_success(fresh(), "synthesis"), "train-policy", "local-1-a1", T0)
    resumed = rounds.round_resumed(st, T0 + 1)
    t = resumed.tasks["train-policy"]
    assert (t.status, t.job, t.tries, rounds.next_attempt(t)) == (PENDING, None, 1, 2)
    assert resumed.deadline_at == st.deadline_at and resumed.stage == "train-policy"
    with pytest.raises(RoundStateError, match="nothing to resume"):
        rounds.round_resumed(rounds.round_succeeded(all_succeeded(), T0), T0)


def test_a_summary_is_recorded_per_stage():
    st = rounds.summary_recorded(fresh(), "synthesis", {"solved": 3, "total": 4})
    assert st.summaries == {"synthesis": {"solved": 3, "total": 4}}
    with pytest.raises(RoundStateError):
        rounds.summary_recorded(st, "synthesis-0", {})


# --------------------------------------------------------------------------- validation and the stored form


def test_another_schema_is_refused():
    data = fresh().to_dict()
    data["schema"] = 2
    with pytest.raises(RoundStateError, match="unsupported state schema 2"):
        RoundState.from_dict(data)


@pytest.mark.parametrize("break_it", [
    lambda d: d.update(status="paused"),
    lambda d: d.update(stage="deploy"),
    lambda d: d.update(shards=3),  # tasks of 2 shards
    lambda d: d["tasks"]["eval"].update(status="done"),
    lambda d: d["tasks"]["eval"].update(tries=2),  # more tries than attempts
    lambda d: d["tasks"]["eval"].update(stage="promote"),
    lambda d: d.update(status="succeeded", stage="done", finished_at=1.0),  # with pending tasks
    lambda d: d.pop("tasks"),
], ids=["status", "stage", "shards", "task-status", "tries", "task-id", "succeeded-early", "no-tasks"])
def test_a_malformed_state_is_refused(break_it):
    data = fresh().to_dict()
    break_it(data)
    with pytest.raises(RoundStateError):
        RoundState.from_dict(data)


def test_unknown_fields_are_kept_and_written_back():
    data = fresh().to_dict()
    data["operator_note"] = "rerun after the node pool upgrade"
    data["tasks"]["eval"]["node"] = "gpu-3"
    st = RoundState.from_dict(data)
    assert st.to_dict()["operator_note"] == "rerun after the node pool upgrade"
    assert st.to_dict()["tasks"]["eval"]["node"] == "gpu-3"


def test_save_and_load_through_the_store(tmp_path):
    store = LocalStore(tmp_path)
    st = rounds.task_started(fresh(), "synthesis-0", "j", T0)
    saved = rounds.save_state(store, st, T0 + 7)
    assert saved.updated_at == T0 + 7 and store.exists("rounds/round-3/state.json")
    assert rounds.load_state(store, 3) == saved
    assert rounds.load_state(store, 4) is None
    store.put("rounds/round-12/state.json", rounds.new_round(12, 1, T0, 10).to_json())
    store.put("rounds/round-5/synthesis.json", b"{}")
    store.put("rounds/round-x/state.json", b"{}")
    assert rounds.known_rounds(store) == [3, 12]
    assert rounds.state_key(3) == "rounds/round-3/state.json"
    assert rounds.summary_key(3, "synthesis-1") == "rounds/round-3/synthesis-1.json"


def test_a_state_under_the_wrong_round_key_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    store.put(rounds.state_key(4), fresh().to_json())  # holds round 3
    with pytest.raises(RoundStateError, match="holds round 3"):
        rounds.load_state(store, 4)


# --------------------------------------------------------------------------- both drivers read it


def _store_with(tmp_path, fixture: str, round_no: int | None = None) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    blob = (FIXTURES / fixture).read_bytes()
    store.put(rounds.state_key(round_no or json.loads(blob)["round"]), blob)
    return store


class JobApi:
    """Just enough BatchV1Api for one controller step against a cluster that has no Jobs."""

    def __init__(self):
        self.created: list[str] = []

    def list_namespaced_job(self, namespace, label_selector=None):
        return type("JobList", (), {"items": []})()

    def create_namespaced_job(self, namespace, body):
        self.created.append(body["metadata"]["name"])

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        pass


def test_the_controller_resumes_a_round_from_a_file_the_old_controller_wrote(tmp_path):
    from trainer import controller as ctl

    store = _store_with(tmp_path, "controller-running.json")
    cfg = ctl.ControllerConfig(shards=2, metrics_port=0)
    st, why = ctl.choose_round(store, cfg, 1_000_030.0)
    assert why == "resuming round 2" and st.tasks["train-policy"].job == "rstar-r2-train-policy-a1"
    api = JobApi()
    st = ctl.Controller(cfg, api, store, "ns", clock=lambda: 1_000_030.0).step(st)
    assert api.created == ["rstar-r2-train-policy-a1"]  # the vanished Job, recreated under its name
    assert rounds.load_state(store, 2).tasks["train-policy"].attempt == 1


def test_the_controller_reruns_a_round_that_rstar_evolve_left_failed(tmp_path):
    from trainer import controller as ctl

    store = _store_with(tmp_path, "evolve-failed.json")
    cfg = ctl.ControllerConfig(round="1", shards=2, metrics_port=0)
    st, why = ctl.choose_round(store, cfg, 3_000_000.0)
    assert why == "re-running failed round 1"
    api = JobApi()
    st = ctl.Controller(cfg, api, store, "ns", clock=lambda: 3_000_000.0).step(st)
    assert api.created == ["rstar-r1-train-policy-a2"]  # synthesis is not rerun; the attempt count goes on


def _stub_stages(monkeypatch, fail: str | None = None) -> list[str]:
    from trainer import evolve

    ran = []

    def run_stage(ctx, stage, round_no, shard=0, shards=1):
        ran.append(stage if stage != "synthesis" else f"synthesis-{shard}")
        if stage == fail:
            raise RuntimeError(f"{stage} broke")
        ctx.put_json(rounds.summary_key(round_no, stage), {"stage": stage})
        return {"stage": stage}

    monkeypatch.setattr(evolve, "run_stage", run_stage)
    return ran


def _ctx(tmp_path, store: LocalStore | None = None, **kw):
    from trainer import evolve

    return evolve.Context(evolve.EvolveConfig(store_url=str(store.root if store else tmp_path / "store"),
                                              work_dir=str(tmp_path / "work"), **kw))


def test_rstar_evolve_resumes_a_round_from_a_file_the_old_evolve_wrote(tmp_path, monkeypatch):
    from trainer import evolve

    store = _store_with(tmp_path, "evolve-failed.json")
    ran = _stub_stages(monkeypatch)
    ctx = _ctx(tmp_path, store)
    assert evolve.next_round(ctx) == 1
    st = evolve.run_round(ctx, 1)
    assert ran == ["train-policy", "train-ppm", "eval", "promote"]
    assert st.status == SUCCEEDED and st.tasks["train-policy"].attempt == 2
    assert st.tasks["train-policy"].failures[0].reason.startswith("StageError")
    assert rounds.load_state(store, 1) == st


def test_rstar_evolve_picks_up_a_round_the_controller_started(tmp_path, monkeypatch):
    from trainer import evolve

    store = _store_with(tmp_path, "controller-running.json")
    ran = _stub_stages(monkeypatch)
    st = evolve.run_round(_ctx(tmp_path, store), 2)
    assert ran == ["train-policy", "train-ppm", "eval", "promote"] and st.status == SUCCEEDED
    assert st.tasks["train-policy"].attempt == 2 and st.tasks["synthesis-1"].job == "rstar-r2-synthesis-1-a1"


def test_a_round_rstar_evolve_saved_is_adopted_by_the_controller(tmp_path, monkeypatch):
    from trainer import controller as ctl
    from trainer import evolve

    _stub_stages(monkeypatch, fail="train-ppm")
    ctx = _ctx(tmp_path, shards=2)
    with pytest.raises(RuntimeError, match="train-ppm broke"):
        evolve.run_round(ctx, 1)
    saved = rounds.load_state(ctx.store, 1)
    assert saved.driver == evolve.LOCAL_DRIVER and saved.status == FAILED
    assert saved.tasks["train-ppm"].failures[0].job == f"local-{os.getpid()}-a1"
    assert saved.summaries["synthesis"] == {"stage": "synthesis"}
    st, why = ctl.choose_round(ctx.store, ctl.ControllerConfig(round="1", shards=2, metrics_port=0), 5e9)
    assert why == "re-running failed round 1" and st.shards == 2
    api = JobApi()
    ctl.Controller(ctl.ControllerConfig(round="1", shards=2), api, ctx.store, "ns", clock=lambda: 5e9).step(st)
    assert api.created == ["rstar-r1-train-ppm-a2"]
