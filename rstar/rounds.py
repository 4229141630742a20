"""Round state: where one self-evolution round stands, as typed records and pure transitions.

One owner for what both round drivers share: the Kubernetes controller
(`trainer.controller`, one Job per task) and `rstar evolve` (`trainer.evolve`,
every task in one process). Either can take over a round the other started.

A round is five stages run in order (`STAGES`); the synthesis stage has one task
per shard (`synthesis-<i>`), every other stage one task named after it.

Records
- `RoundState`: round number, overall status (`running` | `succeeded` |
  `failed`) and the reason of a failure, the current stage (`done` once the
  round succeeded), timestamps (started, deadline, finished, updated), the
  number of synthesis shards, the tasks by id, and the stage summaries the
  drivers copied from `rounds/round-<n>/<stage>.json`.
- `TaskState`: one task's status (`pending` | `running` | `succeeded` |
  `failed`), its attempt number (1, 2, ... over the round's whole life), its
  tries (attempts since the last explicit re-run; what `max_attempts` counts),
  the job that runs the current attempt (a Kubernetes Job name, or
  `local-<pid>-a<k>` for `rstar evolve`), when that attempt started and
  ended, and the failed attempts (attempt, job, reason, time).
- A pending task that still names a job is an attempt whose runner must be
  (re)created under that name (the controller found its Job gone); a pending
  task without one waits for a new attempt (`next_attempt`).

Transitions are pure functions `f(state, ...) -> new state`: no I/O, no clock
(the caller passes `now`), the argument is never modified. Each checks that
the event is legal (a task starts only when pending and when every earlier
stage has succeeded, only a running task can succeed or fail, a round
succeeds only when every task has) and raises `RoundStateError` otherwise.

Stored form: `rounds/round-<n>/state.json` (`state_key`), JSON with sorted keys,
written with the store's atomic `put` (`save_state`). `SCHEMA` 1 is the format
`trainer/controller.py` wrote before this module existed (examples in
tests/fixtures/rounds/); this module writes the same keys plus the tasks'
`started_at`/`finished_at` (null in older files), so an older controller or
`rstar evolve`, which carry unknown keys along, still reads what it writes.
Reading is tolerant of additions: unknown fields are kept in `extra` and
written back; a schema other than `SUPPORTED_SCHEMAS` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from rstar.store import NotFound, ObjectStore

SCHEMA = 1
SUPPORTED_SCHEMAS = (1,)

STAGES: tuple[str, ...] = ("synthesis", "train-policy", "train-ppm", "eval", "promote")
SHARDED_STAGE = "synthesis"
DONE = "done"  # RoundState.stage once the round succeeded

PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
TASK_STATUSES: tuple[str, ...] = (PENDING, RUNNING, SUCCEEDED, FAILED)
ROUND_STATUSES: tuple[str, ...] = (RUNNING, SUCCEEDED, FAILED)
TaskStatus = Literal["pending", "running", "succeeded", "failed"]
RoundStatus = Literal["running", "succeeded", "failed"]

_STATE_KEY = re.compile(r"^rounds/round-(\d+)/state\.json$")


class RoundStateError(ValueError):
    """A state that breaks the schema, or an event that is not legal in the state it is applied to."""


# --------------------------------------------------------------------------- keys


def round_prefix(round_no: int) -> str:
    return f"rounds/round-{round_no}/"


def state_key(round_no: int) -> str:
    return f"{round_prefix(round_no)}state.json"


def summary_key(round_no: int, stage: str) -> str:
    """Where a stage (or `synthesis-<i>`, one shard) writes its JSON summary."""
    return f"{round_prefix(round_no)}{stage}.json"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Task:
    """A task's identity: a stage, and the shard for synthesis."""

    stage: str
    shard: int | None = None

    @property
    def id(self) -> str:
        return self.stage if self.shard is None else f"{self.stage}-{self.shard}"


def round_tasks(shards: int) -> list[Task]:
    """All tasks of a round with `shards` synthesis shards, in the order they run."""
    if shards < 1:
        raise RoundStateError(f"shards must be >= 1, got {shards}")
    return [Task(SHARDED_STAGE, i) for i in range(shards)] + [Task(s) for s in STAGES if s != SHARDED_STAGE]


