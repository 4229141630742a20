"""The search service's logic without gRPC: requests -> trees -> engine -> results.

`SearchCore.solve` runs N independent searches (trajectories, seeds derived from
the request seed) in one engine run and selects the answer; `SearchCore.synthesize`
runs a problem list with gold answers and stores each tree in the trajectory
store as it finishes, then the whole shard (see its docstring). `Admission`
bounds concurrent searches and the wait queue; `CallerQuotas` bounds what one
caller (a token's name) may hold: requests at once and generated tokens per
minute. Everything downstream (policy, PPM, sandbox, store) is injected.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rstar import metrics
from rstar import trees as trajectories
from rstar.search import selection
from rstar.search.engine import CallScope, Engine, Limits, Progress, Stats
from rstar.search.mcts import (PPM_AUGMENTED, TERMINAL_GUIDED, SamplingParams, Tree, TreeSettings, derive_seed)


class Busy(Exception):
    """Too many searches running and waiting (RESOURCE_EXHAUSTED)."""


@dataclass
class SearchOptions:
    """One request's resolved settings (defaults already applied, validated by the servicer)."""

    rollouts: int = 8
    k: int = 4
    max_depth: int = 16
    max_tokens: int = 0
    max_wall_seconds: float = 0.0
    trajectories: int = 1
    seed: int = 0
    strategy: str = selection.TOP_PPM
    exploration: float = 2.0
    temperature: float = 0.7
    top_p: float = 0.95
    max_step_tokens: int = 256
    annotation: str = PPM_AUGMENTED
    max_active_trees: int = 32

    def tree_settings(self) -> TreeSettings:
        return TreeSettings(rollouts=self.rollouts, k=self.k, max_depth=self.max_depth, c=self.exploration,
                            annotation=self.annotation)

    def limits(self) -> Limits:
        return Limits(max_tokens=self.max_tokens, max_wall_seconds=self.max_wall_seconds,
                      max_active_trees=self.max_active_trees)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_step_tokens)


@dataclass
class SolveOutcome:
    selection: selection.Selection
    stats: Stats
    trees: list[Tree]


@dataclass
class SynthesisProblem:
    id: str
    problem: str
    answer: str


@dataclass
class SynthesisOutcome:
    stats: Stats
    trees: list[Tree]                   # the trees this run searched (not those taken back from an earlier run)
    solved: int                         # among tree_dicts
    shard_key: str = ""
    tree_dicts: list[dict] = field(default_factory=list)   # every stored/reported tree, in problem order
    resumed: int = 0                    # trees taken back from an earlier run's stored parts
    not_started: list[str] = field(default_factory=list)   # problem ids a limit stopped before they began
    complete: bool = True               # every problem searched to its budget


