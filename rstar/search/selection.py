"""Choosing the final answer from finished trajectories (spec section 2, inference).

Pure functions over trees: every answer node of every tree is one finished
trajectory (the path from the root to it). Strategies, chosen per request:
- top_ppm (default, the paper): the trajectory whose final step has the highest PPM score;
- majority_vote: the answer most trajectories reach (ties: higher best score);
- ppm_weighted_vote: the answer with the largest sum of (score + 1) / 2 over its
  trajectories (scores mapped to [0, 1] so a negative score never counts against).
Answers are grouped by `rstar.grading.answers_equal`, so "0.5" and "\\frac{1}{2}" vote together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rstar import grading
from rstar.search.mcts import Node, Tree

TOP_PPM = "top_ppm"
MAJORITY_VOTE = "majority_vote"
PPM_WEIGHTED_VOTE = "ppm_weighted_vote"
STRATEGIES = (TOP_PPM, MAJORITY_VOTE, PPM_WEIGHTED_VOTE)


@dataclass
class Trajectory:
    steps: list[Node]
    answer: str
    final_score: float
    mean_q: float
    seed: int


@dataclass
class AnswerGroup:
    answer: str
    trajectories: list[Trajectory] = field(default_factory=list)

    @property
    def votes(self) -> int:
        return len(self.trajectories)

    @property
    def best_score(self) -> float:
        return max(t.final_score for t in self.trajectories)

    @property
    def weighted_score(self) -> float:
        return sum((t.final_score + 1.0) / 2.0 for t in self.trajectories)


@dataclass
class Selection:
    answer: str
    trajectory: Trajectory | None       # the winning trajectory (a partial one when no answer was reached)
    groups: list[AnswerGroup]           # alternatives, best first under the strategy
    trajectories: list[Trajectory]      # every finished trajectory, best final score first
    strategy: str


def final_score(node: Node) -> float:
    """PPM score of the final step; without a PPM (terminal-guided synthesis) its terminal value."""
    if node.ppm_score is not None:
        return float(node.ppm_score)
    return node.Q


def trajectory_of(node: Node, seed: int, answer: str = "") -> Trajectory:
    steps = node.path()
    mean_q = sum(n.Q for n in steps) / len(steps) if steps else 0.0
    return Trajectory(steps=steps, answer=answer, final_score=final_score(node) if steps else 0.0,
                      mean_q=mean_q, seed=seed)


def finished_trajectories(trees: Sequence[Tree]) -> list[Trajectory]:
    out = [trajectory_of(n, t.seed, n.answer or "") for t in trees for n in t.answer_nodes()]
    out.sort(key=lambda tr: -tr.final_score)   # stable: ties keep tree/creation order
    return out


def group_answers(trajectories: Sequence[Trajectory]) -> list[AnswerGroup]:
    groups: list[AnswerGroup] = []
    for tr in trajectories:
        for g in groups:
            if tr.answer == g.answer or grading.answers_equal(tr.answer, g.answer):
                g.trajectories.append(tr)
                break
        else:
            groups.append(AnswerGroup(answer=tr.answer, trajectories=[tr]))
    return groups


def _key(strategy: str):
    if strategy == TOP_PPM:
        return lambda g: (g.best_score, g.votes)
    if strategy == MAJORITY_VOTE:
        return lambda g: (g.votes, g.best_score)
    if strategy == PPM_WEIGHTED_VOTE:
        return lambda g: (g.weighted_score, g.best_score)
    raise ValueError(f"unknown selection strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


def best_partial(tree: Tree) -> Trajectory:
    """Without any answer: follow the highest-Q non-failed child from the root.

    Where only failed children remain, the trajectory ends with the best of them, so the
    caller sees the step that was tried and why it failed (its failure kind and output).
    """
    node = tree.root
    while True:
        options = [c for c in node.children if not c.failure]
        if not options:
            if node.children:
                node = max(node.children, key=lambda c: c.ppm_score if c.ppm_score is not None else -2.0)
            break
        node = max(options, key=lambda c: (c.Q, c.ppm_score if c.ppm_score is not None else -2.0))
    return trajectory_of(node, tree.seed)


def select(trees: Sequence[Tree], strategy: str = TOP_PPM) -> Selection:
    key = _key(strategy)
    trajectories = finished_trajectories(trees)
    groups = sorted(group_answers(trajectories), key=key, reverse=True)   # stable on ties
    if not groups:
        partials = [best_partial(t) for t in trees]
        partial = max(partials, key=lambda tr: (len(tr.steps) > 0, tr.final_score), default=None)
        return Selection(answer="", trajectory=partial, groups=[], trajectories=[], strategy=strategy)
    win = groups[0]
    best = max(win.trajectories, key=lambda tr: tr.final_score)
    return Selection(answer=win.answer, trajectory=best, groups=groups, trajectories=trajectories,
                     strategy=strategy)