@dataclass(frozen=True)
class Failure:
    """One failed attempt of a task."""

    attempt: int
    reason: str
    at: float
    job: str | None = None  # absent in files `rstar evolve` wrote before this module
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskState:
    stage: str
    shard: int | None = None
    status: TaskStatus = PENDING
    attempt: int = 0
    tries: int = 0
    job: str | None = None
    failures: tuple[Failure, ...] = ()
    started_at: float | None = None  # when the current (or last) attempt started; absent before this module
    finished_at: float | None = None  # when it succeeded or failed
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return Task(self.stage, self.shard)

    @property
    def id(self) -> str:
        return self.task.id


@dataclass(frozen=True)
class RoundState:
    """Where a round stands. Treat as immutable: the transitions below return new states."""

    round: int
    status: RoundStatus
    stage: str
    started_at: float
    deadline_at: float
    shards: int
    tasks: Mapping[str, TaskState]  # by task id, in run order
    reason: str = ""
    finished_at: float | None = None
    updated_at: float = 0.0
    summaries: Mapping[str, Any] = field(default_factory=dict)
    driver: str | None = None  # who started it, when not the controller ("rstar evolve (local)")
    schema: int = SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise `RoundStateError` unless the state is well-formed."""
        where = f"round {self.round}"
        if self.schema not in SUPPORTED_SCHEMAS:
            raise RoundStateError(f"{where}: unsupported state schema {self.schema!r}")
        if not isinstance(self.round, int) or self.round < 1:
            raise RoundStateError(f"round must be a positive integer, got {self.round!r}")
        if self.status not in ROUND_STATUSES:
            raise RoundStateError(f"{where}: status {self.status!r} is not one of {ROUND_STATUSES}")
        if self.stage not in (*STAGES, DONE):
            raise RoundStateError(f"{where}: stage {self.stage!r} is not one of {(*STAGES, DONE)}")
        if (self.stage == DONE) != (self.status == SUCCEEDED):
            raise RoundStateError(f"{where}: stage {self.stage!r} with status {self.status!r}")
        if (self.finished_at is None) != (self.status == RUNNING):
            raise RoundStateError(f"{where}: finished_at {self.finished_at!r} with status {self.status!r}")
        expected = [t.id for t in round_tasks(self.shards)]
        if sorted(self.tasks) != sorted(expected):
            raise RoundStateError(f"{where}: tasks {sorted(self.tasks)} do not match {self.shards} shard(s)")
        for tid, t in self.tasks.items():
            if t.id != tid:
                raise RoundStateError(f"{where}: task {tid!r} says it is {t.id!r}")
            if t.status not in TASK_STATUSES:
                raise RoundStateError(f"{where}: task {tid}: status {t.status!r} is not one of {TASK_STATUSES}")
            if not 0 <= t.tries <= t.attempt:
                raise RoundStateError(f"{where}: task {tid}: tries {t.tries} outside 0..attempt {t.attempt}")
            if t.status == RUNNING and not t.job:
                raise RoundStateError(f"{where}: task {tid} is running without a job")
        if self.status == SUCCEEDED and any(t.status != SUCCEEDED for t in self.tasks.values()):
            raise RoundStateError(f"{where}: succeeded with unfinished tasks")

    # -- queries -------------------------------------------------------------------------------
    def task_ids(self, stage: str | None = None) -> list[str]:
        """Task ids in run order (stage order, then shard), optionally of one stage."""
        return [t.id for t in round_tasks(self.shards) if stage is None or t.stage == stage]

    def stage_tasks(self, stage: str) -> list[TaskState]:
        return [self.tasks[tid] for tid in self.task_ids(stage)]

    def count(self, stage: str, status: str) -> int:
        return sum(1 for t in self.stage_tasks(stage) if t.status == status)

    def stage_succeeded(self, stage: str) -> bool:
        return all(t.status == SUCCEEDED for t in self.stage_tasks(stage))

    def current_stage(self) -> str | None:
        """The first stage with a task that has not succeeded; None: every task has."""
        return next((s for s in STAGES if not self.stage_succeeded(s)), None)

    # -- stored form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            schema=self.schema, round=self.round, status=self.status, reason=self.reason, stage=self.stage,
            started_at=self.started_at, deadline_at=self.deadline_at, finished_at=self.finished_at,
            updated_at=self.updated_at, shards=self.shards,
            tasks={tid: _task_to_dict(t) for tid, t in self.tasks.items()},
            summaries=dict(self.summaries))
        if self.driver is not None:
            out["driver"] = self.driver
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, default=str).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundState:
        """Parse (and validate) the stored form; `RoundStateError` if it is not a round state."""
        if not isinstance(data, Mapping):
            raise RoundStateError(f"a round state is a JSON object, got {type(data).__name__}")
        if data.get("schema") not in SUPPORTED_SCHEMAS:
            raise RoundStateError(f"unsupported state schema {data.get('schema')!r} "
                                  f"(this code reads {SUPPORTED_SCHEMAS})")
        try:
            raw_tasks = data["tasks"]
            tasks = {str(tid): _task_from_dict(t) for tid, t in raw_tasks.items()}
            shards = int(data["shards"])
            order = {t.id: i for i, t in enumerate(round_tasks(shards))}
            state = cls(
                schema=int(data["schema"]), round=int(data["round"]), status=data["status"],
                reason=str(data.get("reason") or ""), stage=data["stage"],
                started_at=float(data["started_at"]), deadline_at=float(data["deadline_at"]),
                finished_at=_opt_float(data.get("finished_at")), updated_at=float(data.get("updated_at") or 0.0),
                shards=shards,
                tasks=dict(sorted(tasks.items(), key=lambda kv: order.get(kv[0], len(order)))),
                summaries=dict(data.get("summaries") or {}), driver=data.get("driver"),
                extra={k: v for k, v in data.items() if k not in _ROUND_FIELDS})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, RoundStateError):
                raise
            raise RoundStateError(f"not a round state: {type(e).__name__}: {e}") from e
        state.validate()
        return state

    @classmethod
    def from_json(cls, blob: bytes | str) -> RoundState:
        try:
            data = json.loads(blob)
        except ValueError as e:
            raise RoundStateError(f"round state is not JSON: {e}") from e
        return cls.from_dict(data)


_ROUND_FIELDS = frozenset({"schema", "round", "status", "reason", "stage", "started_at", "deadline_at",
                           "finished_at", "updated_at", "shards", "tasks", "summaries", "driver"})
_TASK_FIELDS = frozenset({"stage", "shard", "status", "attempt", "tries", "job", "failures", "started_at",
                          "finished_at"})
_FAILURE_FIELDS = frozenset({"attempt", "reason", "at", "job"})


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _failure_from_dict(d: Mapping[str, Any]) -> Failure:
    return Failure(attempt=int(d["attempt"]), reason=str(d.get("reason", "")), at=float(d["at"]),
                   job=d.get("job"), extra={k: v for k, v in d.items() if k not in _FAILURE_FIELDS})


def _failure_to_dict(f: Failure) -> dict[str, Any]:
    out = {**f.extra, "attempt": f.attempt, "reason": f.reason, "at": f.at}
    if f.job is not None:
        out["job"] = f.job
    return out


def _task_from_dict(d: Mapping[str, Any]) -> TaskState:
    shard = d.get("shard")
    return TaskState(stage=str(d["stage"]), shard=None if shard is None else int(shard), status=d["status"],
                     attempt=int(d.get("attempt", 0)), tries=int(d.get("tries", 0)), job=d.get("job"),
                     failures=tuple(_failure_from_dict(f) for f in d.get("failures") or ()),
                     started_at=_opt_float(d.get("started_at")), finished_at=_opt_float(d.get("finished_at")),
                     extra={k: v for k, v in d.items() if k not in _TASK_FIELDS})


def _task_to_dict(t: TaskState) -> dict[str, Any]:
    return {**t.extra, "stage": t.stage, "shard": t.shard, "status": t.status, "attempt": t.attempt,
            "tries": t.tries, "job": t.job, "failures": [_failure_to_dict(f) for f in t.failures],
            "started_at": t.started_at, "finished_at": t.finished_at}


# --------------------------------------------------------------------------- transitions (pure)


def new_round(round_no: int, shards: int, now: float, deadline_seconds: float,
              driver: str | None = None) -> RoundState:
    """A round that has just started: every task pending, at the first stage."""
    state = RoundState(round=round_no, status=RUNNING, stage=STAGES[0], started_at=now,
                       deadline_at=now + deadline_seconds, shards=shards, updated_at=now,
                       tasks={t.id: TaskState(t.stage, t.shard) for t in round_tasks(shards)}, driver=driver)
    state.validate()
    return state


def next_attempt(task: TaskState) -> int:
    """The attempt number `task_started` gives the task: the same one if it still names a job, else the next."""
    return task.attempt if task.job else task.attempt + 1


def stage_entered(state: RoundState, stage: str) -> RoundState:
    """The round works on `stage` now (it must be the first stage that has not succeeded)."""
    _require_running(state, f"enter stage {stage}")
    if stage != state.current_stage():
        raise RoundStateError(f"round {state.round}: cannot enter {stage!r}; the current stage is "
                              f"{state.current_stage()!r}")
    return state if stage == state.stage else dataclasses.replace(state, stage=stage)


def task_started(state: RoundState, task_id: str, job: str, now: float) -> RoundState:
    """A pending task runs as `job`: a new attempt (attempt and tries + 1), or the same attempt re-created
    under its name when the task still names a job."""
    t = _task(state, task_id, "start")
    _require_running(state, f"start {task_id}")
    if t.status != PENDING:
        raise RoundStateError(f"round {state.round}: {task_id} is {t.status}, only a pending task starts")
    if not job:
        raise RoundStateError(f"round {state.round}: {task_id} needs a job name to start")
    state = stage_entered(state, t.stage)
    new = t.job is None
    return _with_task(state, dataclasses.replace(
        t, status=RUNNING, job=job, attempt=t.attempt + new, tries=t.tries + new, started_at=now,
        finished_at=None))


def task_succeeded(state: RoundState, task_id: str, now: float) -> RoundState:
    """A running task's job ended well (the job name stays as the record of who did it)."""
    t = _running_task(state, task_id, "succeed")
    return _with_task(state, dataclasses.replace(t, status=SUCCEEDED, finished_at=now))


