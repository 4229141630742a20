"""Self-evolution rounds (spec section 4): synthesis -> train-policy -> train-ppm -> eval -> promote.

Every stage is a function of (config, round[, shard]) that reads its inputs
from, and writes its outputs to, the object store, so each can run in its own
process or Kubernetes Job (`rstar evolve --stage S --round N`, what
trainer/controller.py launches) or all in one process (`rstar evolve
--rounds N`). Stages are idempotent: finished work is found in the store and
skipped, so a rerun after a crash neither redoes nor duplicates it.

Store layout (besides the registry's `models/`):
    trajectories/round-<n>/shard-<i>-<c>.jsonl.gz (+ .manifest.json)   synthesis trees
    rounds/round-<n>/state.json            round state (trainer.controller's schema)
    rounds/round-<n>/<stage>.json          stage summary (the controller copies it into state.json)
    rounds/round-<n>/synthesis-<i>.json    per-shard synthesis summary
    rounds/round-<n>/sft.jsonl.gz          the SFT data the round's policy was trained on
    rounds/round-<n>/pairs.jsonl.gz        the PPM pairs
    rounds/round-<n>/eval-report.json      full evaluation report
    evals/policy/<version>/<digest>.json   cached evaluation of a version on a dev set

Round 1 synthesis is a bootstrap (`bootstrap`): `reference` converts GSM8K
reference solutions (trainer.bootstrap), `teacher` runs MCTS with an
OpenAI-compatible endpoint as the policy, `policy` runs MCTS with the current
policy. Rounds >= 2 run MCTS with the current policy (terminal-guided), and
from `ppm_from_round` on with the current PPM (PPM-augmented).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from rstar.config import ConfigError, field, home_dir
from rstar.registry import ModelRegistry
from rstar.store import NotFound, open_store
from trainer import data, publish
from trainer.training import TrainConfig

log = logging.getLogger(__name__)

STAGES = ("synthesis", "train-policy", "train-ppm", "eval", "promote")  # = trainer.controller.STAGES
BOOTSTRAPS = ("reference", "teacher", "policy")


@dataclass
class EvolveConfig:
    store_url: str = field("", "object store URL ('' = $RSTAR_STORE_URL, else $RSTAR_HOME/store)")
    pool: str = field("", "problem pool JSONL (id, problem, answer[, solution]) for synthesis")
    pool_limit: int = field(0, "use the first N problems of the pool (0 = all)")
    dev: str = field("", "dev set JSONL for the promotion gate (its ids are excluded from the pool)")
    dev_limit: int = field(0, "evaluate on the first N dev problems (0 = all)")
    base_model: str = field("default", "BASE model every round fine-tunes from ('default' = embedded SmolLM2-135M)")
    shards: int = field(1, "synthesis shards (`rstar evolve --rounds` runs them one after the other)")
    chunk: int = field(64, "problems per stored trajectory shard (the unit of resumption)")
    bootstrap: str = field("reference", "round-1 synthesis: reference (GSM8K solutions), teacher, or policy")
    teacher_url: str = field("", "OpenAI-compatible server for bootstrap=teacher (e.g. http://host:8000/v1)")
    teacher_model: str = field("", "model name at the teacher endpoint")
    teacher_api_key: str = field("", "bearer token for the teacher endpoint (or env OPENAI_API_KEY)")
    teacher_timeout: float = field(120.0, "seconds per teacher request")
    policy_address: str = field("", "policy service for synthesis ('' = run the current policy in-process)")
    ppm_address: str = field("", "PPM service for PPM-augmented synthesis ('' = in-process)")
    sandbox_address: str = field("", "sandbox service ('' = in-process sandbox)")
    rollouts: str = field("8,16,16,16", "MCTS rollouts per problem by round (the last value repeats)")
    candidates: int = field(4, "k candidate steps per expansion")
    max_depth: int = field(16, "maximum steps per trajectory")
    max_step_tokens: int = field(256, "token limit of one generated step")
    temperature: float = field(0.7, "policy sampling temperature in synthesis")
    ppm_from_round: int = field(3, "first round whose synthesis uses the PPM (PPM-augmented)")
    sft_top_k: int = field(2, "SFT trajectories kept per problem")
    sft_lr: float = field(7e-6, "SFT learning rate (paper 7e-6)")
    sft_epochs: float = field(2.0, "SFT epochs (paper 2)")
    sft_batch_size: int = field(128, "SFT examples per optimizer step (paper 128)")
    sft_micro_batch: int = field(4, "SFT examples per forward pass")
    sft_max_steps: int = field(0, "SFT optimizer steps (0 = epochs decide)")
    sft_max_length: int = field(4096, "SFT sequence length (longer examples are dropped)")
    markers: str = field("added", "step markers in the tokenizer: added, special, none")
    lora_r: int = field(0, "LoRA rank for SFT (0 = full fine-tune)")
    ppm_lr: float = field(7e-6, "PPM learning rate (paper 7e-6)")
    ppm_epochs: float = field(1.0, "PPM epochs (paper 1)")
    ppm_batch_size: int = field(512, "PPM pairs per optimizer step (paper 512)")
    ppm_micro_batch: int = field(8, "PPM pairs per forward pass")
    ppm_max_steps: int = field(0, "PPM optimizer steps (0 = epochs decide)")
    ppm_max_length: int = field(2048, "PPM input tokens (longer inputs keep their end)")
    min_q_margin: float = field(0.5, "PPM pair filter: Q(pos) - Q(neg) at least this")
    min_edit_distance: int = field(20, "PPM pair filter: edit distance between the two steps at least this")
    eval_max_tokens: int = field(256, "tokens per step in evaluation")
    eval_max_depth: int = field(16, "steps per trajectory in evaluation")
    eval_batch: int = field(8, "problems per generate call in evaluation")
    max_regression: float = field(0.0, "promotion gate: allowed drop of greedy dev accuracy vs CURRENT")
    min_accuracy: float = field(0.0, "promotion gate: minimum greedy dev accuracy")
    work_dir: str = field("", "local scratch for models and checkpoints ('' = $RSTAR_HOME/evolve)")
    threads: int = field(0, "torch CPU threads (0 = default)")
    seed: int = field(0, "seed of synthesis and training")
    progress: bool = field(True, "progress bars")

    def validate(self) -> None:
        if self.bootstrap not in BOOTSTRAPS:
            raise ConfigError(f"bootstrap must be one of {BOOTSTRAPS}, got {self.bootstrap!r}")
        if self.shards < 1 or self.chunk < 1:
            raise ConfigError("shards and chunk must be >= 1")
        try:
            r = [int(x) for x in self.rollouts.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"rollouts: comma-separated integers expected, got {self.rollouts!r}") from e
        if not r or min(r) < 1:
            raise ConfigError("rollouts needs at least one positive value")

    def rollouts_for(self, round_no: int) -> int:
        r = [int(x) for x in self.rollouts.split(",") if x.strip()]
        return r[min(round_no, len(r)) - 1]

    def sft_train(self) -> TrainConfig:
        return TrainConfig(lr=self.sft_lr, epochs=self.sft_epochs, batch_size=self.sft_batch_size,
                           micro_batch=self.sft_micro_batch, max_steps=self.sft_max_steps,
                           max_length=self.sft_max_length, seed=self.seed, lora_r=self.lora_r,
                           threads=self.threads, progress=self.progress)

    def ppm_train(self) -> TrainConfig:
        return TrainConfig(lr=self.ppm_lr, epochs=self.ppm_epochs, batch_size=self.ppm_batch_size,
                           micro_batch=self.ppm_micro_batch, max_steps=self.ppm_max_steps,
                           max_length=self.ppm_max_length, seed=self.seed, threads=self.threads,
                           progress=self.progress)


class StageError(RuntimeError):
    """A stage cannot run (missing input, bad configuration)."""


# --------------------------------------------------------------------------- context


class Context:
    """Store, registry and local scratch of one process."""

    def __init__(self, cfg: EvolveConfig):
        self.cfg = cfg
        self.store = open_store(cfg.store_url or os.environ.get("RSTAR_STORE_URL") or None)
        self.registry = ModelRegistry(self.store)
        self.work = Path(cfg.work_dir) if cfg.work_dir else home_dir() / "evolve"
        self.work.mkdir(parents=True, exist_ok=True)

    # json objects
    def get_json(self, key: str) -> Any | None:
        try:
            return json.loads(self.store.get(key))
        except NotFound:
            return None

    def put_json(self, key: str, obj: Any) -> None:
        self.store.put(key, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    # inputs
    def dev_problems(self) -> list[dict[str, Any]]:
        if not self.cfg.dev:
            raise StageError("no dev set: pass --dev FILE.jsonl (env RSTAR_EVOLVE_DEV)")
        return data.load_problems(self.cfg.dev, limit=self.cfg.dev_limit)

    def pool_problems(self) -> list[dict[str, Any]]:
        if not self.cfg.pool:
            raise StageError("no problem pool: pass --pool FILE.jsonl (env RSTAR_EVOLVE_POOL)")
        dev_ids = [p["id"] for p in data.load_problems(self.cfg.dev)] if self.cfg.dev else []
        return data.load_problems(self.cfg.pool, limit=self.cfg.pool_limit, exclude_ids=dev_ids)

    def base_model(self) -> Path:
        from rstar.models import resolve_model_dir

        return resolve_model_dir(self.cfg.base_model)

    def model_dir(self, name: str, version: str | None) -> Path:
        """A registry version's directory; `None`/base: the BASE model."""
        from rstar.models import BASE_VERSION

        if version is None or (version == BASE_VERSION and publish.existing(self.registry, name, version) is None):
            return self.base_model()
        return self.registry.fetch(name, version)


