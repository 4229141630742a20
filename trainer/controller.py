"""Evolution-round controller: runs one self-evolution round as Kubernetes Jobs.

A round is five stages run in order: ``synthesis`` (N shards in parallel, CPU
MCTS with the served policy/PPM and the sandbox service) -> ``train-policy`` ->
``train-ppm`` -> ``eval`` (GPU stages) -> ``promote``. Each stage runs the
command ``rstar evolve --stage <stage> --round <n>`` (synthesis shards add
``--shard i --shards N``) in a Job the controller creates; the controller
only builds, launches, watches, retries and cleans up Jobs.

Where a round stands is a ``rstar.rounds.RoundState`` (typed state, pure
transitions, shared with ``rstar evolve``), kept in the object store at
``rounds/round-<n>/state.json`` and written before every Job is created, so a
controller that crashes (or whose CronJob pod is evicted) resumes the round:
Jobs that still exist are adopted, Jobs that vanished are recreated under the
same name, finished tasks are never rerun.

Design points
- Job specs come from the pure function :func:`build_job` (tests check them
  as data and against the Kubernetes schemas).
- The controller polls ``list_namespaced_job`` with a label selector instead of
  holding a watch: a poll every ``poll_seconds`` is cheap for a handful of Jobs,
  survives API-server restarts and watch expiry, and keeps the RBAC to
  create/list/delete on Jobs (see k8s/base/evolution/rbac.yaml).
- Jobs run with ``backoffLimit`` 0 (by default): a failed task is retried by the
  controller as a new attempt (new Job name), up to ``max_attempts``, so every
  retry is visible in state.json and in ``rstar_evolution_task_retries_total``.
- A round has a deadline: past it, the controller deletes the round's running
  Jobs and marks the round failed.
- Stage Jobs may write a JSON summary to ``rounds/round-<n>/<stage>.json``; the
  controller copies it into state.json and exports the synthesis solved ratio.

Run: ``python -m trainer.controller --round auto`` (env ``RSTAR_EVOLUTION_*``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from prometheus_client import Counter, Gauge

from rstar import metrics, rounds
from rstar.config import ConfigError, field, parse
from rstar.rounds import (DONE, PENDING, RUNNING, STAGES, SUCCEEDED, TASK_STATUSES, RoundState, Task,
                          last_success_time, load_state, save_state, summary_key)
from rstar.store import NotFound, open_store

log = logging.getLogger("trainer.controller")

GPU_STAGES = frozenset({"train-policy", "train-ppm", "eval"})
LABEL_PREFIX = "rstar.io"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# Controller-specific metrics (the round-level ones live in rstar.metrics).
TASKS = Gauge("rstar_evolution_tasks", "Tasks of the current round by stage and status.", ["stage", "status"])
TASK_RETRIES = Counter("rstar_evolution_task_retries_total", "Failed stage Jobs retried as a new attempt.", ["stage"])
JOBS_CREATED = Counter("rstar_evolution_jobs_created_total", "Stage Jobs created.", ["stage"])


@dataclass
class ControllerConfig:
    round: str = field("auto", "Round to run: 'auto' (resume the running one or start the next) or a number")
    namespace: str = field("", "Namespace of the Jobs; empty: the pod's own namespace, else 'default'")
    store_url: str = field("", "Object store URL; empty: $RSTAR_STORE_URL, else the local default")
    image: str = field("rstar-vllm-cpu:0.1.0", "Image of the stage Jobs (the engine image: stages load models)")
    shards: int = field(4, "Synthesis shards (one Job each)")
    parallelism: int = field(4, "Synthesis shard Jobs running at once")
    max_attempts: int = field(3, "Attempts per task before the round fails")
    round_deadline_seconds: int = field(86400, "The round fails when it is not done this long after it started")
    job_deadline_seconds: int = field(21600, "activeDeadlineSeconds of each stage Job")
    job_backoff_limit: int = field(0, "backoffLimit of each stage Job (pod retries inside one attempt)")
    job_ttl_seconds: int = field(86400, "ttlSecondsAfterFinished of each stage Job")
    poll_seconds: float = field(15.0, "Seconds between two looks at the round's Jobs")
    env_configmap: str = field("rstar-config", "ConfigMap passed to stage Jobs with envFrom")
    env_secret: str = field("rstar-s3", "Secret passed to stage Jobs with envFrom (object-store credentials)")
    cpu_request: str = field("1", "CPU request of CPU stages")
    cpu_limit: str = field("2", "CPU limit of CPU stages")
    memory: str = field("2Gi", "Memory request and limit of CPU stages")
    gpu_cpu_request: str = field("2", "CPU request of GPU stages")
    gpu_cpu_limit: str = field("4", "CPU limit of GPU stages")
    gpu_memory: str = field("8Gi", "Memory request and limit of GPU stages")
    gpu_resource: str = field("nvidia.com/gpu", "Extended resource name of a GPU")
    gpus_per_job: int = field(0, "GPUs per training/eval Job (0: run them on CPU)")
    gpu_node_selector: str = field("{}", "JSON object: nodeSelector of GPU stage pods")
    gpu_tolerations: str = field("[]", "JSON list: tolerations of GPU stage pods")
    work_volume_size: str = field("20Gi", "sizeLimit of each Job's scratch volume (/var/lib/rstar)")
    run_as_user: int = field(10001, "UID of stage containers (the images' non-root user)")
    metrics_port: int = field(9105, "Port of the controller's /metrics (0: none)")
    linger_seconds: float = field(30.0, "Keep serving /metrics this long after the round ends (final scrape)")
    log_level: str = field("INFO", "Log level")

    def validate(self) -> None:
        if self.round != "auto" and not self.round.isdigit():
            raise ConfigError(f"round: expected 'auto' or a number, got {self.round!r}")
        if self.shards < 1 or self.parallelism < 1 or self.max_attempts < 1:
            raise ConfigError("shards, parallelism and max_attempts must be >= 1")
        if self.poll_seconds <= 0 or self.round_deadline_seconds <= 0 or self.job_deadline_seconds <= 0:
            raise ConfigError("poll_seconds and the deadlines must be > 0")
        if self.gpus_per_job < 0:
            raise ConfigError("gpus_per_job must be >= 0")
        try:
            sel, tol = json.loads(self.gpu_node_selector), json.loads(self.gpu_tolerations)
        except json.JSONDecodeError as e:
            raise ConfigError(f"gpu_node_selector/gpu_tolerations must be JSON: {e}") from e
        if not isinstance(sel, dict) or not isinstance(tol, list):
            raise ConfigError("gpu_node_selector must be a JSON object and gpu_tolerations a JSON list")


# --------------------------------------------------------------------------- tasks and Job specs


def round_tasks(cfg: ControllerConfig) -> list[Task]:
    """All tasks of a round, in stage order."""
    return rounds.round_tasks(cfg.shards)


def job_name(round_n: int, task: Task, attempt: int) -> str:
    """DNS-1123 Job name, unique per round, task and attempt (<= 63 chars)."""
    name = f"rstar-r{round_n}-{task.id}-a{attempt}"
    if len(name) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"job name {name!r} is not a valid DNS-1123 label")
    return name


def job_labels(round_n: int, task: Task, attempt: int) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "rstar-evolution",
        "app.kubernetes.io/component": "evolution-stage",
        "app.kubernetes.io/part-of": "rstar",
        "app.kubernetes.io/managed-by": "rstar-evolution-controller",
        f"{LABEL_PREFIX}/round": str(round_n),
        f"{LABEL_PREFIX}/stage": task.stage,
        f"{LABEL_PREFIX}/attempt": str(attempt),
    }
    if task.shard is not None:
        labels[f"{LABEL_PREFIX}/shard"] = str(task.shard)
    return labels


def stage_command(cfg: ControllerConfig, round_n: int, task: Task) -> list[str]:
    cmd = ["rstar", "evolve", "--stage", task.stage, "--round", str(round_n)]
    if task.shard is not None:
        cmd += ["--shard", str(task.shard), "--shards", str(cfg.shards)]
    return cmd


def build_job(cfg: ControllerConfig, namespace: str, round_n: int, task: Task, attempt: int) -> dict[str, Any]:
    """The Job manifest (a plain dict, batch/v1) for one attempt of one task."""
    gpu = task.stage in GPU_STAGES
    labels = job_labels(round_n, task, attempt)
    if gpu:
        resources: dict[str, Any] = {
            "requests": {"cpu": cfg.gpu_cpu_request, "memory": cfg.gpu_memory},
            "limits": {"cpu": cfg.gpu_cpu_limit, "memory": cfg.gpu_memory},
        }
        if cfg.gpus_per_job > 0:
            resources["requests"][cfg.gpu_resource] = str(cfg.gpus_per_job)
            resources["limits"][cfg.gpu_resource] = str(cfg.gpus_per_job)
    else:
        resources = {
            "requests": {"cpu": cfg.cpu_request, "memory": cfg.memory},
            "limits": {"cpu": cfg.cpu_limit, "memory": cfg.memory},
        }
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "work", "emptyDir": {"sizeLimit": cfg.work_volume_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "work", "mountPath": "/var/lib/rstar"},
    ]
    if gpu:  # torch/vLLM need a real /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    env = [
        {"name": "RSTAR_HOME", "value": "/var/lib/rstar"},
        {"name": "HOME", "value": "/tmp"},
    ]
    container: dict[str, Any] = {
        "name": "stage",
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "command": stage_command(cfg, round_n, task),
        "env": env,
        "envFrom": [
            {"configMapRef": {"name": cfg.env_configmap}},
            {"secretRef": {"name": cfg.env_secret}},
        ],
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if gpu:
        selector = json.loads(cfg.gpu_node_selector)
        tolerations = json.loads(cfg.gpu_tolerations)
        if selector:
            pod_spec["nodeSelector"] = selector
        if tolerations:
            pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(round_n, task, attempt), "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": cfg.job_backoff_limit,
            "activeDeadlineSeconds": cfg.job_deadline_seconds,
            "ttlSecondsAfterFinished": cfg.job_ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# --------------------------------------------------------------------------- state (rstar.rounds)


def new_state(cfg: ControllerConfig, round_n: int, now: float) -> RoundState:
    return rounds.new_round(round_n, cfg.shards, now, deadline_seconds=cfg.round_deadline_seconds)


def choose_round(store, cfg: ControllerConfig, now: float) -> tuple[RoundState | None, str]:
    """Pick the round to work on: (state, why). state None: nothing to do."""
    known = rounds.known_rounds(store)
    if cfg.round == "auto":
        if known:
            latest = load_state(store, known[-1])
            if latest and latest.status == RUNNING:
                return latest, f"resuming round {known[-1]}"
        n = known[-1] + 1 if known else 1
        return new_state(cfg, n, now), f"starting round {n}"
    n = int(cfg.round)
    st = load_state(store, n)
    if st is None:
        return new_state(cfg, n, now), f"starting round {n}"
    if st.status == SUCCEEDED:
        return None, f"round {n} already succeeded"
    if st.status == rounds.FAILED:  # explicit re-run: failed tasks get fresh attempts, a new deadline
        return rounds.round_rerun(st, now, cfg.round_deadline_seconds), f"re-running failed round {n}"
    return st, f"resuming round {n}"


# --------------------------------------------------------------------------- Kubernetes helpers


def _job_phase(job: Any) -> tuple[str, str]:
    """('succeeded'|'failed'|'running', reason) from a V1Job's status."""
    status = getattr(job, "status", None)
    conditions = (getattr(status, "conditions", None) or []) if status else []
    for c in conditions:
        if c.type in ("Complete", "SuccessCriteriaMet") and c.status == "True":
            return "succeeded", ""
        if c.type in ("Failed", "FailureTarget") and c.status == "True":
            return "failed", f"{c.reason or 'Failed'}: {c.message or ''}".strip()
    if status is not None and (status.succeeded or 0) >= 1 and not (status.active or 0):
        return "succeeded", ""
    return "running", ""