def task_retried(state: RoundState, task_id: str, reason: str, now: float) -> RoundState:
    """A running task's attempt failed and will be retried: the failure is recorded, the task waits
    (pending, no job) for a new attempt."""
    return _attempt_failed(state, task_id, reason, now, PENDING)


def task_failed(state: RoundState, task_id: str, reason: str, now: float) -> RoundState:
    """A running task's attempt failed for good (no retry left): the task is failed. The round still runs;
    the driver ends it with `round_failed`."""
    return _attempt_failed(state, task_id, reason, now, FAILED)


def job_lost(state: RoundState, task_id: str) -> RoundState:
    """The job of a running task vanished (deleted, TTL, never created): the same attempt is to be
    re-created under the same name (the task stays pending and keeps its job)."""
    t = _running_task(state, task_id, "lose the job of")
    return _with_task(state, dataclasses.replace(t, status=PENDING))


def summary_recorded(state: RoundState, stage: str, summary: Mapping[str, Any]) -> RoundState:
    """A stage's summary (its `summary_key` object) is copied into the state."""
    if stage not in STAGES:
        raise RoundStateError(f"unknown stage {stage!r}")
    return dataclasses.replace(state, summaries={**state.summaries, stage: summary})


def round_succeeded(state: RoundState, now: float) -> RoundState:
    """Every task has succeeded: the round is done."""
    _require_running(state, "succeed")
    left = [tid for tid, t in state.tasks.items() if t.status != SUCCEEDED]
    if left:
        raise RoundStateError(f"round {state.round}: cannot succeed with unfinished tasks {left}")
    return dataclasses.replace(state, status=SUCCEEDED, stage=DONE, reason="", finished_at=now)


