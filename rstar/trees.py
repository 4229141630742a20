"""Search trees as stored records, and the trajectory store of schema-versioned shards.

Records (`TreeRecord`, `NodeRecord`): the one typed form of a search tree outside
the engine. The search core (`TreeRecord.from_search_tree`), the GSM8K bootstrap
(`trainer.bootstrap`) and hand-built tests create them; the trainer reads them.
Tree schema (`TREE_SCHEMA`): a flat node list in creation order, node 0 = root
(the question), each node with its parent id; `TreeRecord.prefix_steps(id)`
rebuilds what the models saw with the one prefix rule (`rstar.steps.steps_added`).
Reading is tolerant of records written by earlier code (missing optional fields
take their defaults; unknown fields are kept in `extra` and written back) and
refuses a newer schema.

Layout in the object store (`rstar.store`):
    trajectories/round-<n>/<shard>.jsonl.gz          one tree per line
    trajectories/round-<n>/<shard>.manifest.json     written LAST: count, sha256, schema, ...
A shard is complete iff its manifest exists and names the data object; the
store's `put` is atomic, so a crash mid-shard leaves either no data object or a
data object without a manifest, and `list_complete_shards` lists neither.
`read_shard` checks the data against the manifest's sha256.

This module knows nothing of gRPC or models, and it does not run searches.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from rstar import steps as stepfmt

TREE_SCHEMA = "rstar.tree/1"
MANIFEST_SCHEMA = "rstar.trajectory-shard/1"
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD_NAME = SHARD_NAME  # earlier name


class ShardError(Exception):
    """A shard is missing, incomplete or does not match its manifest, or a record is malformed."""


# --- records ---


@dataclass
class NodeRecord:
    """One stored node: the step, how it was verified, and its MCTS statistics."""

    id: int
    parent: int | None
    depth: int = 0
    text: str = ""                  # the step as generated (normalised), markers included
    code: str = ""                  # python of this step
    output: str = ""                # stdout of the program that verified it
    ends_code: bool = False         # closes the code block (its output follows in the prefix)
    failure: str = ""               # "" or why the step failed
    finish_reason: str = "stop"
    num_tokens: int = 0
    visits: int = 0                 # N
    value_sum: float = 0.0          # W
    q: float = 0.0                  # W / N
    ppm_score: float | None = None
    terminal: bool = False
    answer: str | None = None       # the \boxed{} content of an answer step
    correct: bool | None = None     # against the gold answer, where one was known
    children: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_answer(self) -> bool:
        return self.answer is not None

    def own_steps(self) -> tuple[str, ...]:
        """What this node adds to its children's prefix (the root adds nothing)."""
        if self.parent is None:
            return ()
        return stepfmt.steps_added(self.text, self.output, ends_code=self.ends_code, failed=bool(self.failure),
                                   is_answer=self.is_answer)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["children"] = list(self.children)
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeRecord:
        if not isinstance(d, dict) or "id" not in d or "parent" not in d:
            raise ShardError(f"not a node record: {str(d)[:120]}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        kw["children"] = [int(c) for c in d.get("children") or ()]
        if "q" not in d and kw.get("visits"):
            kw["q"] = float(kw.get("value_sum", 0.0)) / kw["visits"]
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})


