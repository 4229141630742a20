"""Training data from synthesis trees: SFT trajectories and PPM preference pairs.

Trees are the trajectory store's typed records (`rstar.trees.TreeRecord`, schema
`rstar.tree/1`; plain dicts of that schema are accepted and converted): a flat
node list, node 0 the root (the question), each node with `parent`, `q`,
`visits`, `failure`, `answer`, `correct`, `children`.

SFT (spec section 4, issue 6 item 1): per problem, the paths root -> correct
answer node with no failed step, ranked by mean Q over their steps (ties: the
higher minimum Q, then creation order); the top 2 are kept. Duplicates (same
question and same step texts, across problems, shards and rounds) are dropped.

PPM pairs (spec section 3): for every expanded prefix, its children that lead
to a correct answer (some correct answer node in their subtree) are the
positive candidates, children that were explored and lead only to wrong ends
(a wrong answer, a failed step, a dead end) are the negative candidates;
positives = the 2 highest-Q positive candidates, negatives = the 2 lowest-Q
negative candidates. Answer steps are not paired as siblings: the final step
uses whole trajectories instead (the 2 correct trajectories with the highest
mean Q vs the 2 wrong ones with the lowest). A pair is kept only when
Q(pos) - Q(neg) >= `min_q_margin` (0.5) and the two texts differ by an edit
distance >= `min_edit_distance` (20 characters) -- the authors' filters. Each
pair of a group gets weight 1 / (number of pairs kept in that group), which is
1 / (n+ * n-) when nothing was filtered: every step position counts once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rstar import steps as stepfmt
from rstar import trees as traj
from rstar.trees import TreeRecord

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- problems / JSONL


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (`.gz` is decompressed); blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: not JSON: {e}") from e
    return rows


def load_problems(path: str | Path, limit: int = 0, exclude_ids: Iterable[str] = (),
                  offset: int = 0) -> list[dict[str, Any]]:
    """Problems from a pool/dev file: rows with `id`, `problem`, `answer` (extra fields kept).

    `exclude_ids` are dropped first; then the first `offset` remaining rows are skipped and at most
    `limit` are returned, so consecutive offsets give disjoint slices of the same file."""
    rows = read_jsonl(path)
    excluded = set(exclude_ids)
    out = []
    for i, r in enumerate(rows):
        if "problem" not in r or "answer" not in r:
            raise ValueError(f"{path}: row {i + 1} lacks 'problem' or 'answer'")
        r.setdefault("id", f"{Path(path).stem}/{i}")
        r["answer"] = str(r["answer"])
        if r["id"] in excluded:
            continue
        if offset > 0:
            offset -= 1
            continue
        out.append(r)
        if limit and len(out) >= limit:
            break
    return out


def encode_jsonl_gz(rows: Iterable[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for r in rows:
            gz.write(json.dumps(r, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return buf.getvalue()


def decode_jsonl_gz(data: bytes) -> list[dict[str, Any]]:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
        return [json.loads(line) for line in gz if line.strip()]


# --------------------------------------------------------------------------- tree helpers


def prefix_steps(tree: TreeRecord | dict[str, Any], node_id: int) -> list[str]:
    """The prefix of a node (the one prefix rule, `rstar.trees.TreeRecord.prefix_steps`)."""
    return TreeRecord.coerce(tree).prefix_steps(node_id)


def _outcomes(tree: TreeRecord) -> tuple[list[bool], list[bool]]:
    """Per node: (its subtree holds a correct answer, its subtree holds a wrong end)."""
    nodes = tree.nodes
    good = [False] * len(nodes)
    bad = [False] * len(nodes)
    order: list[int] = []          # iterative DFS pre-order; reversed, every child comes before its parent
    stack = [n.id for n in nodes if n.parent is None]
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(nodes[i].children)
    for i in reversed(order):
        n = nodes[i]
        if n.is_answer and n.correct is True:
            good[i] = True
        elif n.terminal and (n.failure or n.correct is False or (not n.children and not n.is_answer)):
            bad[i] = True
        for c in n.children:
            good[i] |= good[c]
            bad[i] |= bad[c]
    return good, bad


@dataclass(frozen=True)
class TrajectoryRef:
    node_id: int          # the answer node
    correct: bool
    mean_q: float
    min_q: float
    has_failure: bool
    steps: tuple[str, ...]


def trajectories(tree: TreeRecord | dict[str, Any]) -> list[TrajectoryRef]:
    """Every root -> answer-node path of a tree."""
    tree = TreeRecord.coerce(tree)
    nodes = tree.nodes
    out = []
    for n in nodes:
        if n.parent is None or not n.is_answer or n.correct is None:
            continue
        ids = tree.path_ids(n.id)
        qs = [float(nodes[i].q) for i in ids]
        out.append(TrajectoryRef(
            node_id=n.id, correct=bool(n.correct), mean_q=sum(qs) / len(qs), min_q=min(qs),
            has_failure=any(nodes[i].failure for i in ids), steps=tuple(tree.prefix_steps(n.id))))
    return out


# --------------------------------------------------------------------------- SFT selection


@dataclass(frozen=True)
class SFTExample:
    problem_id: str
    question: str
    steps: tuple[str, ...]
    mean_q: float
    min_q: float
    source: str = ""      # "round-<n>/<shard>" it came from

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.question, list(self.steps)]).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SFTExample":
        return cls(d["problem_id"], d["question"], tuple(d["steps"]), float(d["mean_q"]), float(d["min_q"]),
                   d.get("source", ""))


def select_sft(tree: TreeRecord | dict[str, Any], top_k: int = 2, source: str = "") -> list[SFTExample]:
    """The top-k correct trajectories of one tree by mean Q (ties: min Q, then order), no failed step."""
    tree = TreeRecord.coerce(tree)
    cands = [t for t in trajectories(tree) if t.correct and not t.has_failure]
    cands.sort(key=lambda t: (-t.mean_q, -t.min_q, t.node_id))
    out, seen = [], set()
    for t in cands:
        if t.steps in seen:
            continue
        seen.add(t.steps)
        out.append(SFTExample(tree.problem_id, tree.question, t.steps, t.mean_q, t.min_q, source))
        if len(out) >= top_k:
            break
    return out


@dataclass
class SFTStats:
    problems: int = 0
    solved: int = 0
    kept: int = 0
    duplicates: int = 0
    tokens: int = 0       # filled in by the trainer once tokenised

    def line(self) -> str:
        ratio = self.solved / self.problems if self.problems else 0.0
        return (f"SFT data: {self.problems} problems, {self.solved} solved ({ratio:.1%}), "
                f"{self.kept} trajectories kept, {self.duplicates} duplicates dropped"
                + (f", {self.tokens} tokens" if self.tokens else ""))


def build_sft(trees: Iterable[tuple[str, dict[str, Any]]], top_k: int = 2) -> tuple[list[SFTExample], SFTStats]:
    """SFT examples from (source, tree) pairs, deduplicated across everything given."""
    stats = SFTStats()
    out: list[SFTExample] = []
    seen: set[str] = set()
    for source, tree in trees:
        stats.problems += 1
        chosen = select_sft(tree, top_k, source)
        if chosen:
            stats.solved += 1
        for ex in chosen:
            if ex.key in seen:
                stats.duplicates += 1
                continue
            seen.add(ex.key)
            out.append(ex)
    stats.kept = len(out)
    return out, stats


def sft_text(question: str, steps: Sequence[str], style: str = "rstar") -> tuple[str, list[tuple[int, int]]]:
    """The training text of a trajectory and the character spans the loss covers.

    The text is exactly what the fine-tuned policy sees and produces: the prompt
    `render_prompt(q, [], few_shot=False)` (question + instruction + `<code>\\n`)
    followed by the generated steps. Loss spans are the policy-written steps; the
    prompt and the system-written `<output>...<end_of_output>` steps are context only.
    """
    prompt = stepfmt.render_prompt(question, [], few_shot=False, style=style)
    full = stepfmt.render_prompt(question, list(steps), few_shot=False, style=style)
    if not full.startswith(prompt):
        raise ValueError("trajectory does not start with the <code> block the prompt opens")
    spans: list[tuple[int, int]] = []
    pos = len(prompt)
    first = True
    for s in steps:
        text = s
        if first:
            if not s.startswith(stepfmt.CODE_START + "\n"):
                raise ValueError("first step must open the <code> block")
            text = s[len(stepfmt.CODE_START) + 1:]
            first = False
        if not s.lstrip().startswith(stepfmt.OUTPUT_START):
            spans.append((pos, pos + len(text)))
        pos += len(text)
    if pos != len(full):
        raise ValueError("internal error: step offsets do not add up")
    return full, spans


# --------------------------------------------------------------------------- PPM pairs


def edit_distance_at_least(a: str, b: str, k: int) -> bool:
    """Whether Levenshtein(a, b) >= k (banded DP with early exit)."""
    if k <= 0:
        return True
    if abs(len(a) - len(b)) >= k:
        return True
    if a == b:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        if min(cur) >= k:
            return True
        prev = cur
    return prev[-1] >= k


@dataclass(frozen=True)
class Pair:
    problem_id: str
    question: str
    pos: tuple[str, ...]      # steps of the preferred prefix (PPM input: render(question, pos))
    neg: tuple[str, ...]
    q_pos: float
    q_neg: float
    group: str                # the step position both share ("<problem>/<node>" or "<problem>/final")
    weight: float
    kind: str                 # "step" or "final"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pos"], d["neg"] = list(self.pos), list(self.neg)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Pair":
        return cls(d["problem_id"], d["question"], tuple(d["pos"]), tuple(d["neg"]), float(d["q_pos"]),
                   float(d["q_neg"]), d["group"], float(d["weight"]), d["kind"])


@dataclass
class PairConfig:
    top_pos: int = 2
    bottom_neg: int = 2
    min_q_margin: float = 0.5
    min_edit_distance: int = 20
    final_pairs: bool = True


@dataclass
class PairStats:
    trees: int = 0
    groups: int = 0
    step_pairs: int = 0
    final_pairs: int = 0
    filtered_margin: int = 0
    filtered_edit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"PPM pairs: {self.step_pairs} step + {self.final_pairs} final from {self.trees} trees "
                f"({self.groups} groups); dropped {self.filtered_margin} (Q margin), {self.filtered_edit} (edit distance)")


def _group_pairs(pid: str, question: str, group: str, kind: str, pos: list[tuple[tuple[str, ...], float, str]],
                 neg: list[tuple[tuple[str, ...], float, str]], cfg: PairConfig, stats: PairStats) -> list[Pair]:
    kept = []
    for p_steps, p_q, p_text in pos:
        for n_steps, n_q, n_text in neg:
            if p_q - n_q < cfg.min_q_margin:
                stats.filtered_margin += 1
                continue
            if not edit_distance_at_least(p_text, n_text, cfg.min_edit_distance):
                stats.filtered_edit += 1
                continue
            kept.append((p_steps, n_steps, p_q, n_q))
    if not kept:
        return []
    stats.groups += 1
    w = 1.0 / len(kept)
    return [Pair(pid, question, ps, ns, pq, nq, group, w, kind) for ps, ns, pq, nq in kept]


def build_pairs(tree: TreeRecord | dict[str, Any], cfg: PairConfig | None = None,
                stats: PairStats | None = None) -> list[Pair]:
    """Preference pairs of one tree (see the module docstring)."""
    cfg = cfg or PairConfig()
    stats = stats if stats is not None else PairStats()
    stats.trees += 1
    tree = TreeRecord.coerce(tree)
    nodes = tree.nodes
    good, bad = _outcomes(tree)
    pid, question = tree.problem_id, tree.question
    out: list[Pair] = []
    for n in nodes:
        kids = [nodes[c] for c in n.children if not nodes[c].is_answer]
        if len(kids) < 2:
            continue
        explored = [k for k in kids if k.visits > 0]
        pos_c = sorted((k for k in explored if good[k.id]), key=lambda k: (-float(k.q), k.id))
        neg_c = sorted((k for k in explored if not good[k.id] and bad[k.id]), key=lambda k: (float(k.q), k.id))
        pos = [(tuple(tree.prefix_steps(k.id)), float(k.q), k.text) for k in pos_c[:cfg.top_pos]]
        neg = [(tuple(tree.prefix_steps(k.id)), float(k.q), k.text) for k in neg_c[:cfg.bottom_neg]]
        got = _group_pairs(pid, question, f"{pid}/{n.id}", "step", pos, neg, cfg, stats)
        stats.step_pairs += len(got)
        out += got
    if cfg.final_pairs:
        trajs = trajectories(tree)
        right = sorted((t for t in trajs if t.correct), key=lambda t: (-t.mean_q, -t.min_q, t.node_id))
        wrong = sorted((t for t in trajs if not t.correct), key=lambda t: (t.mean_q, t.min_q, t.node_id))
        pos = [(t.steps, t.mean_q, "".join(t.steps)) for t in right[:cfg.top_pos]]
        neg = [(t.steps, t.mean_q, "".join(t.steps)) for t in wrong[:cfg.bottom_neg]]
        got = _group_pairs(pid, question, f"{pid}/final", "final", pos, neg, cfg, stats)
        stats.final_pairs += len(got)
        out += got
    return out


def build_all_pairs(trees: Iterable[dict[str, Any]], cfg: PairConfig | None = None) -> tuple[list[Pair], PairStats]:
    stats = PairStats()
    out: list[Pair] = []
    seen: set[tuple] = set()
    for t in trees:
        for p in build_pairs(t, cfg, stats):
            key = (p.question, p.pos, p.neg)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out, stats


def iter_round_trees(store, round_no: int, skipped: list[str] | None = None) -> Iterator[tuple[str, TreeRecord]]:
    """(source, tree) for every tree of a round's complete shards.

    A shard that cannot be read (hash mismatch, missing data, corrupt or too-new
    records) is skipped whole, with a warning, `rstar_trajectory_shard_faults_total
    {op="read"}` and its source appended to `skipped`: one bad shard costs its
    trees, not the stage. A store that cannot be reached still raises (StoreError).
    """
    from rstar import metrics

    for info in traj.list_complete_shards(store, round_no):
        source = f"round-{round_no}/{info.shard}"
        try:
            trees = list(traj.read_shard(store, round_no, info.shard))
        except traj.ShardError as e:
            log.warning("skipping unreadable trajectory shard %s: %s", source, e)
            metrics.TRAJECTORY_SHARD_FAULTS.labels("read").inc()
            if skipped is not None:
                skipped.append(source)
            continue
        for tree in trees:
            yield source, tree
