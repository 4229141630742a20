"""The MCTS of rStar-Math (spec section 2) on one tree: nodes and the four phases.

Pure and synchronous: this module knows nothing of gRPC, models or storage.
It turns policy candidates into child nodes (`expand_leaf`), applies sandbox
results and PPM scores to them (`apply_execution`, `evaluate_children`),
picks children by UCT (`select_child`) and backs values up
(`backpropagate`). `Tree` strings these into rollouts; the batched engine
(`rstar.search.engine`) drives many trees at once and does all the I/O.

Rollout semantics (documented in docs/search.md):
- A rollout descends from the root by UCT over the non-terminal children; at an
  unexpanded leaf it asks for an expansion, then continues from that leaf.
- New children are evaluated at creation. Failed and over-deep children are
  terminal with value -1, kept locally (N=1, Q=-1; as the authors' code, they do
  not drag their parent down). Answer children are terminal with value +-1
  against the gold answer, or their PPM score when no gold answer is known;
  that value is backed up from the answer node to the root.
- The rollout ends when its expansion produced an answer, or at a dead end: a
  node whose children are all terminal (it becomes terminal) and none is an
  answer backs up -1 from itself to the root.
- PPM-augmented mode: every new non-terminal child starts with Q = its PPM
  score, counted as one visit, so the first selection below a fresh expansion
  is greedy on the PPM.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

from rstar import grading, steps as stepfmt
from rstar.protocols import (Candidate, Executor, ExecResult, GenerationItem, Policy,  # noqa: F401 - re-exported
                             SamplingParams, Scorer, Versioned)

# --- settings ---

TERMINAL_GUIDED = "terminal_guided"
PPM_AUGMENTED = "ppm_augmented"


@dataclass(frozen=True)
class TreeSettings:
    rollouts: int = 8
    k: int = 4                          # candidates per expansion
    max_depth: int = 16                 # steps; a non-answer node at this depth is terminal -1
    c: float = 2.0                      # UCT exploration constant
    annotation: str = PPM_AUGMENTED     # PPM priors on new children, or none (terminal-guided)
    keep_one_answer: bool = True        # spec: of the answer candidates of an expansion, keep one

    def validate(self) -> None:
        if self.rollouts < 1 or self.k < 1 or self.max_depth < 1:
            raise ValueError("rollouts, k and max_depth must be >= 1")
        if self.c < 0:
            raise ValueError("exploration constant must be >= 0")
        if self.annotation not in (TERMINAL_GUIDED, PPM_AUGMENTED):
            raise ValueError(f"unknown annotation mode {self.annotation!r}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


# --- nodes ---


@dataclass(eq=False)
class Node:
    id: int
    parent: Node | None
    depth: int
    text: str = ""                      # the step as generated (normalised), markers included
    code: str = ""                      # python of this step
    output: str = ""                    # stdout of the program that verified it
    failure: str = ""                   # "" or why it failed ("error", "timeout", "length", "depth", ...)
    finish_reason: str = ""
    num_tokens: int = 0
    N: int = 0
    W: float = 0.0
    ppm_score: float | None = None
    terminal: bool = False
    answer: str | None = None
    correct: bool | None = None
    ends_code: bool = False
    children: list[Node] = field(default_factory=list)
    expanded: bool = False
    program: str | None = None          # pending program to execute (cleared once applied)

    @property
    def Q(self) -> float:
        return self.W / self.N if self.N else 0.0

    @property
    def is_answer(self) -> bool:
        return self.answer is not None

    def own_steps(self) -> tuple[str, ...]:
        """What this node adds to the prefix its children see (the output step after a code block)."""
        if self.parent is None:
            return ()
        return stepfmt.steps_added(self.text, self.output, ends_code=self.ends_code, failed=bool(self.failure),
                                   is_answer=self.is_answer)

    def prefix_steps(self) -> tuple[str, ...]:
        chain = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            chain.append(node.own_steps())
            node = node.parent
        return tuple(s for part in reversed(chain) for s in part)

    def path(self) -> list[Node]:
        """Nodes from the first step to this one (root excluded)."""
        out = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


# --- phases ---


def uct_score(child: Node, parent_visits: int, c: float) -> float:
    """Q + c*sqrt(ln N(parent) / N(child)); an unvisited child scores 0 (authors' code)."""
    if child.N == 0:
        return 0.0
    explore = c * math.sqrt(math.log(parent_visits) / child.N) if parent_visits > 0 else 0.0
    return child.Q + explore


def select_child(node: Node, c: float) -> Node | None:
    """The non-terminal child with the highest UCT; ties go to the first child; None if all terminal."""
    best, best_score = None, -math.inf
    for child in node.children:
        if child.terminal:
            continue
        s = uct_score(child, node.N, c)
        if s > best_score:
            best, best_score = child, s
    return best


def backpropagate(node: Node, value: float) -> None:
    """N += 1, W += value on `node` and every ancestor up to the root."""
    cur: Node | None = node
    while cur is not None:
        cur.N += 1
        cur.W += value
        cur = cur.parent


def _dedupe_key(text: str) -> str:
    return text.strip()


def expand_leaf(leaf: Node, candidates: Sequence[Candidate], settings: TreeSettings,
                next_id: int) -> list[Node]:
    """Child nodes from the policy's candidates: classify, dedupe, collapse answers, check limits.

    Each candidate is classified by `rstar.steps.classify_candidate` (the same rule eval and
    synthesis use: model-written system markers cut the step, an answer comes only from a
    well-formed answer step). Children that need verification carry `program` (to run before
    evaluation); failed candidates (cut by the token limit, empty, unterminated, an answer
    outside an answer step) and non-answer steps at the depth limit are terminal at once.
    """
    is_first = leaf.parent is None
    parent_steps = leaf.prefix_steps()
    children: list[Node] = []
    seen: set[str] = set()
    answer_kept = False
    for cand in candidates:
        step = stepfmt.classify_candidate(cand.text, cand.finish_reason, is_first)
        key = _dedupe_key(step.text)
        if key in seen:
            continue
        seen.add(key)
        if step.is_answer:
            if answer_kept and settings.keep_one_answer:
                continue
            answer_kept = True
        child = Node(id=next_id + len(children), parent=leaf, depth=leaf.depth + 1, text=step.text,
                     code=step.code, finish_reason=cand.finish_reason, num_tokens=cand.num_tokens,
                     ends_code=step.ends_code)
        if step.failed:
            child.failure = step.failure
        elif step.is_answer:
            child.answer = step.answer
        elif child.depth >= settings.max_depth:
            child.failure = "depth"        # cannot reach an answer within the depth limit
        else:
            child.program = stepfmt.assemble_program(parent_steps, step.text)
        if child.failure or child.is_answer:
            child.terminal = True
        children.append(child)
    return children


def apply_execution(child: Node, result: ExecResult) -> None:
    """Record the verification run; a failed run or an "error" in the output fails the step.

    The output is stored escaped (`rstar.steps.escape_output`): it enters the children's
    prompts and the stored tree, where printed step markers must not read as steps.
    """
    child.program = None
    child.output = stepfmt.escape_output(result.stdout)
    if result.failure != "ok":
        child.failure = result.failure
    elif stepfmt.output_is_failure(result.stdout):
        child.failure = "error_output"
    if child.failure:
        child.terminal = True


def needs_score(child: Node, settings: TreeSettings, gold: str | None) -> bool:
    """Whether the PPM must score this child (prior, or terminal value at inference)."""
    if child.failure:
        return False
    if child.is_answer:
        return settings.annotation == PPM_AUGMENTED or gold is None
    return settings.annotation == PPM_AUGMENTED


def evaluate_children(leaf: Node, children: list[Node], settings: TreeSettings,
                      gold: str | None) -> list[Node]:
    """Attach evaluated children to `leaf`; back up answer values; returns the answer children.

    Scores must already be in `ppm_score` where `needs_score` asked for them.
    """
    answers = []
    for child in children:
        if child.failure:
            child.N, child.W = 1, -1.0
        elif child.is_answer:
            if gold is not None:
                child.correct = grading.answers_equal(child.answer, gold)
            answers.append(child)
        elif settings.annotation == PPM_AUGMENTED and child.ppm_score is not None:
            child.N, child.W = 1, float(child.ppm_score)
    leaf.children.extend(children)
    leaf.expanded = True
    for child in answers:
        backpropagate(child, terminal_value(child, gold))
    return answers


def terminal_value(node: Node, gold: str | None) -> float:
    if node.failure:
        return -1.0
    if gold is not None:
        return 1.0 if node.correct else -1.0
    return float(node.ppm_score if node.ppm_score is not None else -1.0)


def mark_terminal_upwards(node: Node) -> None:
    """`node` is terminal; so is every ancestor all of whose children are now terminal."""
    node.terminal = True
    cur = node.parent
    while cur is not None and cur.children and all(ch.terminal for ch in cur.children):
        cur.terminal = True
        cur = cur.parent


# --- one tree ---


class Tree:
    """One search: its nodes, its seed, and where its current rollout stands."""

    def __init__(self, question: str, settings: TreeSettings, seed: int, gold: str | None = None,
                 problem_id: str = "", tag: object = None):
        settings.validate()
        self.question = question
        self.settings = settings
        self.seed = seed
        self.gold = gold
        self.problem_id = problem_id
        self.tag = tag
        self.root = Node(id=0, parent=None, depth=0)
        self.nodes: list[Node] = [self.root]
        self.rollouts_done = 0
        self.cursor: Node | None = None     # where the current rollout stands; None = between rollouts
        self.finished = False

    # The engine calls next_leaf (selection), then expand + evaluate for that leaf.
    def next_leaf(self) -> Node | None:
        """Advance the rollout to the next leaf to expand; None when the tree is done."""
        while not self.finished:
            if self.cursor is None:
                if self.rollouts_done >= self.settings.rollouts or self.root.terminal:
                    self.finished = True
                    return None
                self.cursor = self.root
            node = self.cursor
            if not node.expanded:
                return node
            nxt = select_child(node, self.settings.c)
            if nxt is None:          # every child terminal: a dead end reached by selection
                self._end_dead(node)
                continue
            self.cursor = nxt
        return None

    def seed_for(self, leaf: Node) -> int:
        return derive_seed(self.seed, leaf.id)

    def add_expansion(self, leaf: Node, children: list[Node]) -> None:
        """Evaluate and attach an expansion of `leaf` (children already executed and scored)."""
        self.nodes.extend(children)
        answers = evaluate_children(leaf, children, self.settings, self.gold)
        if answers:
            if all(ch.terminal for ch in leaf.children):
                mark_terminal_upwards(leaf)
            self._end_rollout()
        elif select_child(leaf, self.settings.c) is None:
            self._end_dead(leaf)
        # else: the rollout continues below `leaf` on the next call to next_leaf

    def _end_dead(self, node: Node) -> None:
        """A node with no non-terminal child and no answer below this rollout: back up -1."""
        if node.parent is not None and not any(ch.is_answer for ch in node.children):
            backpropagate(node, -1.0)
        mark_terminal_upwards(node)
        self._end_rollout()

    def _end_rollout(self) -> None:
        self.rollouts_done += 1
        self.cursor = None

    def stop(self) -> None:
        self.finished = True
        self.cursor = None

    def answer_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_answer and not n.failure]

    @property
    def next_id(self) -> int:
        return len(self.nodes)