def summary_key(round_no: int, stage: str) -> str:
    return f"rounds/round-{round_no}/{stage}.json"


def _executor(ctx: Context):
    from trainer.execution import make_executor

    return make_executor(ctx.cfg.sandbox_address)


# --------------------------------------------------------------------------- synthesis


def _chunks(ctx: Context, shard: int, shards: int) -> list[tuple[str, list[dict[str, Any]]]]:
    mine = ctx.pool_problems()[shard::shards]
    size = ctx.cfg.chunk
    return [(f"shard-{shard:03d}-{c:04d}", mine[i:i + size]) for c, i in enumerate(range(0, len(mine), size))]


def _make_synth_policy(ctx: Context, round_no: int):
    cfg = ctx.cfg
    if round_no == 1 and cfg.bootstrap == "teacher":
        from trainer.bootstrap import TeacherPolicy

        if not cfg.teacher_url or not cfg.teacher_model:
            raise StageError("bootstrap=teacher needs --teacher-url and --teacher-model")
        return TeacherPolicy(cfg.teacher_url, cfg.teacher_model, cfg.teacher_api_key or os.environ.get("OPENAI_API_KEY", ""),
                             timeout=cfg.teacher_timeout)
    if cfg.policy_address:
        from rstar.clients import PolicyClient

        return PolicyClient(cfg.policy_address)
    from trainer.evaluate import HFPolicy

    version = ctx.registry.current(publish.POLICY)
    return HFPolicy(ctx.model_dir(publish.POLICY, version), version=version or "base", threads=cfg.threads)