def _api_status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


class Controller:
    """Drives one round to an end (succeeded or failed). `api` is a BatchV1Api (or a fake with the same calls)."""

    def __init__(self, cfg: ControllerConfig, api: Any, store: Any, namespace: str,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None):
        self.cfg, self.api, self.store, self.ns = cfg, api, store, namespace
        self.clock = clock or (lambda: time.time())
        self.sleep = sleep or (lambda s: time.sleep(s))

    # -- one round ---------------------------------------------------------------------------
    def run(self, state: RoundState) -> RoundState:
        metrics.EVOLUTION_ROUND.set(state.round)
        state = save_state(self.store, state, self.clock())
        while True:
            state = self.step(state)
            if state.status != RUNNING:
                return state
            self.sleep(self.cfg.poll_seconds)

    def step(self, state: RoundState) -> RoundState:
        """One look at the round's Jobs: advance, retry, launch, or finish. Saves the state when it changed
        and returns it."""
        now = self.clock()
        n = state.round
        before = state
        if now >= state.deadline_at:
            return self._fail(state, f"deadline exceeded ({self.cfg.round_deadline_seconds}s after start)", now)
        stage = state.current_stage()
        if stage is None:
            return self._succeed(state, now)
        if stage != state.stage:
            log.info("round %d: stage %s", n, stage)
        state = rounds.stage_entered(state, stage)
        try:
            observed = {j.metadata.name: j for j in self._list_jobs(n)}
        except Exception as e:  # noqa: BLE001 - API hiccups: try again next poll
            log.warning("round %d: listing Jobs failed (%s); retrying", n, e)
            return state
        tids = state.task_ids(stage)
        for tid in tids:
            t = state.tasks[tid]
            if t.status != RUNNING:
                continue
            job = observed.get(t.job)
            if job is None:
                log.warning("round %d: Job %s vanished; recreating it", n, t.job)
                state = rounds.job_lost(state, tid)  # keeps the job name: same attempt, same name
                continue
            phase, reason = _job_phase(job)
            if phase == "succeeded":
                log.info("round %d: %s succeeded (%s)", n, tid, t.job)
                state = rounds.task_succeeded(state, tid, now)
            elif phase == "failed":
                self._delete_job(t.job)
                if t.tries >= self.cfg.max_attempts:
                    state = rounds.task_failed(state, tid, reason, now)
                    return self._fail(state, f"{tid} failed {t.tries} times; last: {reason}", now)
                log.warning("round %d: %s failed (%s); retrying", n, tid, reason)
                TASK_RETRIES.labels(t.stage).inc()
                state = rounds.task_retried(state, tid, reason, now)  # no job: the next launch is a new attempt
        limit = self.cfg.parallelism if stage == "synthesis" else 1
        running = state.count(stage, RUNNING)
        for tid in tids:
            if running >= limit:
                break
            t = state.tasks[tid]
            if t.status != PENDING:
                continue
            # a new attempt, or the vanished Job of this attempt recreated under its name
            body = build_job(self.cfg, self.ns, n, t.task, rounds.next_attempt(t))
            state = rounds.task_started(state, tid, body["metadata"]["name"], now)
            state = save_state(self.store, state, now)  # persist intent before acting: a crash here resumes
            self._create_job(body)
            running += 1
        if state.stage_succeeded(stage):
            state = self._collect_summary(state, stage)
        self._export(state)
        if state != before:
            state = save_state(self.store, state, now)
        return state

    # -- API calls (the only ones the controller makes: create, list, delete) -----------------
    def _list_jobs(self, n: int) -> list[Any]:
        res = self.api.list_namespaced_job(self.ns, label_selector=f"{LABEL_PREFIX}/round={n}")
        return list(res.items or [])

    def _create_job(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        try:
            self.api.create_namespaced_job(self.ns, body)
            JOBS_CREATED.labels(body["metadata"]["labels"][f"{LABEL_PREFIX}/stage"]).inc()
            log.info("created Job %s", name)
        except Exception as e:  # noqa: BLE001
            if _api_status(e) == 409:
                log.info("Job %s exists already; adopting it", name)
                return
            # Leave the task 'running': the next poll does not find the Job and recreates it.
            log.warning("creating Job %s failed (%s); will retry", name, e)

    def _delete_job(self, name: str | None) -> None:
        if not name:
            return
        try:
            self.api.delete_namespaced_job(name, self.ns, propagation_policy="Background")
        except Exception as e:  # noqa: BLE001
            if _api_status(e) != 404:
                log.warning("deleting Job %s failed (%s)", name, e)

    # -- ends ----------------------------------------------------------------------------------
    def _fail(self, state: RoundState, reason: str, now: float) -> RoundState:
        log.error("round %d failed: %s", state.round, reason)
        for t in state.tasks.values():
            if t.status == RUNNING:
                self._delete_job(t.job)
        state = rounds.round_failed(state, reason, now)
        metrics.EVOLUTION_FAILURES.inc()
        self._export(state)
        return save_state(self.store, state, now)

    def _succeed(self, state: RoundState, now: float) -> RoundState:
        log.info("round %d succeeded", state.round)
        state = rounds.round_succeeded(state, now)
        metrics.EVOLUTION_LAST_SUCCESS.set(now)
        self._export(state)
        return save_state(self.store, state, now)

    def _collect_summary(self, state: RoundState, stage: str) -> RoundState:
        if stage in state.summaries:
            return state
        try:
            summary = json.loads(self.store.get(summary_key(state.round, stage)))
        except NotFound:
            return state
        except ValueError as e:
            log.warning("round %d: bad %s summary: %s", state.round, stage, e)
            return state
        return rounds.summary_recorded(state, stage, summary)

    def _export(self, state: RoundState) -> None:
        n = str(state.round)
        for s in (*STAGES, DONE):
            metrics.EVOLUTION_STAGE.labels(n, s).set(1 if state.stage == s and state.status == RUNNING
                                                     or (s == DONE and state.status == SUCCEEDED) else 0)
        for s in STAGES:
            for st in TASK_STATUSES:
                TASKS.labels(s, st).set(state.count(s, st))
        ratio = solved_ratio(state.summaries.get("synthesis"))
        if ratio is not None:
            metrics.EVOLUTION_SOLVED_RATIO.labels(n).set(ratio)


def solved_ratio(summary: dict[str, Any] | None) -> float | None:
    """From a synthesis summary: `solved_ratio`, or `solved` / `total`."""
    if not summary:
        return None
    if isinstance(summary.get("solved_ratio"), (int, float)):
        return float(summary["solved_ratio"])
    solved, total = summary.get("solved"), summary.get("total")
    if isinstance(solved, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return float(solved) / float(total)
    return None


# --------------------------------------------------------------------------- entry point


def own_namespace(cfg: ControllerConfig) -> str:
    if cfg.namespace:
        return cfg.namespace
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def kubernetes_batch_api() -> Any:
    from kubernetes import client, config as kconfig

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config()
    return client.BatchV1Api()


def main(argv: Sequence[str] | None = None, api: Any = None) -> int:
    cfg = parse(ControllerConfig, "EVOLUTION", argv, prog="python -m trainer.controller",
                description="Run one self-evolution round as Kubernetes Jobs (resumes a crashed round).")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(cfg.store_url or os.environ.get("RSTAR_STORE_URL") or None)
    if cfg.metrics_port:
        metrics.start_metrics_server(cfg.metrics_port)
    last = last_success_time(store)
    if last is not None:
        metrics.EVOLUTION_LAST_SUCCESS.set(last)
    state, why = choose_round(store, cfg, time.time())
    log.info("%s", why)
    if state is None:
        return 0
    ctl = Controller(cfg, api if api is not None else kubernetes_batch_api(), store, own_namespace(cfg))
    state = ctl.run(state)
    if cfg.metrics_port and cfg.linger_seconds > 0:
        time.sleep(cfg.linger_seconds)  # let Prometheus scrape the final values
    return 0 if state.status == SUCCEEDED else 1


if __name__ == "__main__":
    raise SystemExit(main())