def round_failed(state: RoundState, reason: str, now: float) -> RoundState:
    """The round ends failed. Tasks still running lose their job (the driver stops them): they are pending
    again, so a re-run gives them new attempts."""
    _require_running(state, "fail")
    tasks = {tid: dataclasses.replace(t, status=PENDING, job=None) if t.status == RUNNING else t
             for tid, t in state.tasks.items()}
    return dataclasses.replace(state, status=FAILED, reason=reason, finished_at=now, tasks=tasks)


def round_rerun(state: RoundState, now: float, deadline_seconds: float) -> RoundState:
    """An explicit re-run of a failed round: it runs again with a new deadline; the tasks that did not
    succeed get fresh tries (their attempt numbers go on)."""
    if state.status != FAILED:
        raise RoundStateError(f"round {state.round} is {state.status}; only a failed round is re-run")
    return _reopen(state, now, deadline_at=now + deadline_seconds, fresh_tries=True)


def round_resumed(state: RoundState, now: float) -> RoundState:
    """A driver that runs tasks itself (`rstar evolve`) picks up a round whose earlier process is gone:
    the round runs again, and tasks left running or failed wait for a new attempt (tries go on)."""
    if state.status == SUCCEEDED:
        raise RoundStateError(f"round {state.round} has succeeded; there is nothing to resume")
    return _reopen(state, now, deadline_at=state.deadline_at, fresh_tries=False)