@dataclass
class TreeRecord:
    """One stored search tree: the problem, the settings, the nodes (node 0 is the root)."""

    question: str
    nodes: list[NodeRecord]
    problem_id: str = ""
    gold: str | None = None
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    rollouts_done: int = 0
    solved: bool = False
    model_versions: dict[str, str] = field(default_factory=dict)
    schema: str = TREE_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. round, source, stop reason

    def node(self, node_id: int) -> NodeRecord:
        return self.nodes[node_id]

    def path_ids(self, node_id: int) -> list[int]:
        """Node ids from the first step to `node_id` (root excluded)."""
        out: list[int] = []
        cur: int | None = node_id
        while cur is not None and self.nodes[cur].parent is not None:
            out.append(cur)
            cur = self.nodes[cur].parent
        return out[::-1]

    def prefix_steps(self, node_id: int) -> list[str]:
        """The steps from the root through node `node_id`: the PPM/policy prefix of that node."""
        return [s for i in self.path_ids(node_id) for s in self.nodes[i].own_steps()]

    def answer_nodes(self) -> list[NodeRecord]:
        return [n for n in self.nodes if n.is_answer and not n.failure]

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": self.schema, "problem_id": self.problem_id, "question": self.question, "gold": self.gold,
             "seed": self.seed, "settings": dict(self.settings), "rollouts_done": self.rollouts_done,
             "solved": self.solved, "model_versions": dict(self.model_versions),
             "nodes": [n.to_dict() for n in self.nodes]}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TreeRecord:
        check_tree(d)
        if not isinstance(d.get("nodes"), list) or not d["nodes"] or "question" not in d:
            raise ShardError("tree record without question or nodes")
        nodes = [NodeRecord.from_dict(n) for n in d["nodes"]]
        for i, n in enumerate(nodes):
            if n.id != i or (n.parent is not None and not 0 <= n.parent < len(nodes)):
                raise ShardError(f"tree {d.get('problem_id')!r}: node {i} has id {n.id} / parent {n.parent}")
        known = {"schema", "problem_id", "question", "gold", "seed", "settings", "rollouts_done", "solved",
                 "model_versions", "nodes"}
        return cls(question=d["question"], nodes=nodes, problem_id=str(d.get("problem_id", "")), gold=d.get("gold"),
                   seed=int(d.get("seed") or 0), settings=dict(d.get("settings") or {}),
                   rollouts_done=int(d.get("rollouts_done") or 0),
                   solved=bool(d.get("solved", any(n.correct for n in nodes))),
                   model_versions=dict(d.get("model_versions") or {}), schema=d["schema"],
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def coerce(cls, tree: TreeRecord | dict[str, Any]) -> TreeRecord:
        return tree if isinstance(tree, TreeRecord) else cls.from_dict(tree)

    @classmethod
    def from_search_tree(cls, tree, model_versions: dict[str, str] | None = None,
                         extra: dict[str, Any] | None = None) -> TreeRecord:
        """The record of an engine tree (`rstar.search.mcts.Tree`)."""
        s = tree.settings
        nodes = [NodeRecord(
            id=n.id, parent=n.parent.id if n.parent is not None else None, depth=n.depth, text=n.text, code=n.code,
            output=n.output, ends_code=n.ends_code, failure=n.failure, finish_reason=n.finish_reason,
            num_tokens=n.num_tokens, visits=n.N, value_sum=n.W, q=n.Q, ppm_score=n.ppm_score, terminal=n.terminal,
            answer=n.answer, correct=n.correct, children=[c.id for c in n.children]) for n in tree.nodes]
        return cls(question=tree.question, nodes=nodes, problem_id=tree.problem_id, gold=tree.gold, seed=tree.seed,
                   settings={"rollouts": s.rollouts, "k": s.k, "max_depth": s.max_depth, "c": s.c,
                             "annotation": s.annotation, "keep_one_answer": s.keep_one_answer},
                   rollouts_done=tree.rollouts_done, solved=any(n.correct for n in tree.nodes),
                   model_versions=dict(model_versions or {}), extra=dict(extra or {}))


def tree_to_dict(tree, model_versions: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stored dict of an engine tree (= `TreeRecord.from_search_tree(...).to_dict()`)."""
    return TreeRecord.from_search_tree(tree, model_versions, extra).to_dict()


def check_tree(d: dict[str, Any]) -> dict[str, Any]:
    """`d` is a tree record of a schema this reader understands (else ShardError)."""
    schema = d.get("schema", "") if isinstance(d, dict) else ""
    if not isinstance(schema, str) or not re.fullmatch(r"rstar\.tree/\d+", schema):
        raise ShardError(f"not a tree record (schema {schema!r})")
    if int(schema.split("/")[1]) > int(TREE_SCHEMA.split("/")[1]):
        raise ShardError(f"tree schema {schema} is newer than this reader ({TREE_SCHEMA})")
    return d


def prefix_steps(tree: TreeRecord | dict[str, Any], node_id: int) -> list[str]:
    """The steps from the root through node `node_id` (the PPM/policy prefix of that node)."""
    return TreeRecord.coerce(tree).prefix_steps(node_id)


# --- shards ---


def shard_prefix(round_no: int) -> str:
    return f"trajectories/round-{int(round_no)}/"


def shard_key(round_no: int, shard: str) -> str:
    if not SHARD_NAME.match(shard):
        raise ValueError(f"invalid shard name {shard!r} (letters, digits, '.', '_', '-')")
    return f"{shard_prefix(round_no)}{shard}.jsonl.gz"


def manifest_key(round_no: int, shard: str) -> str:
    return shard_key(round_no, shard)[: -len(".jsonl.gz")] + ".manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    round: int
    shard: str
    key: str
    manifest: dict[str, Any]


def encode_trees(trees: Iterable[TreeRecord | dict[str, Any]]) -> tuple[bytes, int]:
    buf = io.BytesIO()
    count = 0
    # mtime=0: the same trees always give the same bytes (and sha256)
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for t in trees:
            if isinstance(t, TreeRecord):
                t = t.to_dict()
            gz.write(json.dumps(t, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            count += 1
    return buf.getvalue(), count


def write_shard(store, round_no: int, shard: str, trees: Iterable[TreeRecord | dict[str, Any]],
                metadata: dict[str, Any] | None = None) -> ShardInfo:
    """Write the trees as one shard, then its manifest (the completion marker)."""
    key = shard_key(round_no, shard)
    data, count = encode_trees(trees)
    store.put(key, data)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "tree_schema": TREE_SCHEMA,
        "round": int(round_no),
        "shard": shard,
        "data_key": key,
        "trees": count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": time.time(),
        **(metadata or {}),
    }
    store.put(manifest_key(round_no, shard), json.dumps(manifest, indent=1, sort_keys=True).encode())
    return ShardInfo(round=int(round_no), shard=shard, key=key, manifest=manifest)


def read_manifest(store, round_no: int, shard: str) -> dict[str, Any]:
    from rstar.store import NotFound

    try:
        m = json.loads(store.get(manifest_key(round_no, shard)))
    except NotFound as e:
        raise ShardError(f"shard {shard!r} of round {round_no} has no manifest (incomplete or absent)") from e
    if not str(m.get("schema", "")).startswith("rstar.trajectory-shard/"):
        raise ShardError(f"bad manifest schema {m.get('schema')!r}")
    return m


def read_shard(store, round_no: int, shard: str) -> Iterator[TreeRecord]:
    """The trees of a complete shard as records, checked against its manifest."""
    from rstar.store import NotFound

    manifest = read_manifest(store, round_no, shard)
    try:
        data = store.get(manifest["data_key"])
    except NotFound as e:
        raise ShardError(f"shard {shard!r}: manifest present but data {manifest['data_key']} missing") from e
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ShardError(f"shard {shard!r}: data does not match the manifest's sha256")
    n = 0
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
        for line in gz:
            if line.strip():
                n += 1
                yield TreeRecord.from_dict(json.loads(line))
    if n != manifest["trees"]:
        raise ShardError(f"shard {shard!r}: {n} trees, manifest says {manifest['trees']}")


def list_complete_shards(store, round_no: int) -> list[ShardInfo]:
    """Shards of a round whose manifest and data are both present, sorted by name."""
    prefix = shard_prefix(round_no)
    keys = set(store.list(prefix))
    out = []
    for k in sorted(keys):
        if not k.endswith(".manifest.json"):
            continue
        shard = k[len(prefix): -len(".manifest.json")]
        try:
            m = read_manifest(store, round_no, shard)
        except (ShardError, ValueError):
            continue
        if m.get("data_key") in keys:
            out.append(ShardInfo(round=int(round_no), shard=shard, key=m["data_key"], manifest=m))
    return out
