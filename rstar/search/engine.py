"""The batched search engine: advances many MCTS trees in lock-step.

Each iteration takes the next leaf of every active tree, sends ONE policy call
for all of them, ONE sandbox call with every candidate program of the batch
(the sandbox runs them concurrently), and ONE PPM call for every new node that
needs a score; then each tree evaluates and backs up its own expansion. A
single Solve (one tree), N independent trajectories (N trees, different seeds)
and a synthesis batch of 1,000 problems (a queue of trees, at most
`max_active_trees` at once, refilled as trees finish) run through the same loop.

Trees never see each other: a tree's policy seeds derive from its own seed and
node ids, so N trees advanced together grow exactly as N trees advanced one
after another (given deterministic models). The engine knows nothing of gRPC:
cancellation and deadlines arrive through a `CallScope`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from rstar.protocols import CallScope, Cancelled, DeadlineExceeded  # noqa: F401 - re-exported
from rstar.search import mcts
from rstar.search.mcts import ExecResult, GenerationItem, Node, SamplingParams, Tree

log = logging.getLogger(__name__)


@dataclass
class Limits:
    """Request-wide limits on top of each tree's rollout budget."""

    max_tokens: int = 0                 # generated tokens over the run; 0 = unlimited
    max_wall_seconds: float = 0.0       # 0 = unlimited
    max_active_trees: int = 32          # trees advanced together (synthesis batch size)


@dataclass
class Stats:
    rollouts: int = 0
    nodes: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    executions: int = 0
    policy_calls: int = 0
    ppm_calls: int = 0
    sandbox_calls: int = 0
    trees: int = 0
    iterations: int = 0
    generate_seconds: float = 0.0
    ppm_seconds: float = 0.0
    sandbox_seconds: float = 0.0
    total_seconds: float = 0.0
    stop_reason: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.total_seconds - self.generate_seconds - self.ppm_seconds - self.sandbox_seconds)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["other_seconds"] = self.other_seconds
        return d


@dataclass
class Progress:
    rollouts_done: int
    rollouts_total: int
    trees_done: int
    trees_total: int
    generated_tokens: int
    executions: int
    elapsed_seconds: float
    finished: list[Tree]                # trees finished since the previous report