def _reopen(state: RoundState, now: float, deadline_at: float, fresh_tries: bool) -> RoundState:
    tasks = {}
    for tid, t in state.tasks.items():
        if t.status in (RUNNING, FAILED):
            t = dataclasses.replace(t, status=PENDING, job=None)
        if fresh_tries:
            t = dataclasses.replace(t, tries=0)
        tasks[tid] = t
    state = dataclasses.replace(state, status=RUNNING, reason="", finished_at=None, deadline_at=deadline_at,
                                tasks=tasks)
    stage = state.current_stage()
    return dataclasses.replace(state, stage=stage) if stage is not None else state


def _attempt_failed(state: RoundState, task_id: str, reason: str, now: float, status: str) -> RoundState:
    t = _running_task(state, task_id, "fail")
    failure = Failure(attempt=t.attempt, reason=reason, at=now, job=t.job)
    return _with_task(state, dataclasses.replace(t, status=status, job=None, finished_at=now,
                                                 failures=(*t.failures, failure)))


def _task(state: RoundState, task_id: str, what: str) -> TaskState:
    try:
        return state.tasks[task_id]
    except KeyError:
        raise RoundStateError(f"round {state.round}: cannot {what} {task_id!r}: no such task") from None


def _running_task(state: RoundState, task_id: str, what: str) -> TaskState:
    t = _task(state, task_id, what)
    _require_running(state, f"{what} {task_id}")
    if t.status != RUNNING:
        raise RoundStateError(f"round {state.round}: cannot {what} {task_id}: it is {t.status}, not running")
    return t


def _require_running(state: RoundState, what: str) -> None:
    if state.status != RUNNING:
        raise RoundStateError(f"round {state.round} is {state.status}: cannot {what}")


def _with_task(state: RoundState, task: TaskState) -> RoundState:
    return dataclasses.replace(state, tasks={**state.tasks, task.id: task})


# --------------------------------------------------------------------------- the store


def load_state(store: ObjectStore, round_no: int) -> RoundState | None:
    """The round's state, or None if the round was never started."""
    try:
        blob = store.get(state_key(round_no))
    except NotFound:
        return None
    try:
        state = RoundState.from_json(blob)
    except RoundStateError as e:
        raise RoundStateError(f"{state_key(round_no)}: {e}") from e
    if state.round != round_no:
        raise RoundStateError(f"{state_key(round_no)} holds round {state.round}")
    return state


def save_state(store: ObjectStore, state: RoundState, now: float) -> RoundState:
    """Write the state (stamped `updated_at=now`) in one atomic put; returns what was written."""
    state = dataclasses.replace(state, updated_at=now)
    state.validate()
    store.put(state_key(state.round), state.to_json())
    return state


def known_rounds(store: ObjectStore) -> list[int]:
    """Numbers of the rounds that have a state, ascending."""
    out = []
    for key in store.list("rounds/"):
        m = _STATE_KEY.match(key)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def last_success_time(store: ObjectStore) -> float | None:
    """finished_at of the newest succeeded round, if any."""
    for n in reversed(known_rounds(store)):
        st = load_state(store, n)
        if st is not None and st.status == SUCCEEDED and st.finished_at:
            return float(st.finished_at)
    return None