def _make_synth_scorer(ctx: Context, round_no: int):
    if round_no < ctx.cfg.ppm_from_round:
        return None
    if ctx.cfg.ppm_address:
        from rstar.clients import PPMClient

        return PPMClient(ctx.cfg.ppm_address)
    version = ctx.registry.current(publish.PPM)
    if version is None:
        log.warning("round %d: no promoted PPM; synthesis stays terminal-guided", round_no)
        return None
    from rstar.ppm import PPMScorer

    scorer = PPMScorer(ctx.model_dir(publish.PPM, version), version)

    class _Adapter:  # the engine's Scorer protocol on top of the service core
        def score(self, prefixes, scope=None):
            return scorer.score([(q, list(s)) for q, s in prefixes])[0]

    return _Adapter()


def stage_synthesis(ctx: Context, round_no: int, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    from rstar import trees as traj

    cfg = ctx.cfg
    chunks = _chunks(ctx, shard, shards)
    done_names = {i.shard for i in traj.list_complete_shards(ctx.store, round_no)}
    todo = [(name, probs) for name, probs in chunks if name not in done_names]
    log.info("round %d synthesis shard %d/%d: %d chunks, %d already stored", round_no, shard, shards,
             len(chunks), len(chunks) - len(todo))
    t0 = time.monotonic()
    method = cfg.bootstrap if round_no == 1 else "policy"
    if todo:
        executor = _executor(ctx)
        try:
            if method == "reference":
                _synth_reference(ctx, round_no, todo, executor)
            else:
                _synth_mcts(ctx, round_no, todo, executor)
        finally:
            executor.close()
    # the shard's summary, from what is stored (so a resumed shard reports everything)
    total = solved = trees = 0
    for name, probs in chunks:
        m = traj.read_manifest(ctx.store, round_no, name)
        total += m.get("problems", len(probs))
        solved += m.get("solved", 0)
        trees += m.get("trees", 0)
    summary = {"round": round_no, "shard": shard, "shards": shards, "method": method, "chunks": len(chunks),
               "chunks_run": len(todo), "total": total, "solved": solved, "trees": trees,
               "seconds": round(time.monotonic() - t0, 1)}
    ctx.put_json(summary_key(round_no, f"synthesis-{shard}"), summary)
    _aggregate_synthesis(ctx, round_no, shards)
    return summary


def _aggregate_synthesis(ctx: Context, round_no: int, shards: int) -> dict[str, Any]:
    parts = [ctx.get_json(summary_key(round_no, f"synthesis-{i}")) for i in range(shards)]
    have = [p for p in parts if p]
    agg = {"round": round_no, "shards": shards, "shards_done": len(have),
           "total": sum(p["total"] for p in have), "solved": sum(p["solved"] for p in have),
           "trees": sum(p["trees"] for p in have), "method": have[0]["method"] if have else ""}
    agg["solved_ratio"] = agg["solved"] / agg["total"] if agg["total"] else 0.0
    ctx.put_json(summary_key(round_no, "synthesis"), agg)
    return agg


def _synth_reference(ctx: Context, round_no: int, todo, executor) -> None:
    from rstar import trees as traj
    from trainer import bootstrap

    for name, probs in todo:
        convs, _ = bootstrap.convert_pool(probs)
        ok, stats = bootstrap.verify_conversions(convs, executor)
        stats.problems = len(probs)
        trees = [bootstrap.chain_tree(c, out, round_no) for c, out in ok]
        traj.write_shard(ctx.store, round_no, name, trees,
                         {"problems": len(probs), "solved": len(trees), "method": "gsm8k-reference",
                          "bootstrap": stats.as_dict()})
        log.info("round %d %s: %s", round_no, name, stats.line())


def _synth_mcts(ctx: Context, round_no: int, todo, executor) -> None:
    from rstar.search.core import SearchCore, SearchOptions, SynthesisProblem
    from rstar.search.mcts import PPM_AUGMENTED, TERMINAL_GUIDED, derive_seed

    cfg = ctx.cfg
    policy = _make_synth_policy(ctx, round_no)
    scorer = _make_synth_scorer(ctx, round_no)
    core = SearchCore(policy, executor, scorer, store=ctx.store)
    for name, probs in todo:
        opts = SearchOptions(rollouts=cfg.rollouts_for(round_no), k=cfg.candidates, max_depth=cfg.max_depth,
                             seed=derive_seed(cfg.seed, round_no, name), temperature=cfg.temperature,
                             max_step_tokens=cfg.max_step_tokens,
                             annotation=PPM_AUGMENTED if scorer is not None else TERMINAL_GUIDED)
        out = core.synthesize([SynthesisProblem(str(p["id"]), p["problem"], str(p["answer"])) for p in probs],
                              opts, round_no=round_no, shard=name, store_trees=True)
        log.info("round %d %s: %d/%d solved", round_no, name, out.solved, len(probs))


# --------------------------------------------------------------------------- training


def _round_trees(ctx: Context, rounds: range):
    for r in rounds:
        yield from data.iter_round_trees(ctx.store, r)


def stage_train_policy(ctx: Context, round_no: int) -> dict[str, Any]:
    from rstar.models import BASE_VERSION
    from trainer.sft import train_policy

    cfg = ctx.cfg
    version = publish.version_name(round_no)
    examples, stats = data.build_sft(_round_trees(ctx, range(1, round_no + 1)), top_k=cfg.sft_top_k)
    log.info("round %d: %s", round_no, stats.line())
    blob = data.encode_jsonl_gz(e.to_dict() for e in examples)
    sft_key = f"rounds/round-{round_no}/sft.jsonl.gz"
    ctx.store.put(sft_key, blob)
    data_info = {"sft_key": sft_key, "sha256": hashlib.sha256(blob).hexdigest(), "rounds": list(range(1, round_no + 1)),
                 "problems": stats.problems, "solved": stats.solved, "trajectories": stats.kept,
                 "duplicates": stats.duplicates}
    m = publish.existing(ctx.registry, publish.POLICY, version)
    if m is None:
        if not examples:
            raise StageError(f"round {round_no}: no SFT data (no solved problem in rounds 1..{round_no})")
        out = ctx.work / f"round-{round_no}" / "policy"
        report = train_policy(ctx.base_model(), examples, out, cfg.sft_train(), markers=cfg.markers,
                              work_dir=ctx.work / f"round-{round_no}" / "policy.work",
                              metadata={"round": round_no, "version": version})
        data_info["tokens"] = report["tokens"]
        m = publish.publish_once(
            ctx.registry, publish.POLICY, out, version, parent=f"{publish.POLICY}/{BASE_VERSION}", round=round_no,
            data=data_info, eval={"report": summary_key(round_no, "eval")},
            metadata={"base_model": cfg.base_model, "hyperparameters": asdict(cfg.sft_train()),
                      "markers": cfg.markers, "train": {k: v for k, v in report.items() if k != "losses"},
                      "few_shot": False})
        shutil.rmtree(out, ignore_errors=True)
        trained = True
    else:
        trained = False
    summary = {"round": round_no, "version": version, "trained": trained, **data_info,
               "train": (m.metadata or {}).get("train")}
    ctx.put_json(summary_key(round_no, "train-policy"), summary)
    return summary


def stage_train_ppm(ctx: Context, round_no: int) -> dict[str, Any]:
    from trainer.ppm_train import train_ppm

    cfg = ctx.cfg
    version = publish.version_name(round_no)
    pcfg = data.PairConfig(min_q_margin=cfg.min_q_margin, min_edit_distance=cfg.min_edit_distance)
    pairs, stats = data.build_all_pairs((t for _, t in _round_trees(ctx, range(round_no, round_no + 1))), pcfg)
    log.info("round %d: %s", round_no, stats.line())
    blob = data.encode_jsonl_gz(p.to_dict() for p in pairs)
    key = f"rounds/round-{round_no}/pairs.jsonl.gz"
    ctx.store.put(key, blob)
    info = {"pairs_key": key, "sha256": hashlib.sha256(blob).hexdigest(), "pairs": len(pairs),
            "step_pairs": stats.step_pairs, "final_pairs": stats.final_pairs, "groups": stats.groups,
            "filtered_margin": stats.filtered_margin, "filtered_edit": stats.filtered_edit}
    if not pairs:
        summary = {"round": round_no, "version": None, "skipped": True,
                   "reason": "no preference pairs (e.g. a reference bootstrap has no wrong trajectories)", **info}
        ctx.put_json(summary_key(round_no, "train-ppm"), summary)
        return summary
    m = publish.existing(ctx.registry, publish.PPM, version)
    trained = False
    if m is None:
        policy_dir = ctx.registry.fetch(publish.POLICY, version)
        out = ctx.work / f"round-{round_no}" / "ppm"
        report = train_ppm(policy_dir, pairs, out, cfg.ppm_train(),
                           work_dir=ctx.work / f"round-{round_no}" / "ppm.work",
                           metadata={"round": round_no, "version": version})
        m = publish.publish_once(
            ctx.registry, publish.PPM, out, version, parent=f"{publish.POLICY}/{version}", round=round_no, data=info,
            eval={"report": summary_key(round_no, "eval")},
            metadata={"hyperparameters": asdict(cfg.ppm_train()),
                      "train": {k: v for k, v in report.items() if k != "losses"}})
        shutil.rmtree(out, ignore_errors=True)
        trained = True
    summary = {"round": round_no, "version": version, "skipped": False, "trained": trained, **info,
               "train": (m.metadata or {}).get("train")}
    ctx.put_json(summary_key(round_no, "train-ppm"), summary)
    return summary


# --------------------------------------------------------------------------- eval and promotion


def _eval_config(ctx: Context):
    from trainer.evaluate import EvalConfig

    return EvalConfig(greedy=True, max_tokens=ctx.cfg.eval_max_tokens, max_depth=ctx.cfg.eval_max_depth)


def evaluate_version(ctx: Context, name: str, version: str | None, problems, executor) -> dict[str, Any]:
    """Greedy dev evaluation of a policy version (cached in the store per version, dev set and settings)."""
    from rstar.models import BASE_VERSION
    from trainer.evaluate import HFPolicy, evaluate

    ecfg = _eval_config(ctx)
    label = version or BASE_VERSION
    digest = hashlib.sha256(json.dumps([[p["id"], p["problem"], p["answer"]] for p in problems]
                                       + [asdict(ecfg), ctx.cfg.base_model if version is None else ""],
                                       sort_keys=True).encode()).hexdigest()[:16]
    key = f"evals/{name}/{label}/{digest}.json"
    cached = ctx.get_json(key)
    if cached is not None:
        log.info("evaluation of %s/%s on this dev set is cached (%s)", name, label, key)
        return cached
    policy = HFPolicy(ctx.model_dir(name, version), batch_size=ctx.cfg.eval_batch, version=label, threads=ctx.cfg.threads)
    report = evaluate(problems, policy, executor, ecfg, meta={"model": f"{name}/{label}", "dataset": ctx.cfg.dev})
    ctx.put_json(key, report)
    return report


def stage_eval(ctx: Context, round_no: int) -> dict[str, Any]:
    from trainer.evaluate import summary as eval_summary

    problems = ctx.dev_problems()
    version = publish.version_name(round_no)
    if publish.existing(ctx.registry, publish.POLICY, version) is None:
        raise StageError(f"round {round_no}: policy {version} is not published (run train-policy first)")
    current = ctx.registry.current(publish.POLICY)
    executor = _executor(ctx)
    try:
        cand = evaluate_version(ctx, publish.POLICY, version, problems, executor)
        base = evaluate_version(ctx, publish.POLICY, current, problems, executor) if current != version else cand
    finally:
        executor.close()
    ctx.put_json(f"rounds/round-{round_no}/eval-report.json", {"candidate": cand, "current": base})
    summary = {"round": round_no, "dataset": ctx.cfg.dev, "problems": len(problems),
               "candidate": {"version": version, **eval_summary(cand)},
               "current": {"version": current, **eval_summary(base)}}
    ctx.put_json(summary_key(round_no, "eval"), summary)
    return summary


def stage_promote(ctx: Context, round_no: int) -> dict[str, Any]:
    ev = ctx.get_json(summary_key(round_no, "eval"))
    if ev is None:
        raise StageError(f"round {round_no}: no evaluation summary ({summary_key(round_no, 'eval')}); run eval first")
    ppm = ctx.get_json(summary_key(round_no, "train-ppm")) or {}
    g = publish.gate(ev["candidate"].get("greedy_accuracy"), ev["current"].get("greedy_accuracy"),
                     ctx.cfg.max_regression, ctx.cfg.min_accuracy)
    summary: dict[str, Any] = {"round": round_no, "gate": g.as_dict(), "promoted": False}
    if g.passed:
        reason = f"round {round_no}: {g.reason}"
        summary["promotions"] = publish.promote_pair(ctx.registry, ev["candidate"]["version"],
                                                     ppm.get("version") if not ppm.get("skipped") else None, reason)
        summary["promoted"] = True
        log.info("round %d: promoted (%s)", round_no, g.reason)
    else:
        log.warning("round %d: gate failed, CURRENT unchanged: %s", round_no, g.reason)
    ctx.put_json(summary_key(round_no, "promote"), summary)
    return summary


# --------------------------------------------------------------------------- driving rounds


def run_stage(ctx: Context, stage: str, round_no: int, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    if stage == "synthesis":
        return stage_synthesis(ctx, round_no, shard, shards)
    fn: dict[str, Callable[[Context, int], dict[str, Any]]] = {
        "train-policy": stage_train_policy, "train-ppm": stage_train_ppm, "eval": stage_eval,
        "promote": stage_promote}
    if stage not in fn:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return fn[stage](ctx, round_no)


def _new_state(ctx: Context, round_no: int) -> dict[str, Any]:
    from trainer.controller import ControllerConfig, new_state

    st = new_state(ControllerConfig(shards=ctx.cfg.shards, round_deadline_seconds=10 ** 9), round_no, time.time())
    st["driver"] = "rstar evolve (local)"
    return st


def run_round(ctx: Context, round_no: int, on_task: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one round in this process; state in rounds/round-<n>/state.json (controller schema)."""
    from trainer.controller import load_state, save_state

    st = load_state(ctx.store, round_no)
    if st is None:
        st = _new_state(ctx, round_no)
    if st["status"] == "succeeded":
        log.info("round %d already succeeded", round_no)
        return st
    st.update(status="running", reason="", finished_at=None)
    save_state(ctx.store, st, time.time())
    order = {s: i for i, s in enumerate(STAGES)}
    for tid, t in sorted(st["tasks"].items(), key=lambda kv: (order[kv[1]["stage"]], kv[1]["shard"] or 0)):
        if t["status"] == "succeeded":
            log.info("round %d: %s done earlier; skipping", round_no, tid)
            continue
        st["stage"] = t["stage"]
        t["attempt"] += 1
        t["tries"] += 1
        t["status"], t["job"] = "running", f"local-{os.getpid()}-a{t['attempt']}"
        save_state(ctx.store, st, time.time())
        if on_task:
            on_task(tid, "start")
        try:
            summary = run_stage(ctx, t["stage"], round_no, t["shard"] or 0, st.get("shards", 1))
        except Exception as e:
            t["status"], t["job"] = "failed", None
            t["failures"].append({"attempt": t["attempt"], "reason": f"{type(e).__name__}: {e}", "at": time.time()})
            st.update(status="failed", reason=f"{tid}: {e}", finished_at=time.time())
            save_state(ctx.store, st, time.time())
            raise
        t["status"], t["job"] = "succeeded", None
        if t["shard"] is None or all(x["status"] == "succeeded" for x in st["tasks"].values()
                                     if x["stage"] == t["stage"]):
            st["summaries"][t["stage"]] = ctx.get_json(summary_key(round_no, t["stage"])) or summary
        save_state(ctx.store, st, time.time())
        if on_task:
            on_task(tid, "done")
    st.update(status="succeeded", stage="done", finished_at=time.time())
    save_state(ctx.store, st, time.time())
    return st


def next_round(ctx: Context) -> int:
    """The round to work on: an unfinished one, else the one after the last succeeded."""
    from trainer.controller import known_rounds, load_state

    rounds = known_rounds(ctx.store)
    for n in rounds:
        st = load_state(ctx.store, n)
        if st and st["status"] != "succeeded":
            return n
    return (rounds[-1] + 1) if rounds else 1


def evolve(ctx: Context, rounds: int, on_task: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
    """Run rounds until round `rounds` has succeeded (resuming whatever is unfinished)."""
    out = []
    while True:
        n = next_round(ctx)
        if n > rounds:
            break
        log.info("round %d of %d", n, rounds)
        out.append(run_round(ctx, n, on_task))
    return out