class Engine:
    """Runs trees to completion against a policy, a scorer (optional) and an executor."""

    def __init__(self, policy: mcts.Policy, executor: mcts.Executor, scorer: mcts.Scorer | None = None,
                 sampling: SamplingParams = SamplingParams()):
        self.policy = policy
        self.executor = executor
        self.scorer = scorer
        self.sampling = sampling

    def run(self, trees: Iterable[Tree], limits: Limits = Limits(), scope: CallScope | None = None,
            on_progress: Callable[[Progress], None] | None = None, stats: Stats | None = None) -> Stats:
        """Advance every tree until its budget is spent or a limit stops the run.

        Returns the run's stats; `stats.stop_reason` says why it ended ("budget",
        "exhausted", "tokens", "wall_time"). Raises Cancelled / DeadlineExceeded
        when the scope is stopped; trees keep what they had grown so far.
        """
        scope = scope or CallScope()
        stats = stats or Stats()
        start = time.perf_counter()
        all_trees = list(trees)
        queue = deque(all_trees)
        stats.trees = len(all_trees)
        total_rollouts = sum(t.settings.rollouts for t in all_trees)
        active: list[Tree] = []
        done: list[Tree] = []
        try:
            while True:
                while queue and len(active) < max(1, limits.max_active_trees):
                    active.append(queue.popleft())
                batch: list[tuple[Tree, Node]] = []
                finished_now: list[Tree] = []
                for tree in active:
                    leaf = tree.next_leaf()
                    if leaf is None:
                        finished_now.append(tree)
                    else:
                        batch.append((tree, leaf))
                if finished_now:
                    done.extend(finished_now)
                    active = [t for t, _leaf in batch]
                    if on_progress:
                        self._report(on_progress, stats, all_trees, len(done), total_rollouts, start, finished_now)
                if not batch:
                    if queue:
                        continue
                    break
                reason = self._limit_reached(limits, stats, start)
                if reason:
                    stats.stop_reason = reason
                    for tree in active + list(queue):
                        tree.stop()
                    break
                self._iterate(batch, scope, stats)
                if on_progress:
                    self._report(on_progress, stats, all_trees, len(done), total_rollouts, start, [])
            if not stats.stop_reason:
                exhausted = all_trees and all(t.root.terminal for t in all_trees)
                stats.stop_reason = "exhausted" if exhausted else "budget"
        finally:
            stats.rollouts = sum(t.rollouts_done for t in all_trees)
            stats.nodes = sum(len(t.nodes) - 1 for t in all_trees)
            stats.total_seconds = time.perf_counter() - start
        return stats

    @staticmethod
    def _limit_reached(limits: Limits, stats: Stats, start: float) -> str:
        if limits.max_tokens and stats.generated_tokens >= limits.max_tokens:
            return "tokens"
        if limits.max_wall_seconds and time.perf_counter() - start >= limits.max_wall_seconds:
            return "wall_time"
        return ""

    @staticmethod
    def _report(on_progress, stats: Stats, all_trees, trees_done, total_rollouts, start, finished) -> None:
        on_progress(Progress(rollouts_done=sum(t.rollouts_done for t in all_trees), rollouts_total=total_rollouts,
                             trees_done=trees_done, trees_total=len(all_trees),
                             generated_tokens=stats.generated_tokens, executions=stats.executions,
                             elapsed_seconds=time.perf_counter() - start, finished=list(finished)))

    # --- one lock-step iteration: generate -> execute -> score -> evaluate ---

    def _iterate(self, batch: list[tuple[Tree, Node]], scope: CallScope, stats: Stats) -> None:
        stats.iterations += 1
        expansions = self._generate(batch, scope, stats)
        self._execute([ch for _t, _l, children in expansions for ch in children], scope, stats)
        self._score(expansions, scope, stats)
        for tree, leaf, children in expansions:
            tree.add_expansion(leaf, children)

    def _generate(self, batch, scope: CallScope, stats: Stats):
        scope.check()
        items = [GenerationItem(question=t.question, steps=leaf.prefix_steps(), n=t.settings.k,
                                seed=t.seed_for(leaf)) for t, leaf in batch]
        t0 = time.perf_counter()
        try:
            results = self.policy.generate(items, self.sampling, scope=scope)
        finally:
            stats.generate_seconds += time.perf_counter() - t0
            stats.policy_calls += 1
        if len(results) != len(items):
            raise RuntimeError(f"policy returned {len(results)} results for {len(items)} prefixes")
        _note_version(stats, "policy", results)
        stats.prompt_tokens += sum(getattr(results, "prompt_tokens", []) or [])
        expansions = []
        for (tree, leaf), cands in zip(batch, results):
            stats.generated_tokens += sum(c.num_tokens for c in cands)
            children = mcts.expand_leaf(leaf, cands, tree.settings, tree.next_id)
            expansions.append((tree, leaf, children))
        return expansions

    def _execute(self, children: list[Node], scope: CallScope, stats: Stats) -> None:
        pending = [ch for ch in children if ch.program is not None]
        if not pending:
            return
        scope.check()
        unique: dict[str, int] = {}
        programs: list[str] = []
        for ch in pending:
            if ch.program not in unique:
                unique[ch.program] = len(programs)
                programs.append(ch.program)
        t0 = time.perf_counter()
        try:
            results: Sequence[ExecResult] = self.executor.execute(programs, scope=scope)
        finally:
            stats.sandbox_seconds += time.perf_counter() - t0
            stats.sandbox_calls += 1
        if len(results) != len(programs):
            raise RuntimeError(f"sandbox returned {len(results)} results for {len(programs)} programs")
        stats.executions += len(programs)
        for ch in pending:
            mcts.apply_execution(ch, results[unique[ch.program]])

    def _score(self, expansions, scope: CallScope, stats: Stats) -> None:
        todo = [(tree, ch) for tree, _leaf, children in expansions for ch in children
                if mcts.needs_score(ch, tree.settings, tree.gold)]
        if not todo:
            return
        if self.scorer is None:
            raise RuntimeError("this search needs PPM scores but no scorer is configured")
        scope.check()
        prefixes = [(tree.question, ch.prefix_steps()) for tree, ch in todo]
        t0 = time.perf_counter()
        try:
            scores = self.scorer.score(prefixes, scope=scope)
        finally:
            stats.ppm_seconds += time.perf_counter() - t0
            stats.ppm_calls += 1
        if len(scores) != len(prefixes):
            raise RuntimeError(f"PPM returned {len(scores)} scores for {len(prefixes)} prefixes")
        _note_version(stats, "ppm", scores)
        for (_tree, ch), s in zip(todo, scores):
            ch.ppm_score = float(s)


def _note_version(stats: Stats, name: str, results) -> None:
    version = getattr(results, "model_version", "")
    if version:
        stats.model_versions[name] = version