class Admission:
    """At most `slots` searches run; at most `queue` wait; more get `Busy` at once."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue_limit = slots, queue
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0
        metrics.SEARCH_QUEUE_LIMIT.set(slots + queue)

    def acquire(self, scope: CallScope) -> None:
        with self._cond:
            if self.running < self.slots:
                self.running += 1
                self._publish()
                return
            if self.waiting >= self.queue_limit:
                raise Busy(f"search queue full: {self.running} running, {self.waiting} waiting")
            self.waiting += 1
            self._publish()
            unregister = scope.on_stop(self._wake)
            try:
                while self.running >= self.slots:
                    scope.check()
                    self._cond.wait(timeout=0.5)
                scope.check()
                self.running += 1
            finally:
                unregister()
                self.waiting -= 1
                self._publish()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self.running -= 1
            self._publish()
            self._cond.notify_all()

    def _publish(self) -> None:
        metrics.SEARCH_ACTIVE.set(self.running)
        metrics.SEARCH_QUEUE_DEPTH.set(self.waiting)


class CallerQuotas:
    """Per caller: at most `searches` requests at once (running or queued), and a bucket of
    generated tokens that holds one minute's worth and refills at `tokens_per_minute`.

    A search's cost is known only as it runs, so tokens are charged as they are generated
    (`CallerTicket.charge_to`) and the bucket may go into debt; a caller whose bucket is
    empty or in debt is refused (`Busy`) until it refills. A running search is never
    stopped by the quota: its own `max_tokens` bounds it.
    """

    def __init__(self, searches: int, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.searches, self.rate = searches, tokens_per_minute / 60.0
        self.capacity = float(tokens_per_minute)
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._level: dict[str, tuple[float, float]] = {}   # caller -> (tokens left, when)

    def _left(self, caller: str, now: float) -> float:
        level, when = self._level.get(caller, (self.capacity, now))
        return min(self.capacity, level + (now - when) * self.rate)

    def admit(self, caller: str) -> "CallerTicket":
        with self._lock:
            running = self._running.get(caller, 0)
            if running >= self.searches:
                raise Busy(f"caller {caller or '(anonymous)'} has {running} searches in flight, "
                           f"the limit is {self.searches}")
            left = self._left(caller, self._clock())
            if left <= 0:
                raise Busy(f"caller {caller or '(anonymous)'} spent its generated-token quota "
                           f"({self.capacity:.0f} a minute); retry in {-left / self.rate + 1:.0f} s")
            self._running[caller] = running + 1
        return CallerTicket(self, caller)

    def _charge(self, caller: str, tokens: int) -> None:
        with self._lock:
            now = self._clock()
            self._level[caller] = (self._left(caller, now) - tokens, now)

    def _release(self, caller: str) -> None:
        with self._lock:
            n = self._running.get(caller, 0) - 1
            if n > 0:
                self._running[caller] = n
            else:
                self._running.pop(caller, None)
                if self._left(caller, self._clock()) >= self.capacity:
                    self._level.pop(caller, None)   # a full bucket is the default: keep no state for it

    def in_flight(self, caller: str) -> int:
        with self._lock:
            return self._running.get(caller, 0)


class CallerTicket:
    """One admitted request of a caller: charge its tokens as they come, release it once."""

    def __init__(self, quotas: CallerQuotas, caller: str):
        self.quotas, self.caller = quotas, caller
        self.charged = 0
        self._released = False

    def charge_to(self, total_tokens: int) -> None:
        """The request has generated `total_tokens` so far: charge what was not charged yet."""
        delta = total_tokens - self.charged
        if delta > 0:
            self.charged = total_tokens
            self.quotas._charge(self.caller, delta)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.quotas._release(self.caller)

    def __enter__(self) -> "CallerTicket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _export_stats(stats: Stats, mode: str) -> None:
    metrics.SEARCH_ROLLOUTS.labels(mode).inc(stats.rollouts)
    metrics.SEARCH_TOKENS.labels(mode).inc(stats.generated_tokens)
    metrics.SEARCH_EXECUTIONS.labels(mode).inc(stats.executions)
    for stage, secs in (("generate", stats.generate_seconds), ("ppm", stats.ppm_seconds),
                        ("sandbox", stats.sandbox_seconds), ("other", stats.other_seconds)):
        metrics.SEARCH_STAGE_SECONDS.labels(stage).inc(secs)


class SearchCore:
    def __init__(self, policy, executor, scorer=None, store=None, admission: Admission | None = None):
        self.policy = policy
        self.executor = executor
        self.scorer = scorer
        self.store = store
        self.admission = admission or Admission(slots=4, queue=16)

    def _engine(self, opts: SearchOptions) -> Engine:
        return Engine(self.policy, self.executor, self.scorer, sampling=opts.sampling())

    def _admitted(self, scope: CallScope, fn: Callable):
        self.admission.acquire(scope)
        try:
            return fn()
        finally:
            self.admission.release()

    # --- inference ---

    def solve(self, problem: str, opts: SearchOptions, scope: CallScope | None = None,
              on_progress: Callable[[Progress, Sequence[Tree]], None] | None = None) -> SolveOutcome:
        """N independent PPM-guided searches (N = opts.trajectories), then answer selection."""
        scope = scope or CallScope()
        settings = TreeSettings(rollouts=opts.rollouts, k=opts.k, max_depth=opts.max_depth, c=opts.exploration,
                                annotation=PPM_AUGMENTED)
        trees = [Tree(problem, settings, seed=derive_seed(opts.seed, "trajectory", i), tag=i)
                 for i in range(opts.trajectories)]
        progress = (lambda p: on_progress(p, trees)) if on_progress else None

        def run() -> SolveOutcome:
            stats = self._engine(opts).run(trees, opts.limits(), scope, progress)
            for t in trees:
                metrics.SEARCH_TREE_NODES.observe(len(t.nodes) - 1)
            _export_stats(stats, "solve")
            return SolveOutcome(selection=selection.select(trees, opts.strategy), stats=stats, trees=trees)

        return self._admitted(scope, run)

    # --- synthesis ---

    def synthesize(self, problems: Sequence[SynthesisProblem], opts: SearchOptions, round_no: int = 0,
                   shard: str = "", store_trees: bool = True, scope: CallScope | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   on_tree: Callable[[Tree | trajectories.TreeRecord, dict], None] | None = None) -> SynthesisOutcome:
        """Search every problem with its gold answer; with `store_trees`, the trees go to the store as one shard.

        Storage never loses finished work: each tree is stored (as a part of the
        shard, `trajectories.ShardBuilder`) as soon as it finishes, and a rerun of
        the same shard takes back the trees an earlier, killed run finished (same
        problem, seed and settings) and searches only the rest. The shard itself
        is written once, at the end (ShardExists up front if it is already
        stored). A run stopped by a limit stores the trees it searched and marks
        the shard `complete: false`; problems it never started are neither stored
        nor counted (`SynthesisOutcome.not_started`). Cancellation or an error
        writes no shard; the parts stay for the rerun. `on_tree(tree, d)` gets the
        engine tree, or for a tree taken back from an earlier run its stored record.
        """
        scope = scope or CallScope()
        if opts.annotation not in (TERMINAL_GUIDED, PPM_AUGMENTED):
            raise ValueError(f"unknown annotation mode {opts.annotation!r}")
        settings = opts.tree_settings()
        trees = [Tree(p.problem, settings, seed=derive_seed(opts.seed, "problem", i, p.id), gold=p.answer,
                      problem_id=p.id or str(i), tag=i) for i, p in enumerate(problems)]
        builder = None
        if store_trees:
            if self.store is None:
                raise RuntimeError("no trajectory store configured")
            builder = trajectories.ShardBuilder(self.store, round_no, shard or auto_shard_name(opts.seed))
        resumed = _resumable(trees, builder.stored()) if builder else {}
        stats = Stats()
        dicts: dict[int, dict] = {}
        interrupted: list[Tree] = []

        def finish(t: Tree | trajectories.TreeRecord, d: dict, tag: int, searched: bool = True) -> None:
            dicts[tag] = d
            if searched:   # a tree taken back was counted by the run that searched it
                metrics.SEARCH_PROBLEMS.labels("true" if d["solved"] else "false").inc()
                metrics.SEARCH_TREE_NODES.observe(len(t.nodes) - 1)
            if on_tree:
                on_tree(t, d)

        def finish_searched(t: Tree) -> dict:
            d = trajectories.tree_to_dict(t, stats.model_versions, {"round": round_no})
            finish(t, d, t.tag)
            return d

        def progress(p: Progress) -> None:
            done = [finish_searched(t) for t in p.finished]
            if builder and done:
                builder.add(done)
            if on_progress:
                on_progress(p)

        def run() -> SynthesisOutcome:
            for tag, rec in resumed.items():
                finish(rec, rec.to_dict(), tag, searched=False)
            to_run = [t for t in trees if t.tag not in resumed]
            self._engine(opts).run(to_run, opts.limits(), scope, progress, stats=stats)
            _export_stats(stats, "synthesis")
            for t in to_run:   # stopped by a limit: the searched part of a tree is kept, an unstarted tree is not
                if t.tag not in dicts and _started(t):
                    if t.rollouts_done < t.settings.rollouts and not t.root.terminal:
                        interrupted.append(t)
                    finish_searched(t)
            ordered = [dicts[t.tag] for t in trees if t.tag in dicts]
            not_started = [t.problem_id for t in trees if t.tag not in dicts]
            solved = sum(1 for d in ordered if d["solved"])
            out = SynthesisOutcome(stats=stats, trees=[t for t in to_run if t.tag in dicts], solved=solved,
                                   tree_dicts=ordered, resumed=len(resumed), not_started=not_started,
                                   complete=not not_started and not interrupted)
            if builder:
                meta = _shard_metadata(out, opts, requested=len(trees), interrupted=interrupted)
                out.shard_key = builder.finish(ordered, meta).key
            return out

        return self._admitted(scope, run)


def _shard_metadata(out: SynthesisOutcome, opts: SearchOptions, requested: int, interrupted: list[Tree]) -> dict:
    """The manifest fields of a synthesis shard: what it holds, and what it does not."""
    return {"model_versions": out.stats.model_versions, "problems": len(out.tree_dicts), "requested": requested,
            "solved": out.solved, "complete": out.complete, "not_started": out.not_started,
            "interrupted": [t.problem_id for t in interrupted], "resumed": out.resumed,
            "settings": json.loads(json.dumps(out.tree_dicts[0]["settings"])) if out.tree_dicts else {},
            "seed": opts.seed, "stop_reason": out.stats.stop_reason}


def auto_shard_name(seed: int) -> str:
    """A shard name for a synthesis that was given none: the seed and the time, to the microsecond."""
    return f"s{seed:x}-{time.strftime('%Y%m%dT%H%M%S')}-{int(time.time() * 1e6) % 10**6:06d}"


def _started(tree: Tree) -> bool:
    return tree.rollouts_done > 0 or len(tree.nodes) > 1


def _resumable(trees: Sequence[Tree], stored: Sequence[trajectories.TreeRecord]) -> dict[int, trajectories.TreeRecord]:
    """Tag -> stored record, for each tree an earlier run of the same shard already finished.

    A record is taken back only for the same problem (id, question, gold), the
    same seed and the same settings; model versions are not compared (each tree
    record keeps its own).
    """
    def identity(r: trajectories.TreeRecord) -> tuple:
        return (r.problem_id, r.question, r.gold, r.seed, json.dumps(r.settings, sort_keys=True))

    by_identity = {identity(r): r for r in stored}
    out = {}
    for t in trees:
        rec = by_identity.get(identity(trajectories.TreeRecord.from_search_tree(t)))
        if rec is not None:
            out[t.tag] = rec
    return out
