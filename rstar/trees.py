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
    trajectories/round-<n>/<shard>.manifest.json     written LAST: count, sha256, problem_ids, ...
    trajectories/round-<n>/<shard>.parts/<id>.{jsonl.gz,part.json}   a shard being built (below)
A shard is stored iff its manifest exists and names a present data object; the
store's `put` is atomic, so a crash mid-shard leaves either no data object or a
data object without a manifest, and `list_shards` lists neither. Shards are
written once: `write_shard` is create-only (ShardExists, nothing replaced).
A manifest with `complete: false` is a partial shard (a search stopped by a
limit: it lists which problems are in it and which were never started); it is
readable but `list_complete_shards` leaves it out. Manifests of earlier code
have no such field and count as complete. `read_shard` checks the data against
the manifest's sha256 and raises one ShardError, before the first tree, for
any fault.

`ShardBuilder` builds a shard while its trees finish: each batch is committed
at once as a part (its own data object, then its `.part.json` marker), so a run
killed mid-way keeps every finished tree; a rerun of the same shard gets them
back (`stored()`), and `finish` writes the shard and removes the parts. Parts are
not shards: no listing of shards shows them.

This module knows nothing of gRPC or models, and it does not run searches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from rstar import steps as stepfmt

log = logging.getLogger(__name__)

TREE_SCHEMA = "rstar.tree/1"
MANIFEST_SCHEMA = "rstar.trajectory-shard/1"
PART_SCHEMA = "rstar.trajectory-part/1"
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD_NAME = SHARD_NAME  # earlier name


class ShardError(Exception):
    """A shard is missing, incomplete or does not match its manifest, or a record is malformed."""


class ShardExists(ShardError):
    """A shard of that name is already stored; shards are written once, never replaced."""


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


def parts_prefix(round_no: int, shard: str) -> str:
    """Where a shard being built keeps its committed parts (`<shard>.parts/`)."""
    return shard_key(round_no, shard)[: -len(".jsonl.gz")] + ".parts/"


@dataclass(frozen=True)
class ShardInfo:
    round: int
    shard: str
    key: str
    manifest: dict[str, Any]

    @property
    def complete(self) -> bool:
        """Every requested problem is in it, fully searched (manifests without the field: legacy, complete)."""
        return self.manifest.get("complete") is not False


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


def _records(trees: Iterable[TreeRecord | dict[str, Any]]) -> list[dict[str, Any]]:
    return [t.to_dict() if isinstance(t, TreeRecord) else t for t in trees]


def _dump(d: dict[str, Any]) -> bytes:
    return json.dumps(d, indent=1, sort_keys=True).encode()


def write_shard(store, round_no: int, shard: str, trees: Iterable[TreeRecord | dict[str, Any]],
                metadata: dict[str, Any] | None = None) -> ShardInfo:
    """Create a shard: the trees as one data object, then its manifest (the completion marker).

    Create-only: a stored manifest of that name raises ShardExists and nothing
    is written. The data goes to `<shard>.jsonl.gz`, or, when that name is held
    by the leftover of a dead write or by a concurrent writer, to
    `<shard>.<write id>.jsonl.gz`; the manifest names its own data object and
    hash, so a reader never pairs one writer's manifest with another's data.
    The manifest lists the problems in the shard (`problem_ids`).
    """
    from rstar.store import AlreadyExists

    mkey = manifest_key(round_no, shard)
    if store.exists(mkey):
        raise ShardExists(f"shard {shard!r} of round {round_no} is already stored (shards are written once)")
    records = _records(trees)
    data, count = encode_trees(records)
    write_id = secrets.token_hex(6)
    key = shard_key(round_no, shard)
    try:
        store.put(key, data, create_only=True)
    except AlreadyExists:
        key = f"{shard_prefix(round_no)}{shard}.{write_id}.jsonl.gz"
        store.put(key, data, create_only=True)
    manifest = {
        "problem_ids": [str(r.get("problem_id", "")) for r in records],
        "created": time.time(),
        **(metadata or {}),
        # the format's own fields come last: metadata cannot forge them
        "schema": MANIFEST_SCHEMA,
        "tree_schema": TREE_SCHEMA,
        "round": int(round_no),
        "shard": shard,
        "data_key": key,
        "trees": count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "write_id": write_id,
    }
    try:
        store.put(mkey, _dump(manifest), create_only=True)
    except AlreadyExists:
        # our own earlier attempt whose reply was lost counts as success; anyone else's is a refusal
        if _stored_write_id(store, mkey) != write_id:
            with contextlib.suppress(Exception):
                store.delete(key)
            raise ShardExists(f"shard {shard!r} of round {round_no} was stored by another writer meanwhile") from None
    return ShardInfo(round=int(round_no), shard=shard, key=key, manifest=manifest)


def _stored_write_id(store, key: str) -> str | None:
    try:
        return json.loads(store.get(key)).get("write_id")
    except Exception:  # noqa: BLE001 - unreadable counts as "not ours"
        return None


def read_manifest(store, round_no: int, shard: str) -> dict[str, Any]:
    from rstar.store import NotFound

    try:
        raw = store.get(manifest_key(round_no, shard))
    except NotFound as e:
        raise ShardError(f"shard {shard!r} of round {round_no} has no manifest (incomplete or absent)") from e
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"shard {shard!r} of round {round_no}: manifest is not JSON") from e
    if not isinstance(m, dict) or not str(m.get("schema", "")).startswith("rstar.trajectory-shard/"):
        raise ShardError(f"bad manifest schema {m.get('schema') if isinstance(m, dict) else m!r}")
    return m


def _decode(data: bytes, what: str) -> list[TreeRecord]:
    """Every tree of a data object; any corruption (gzip, JSON, record) is a ShardError."""
    out: list[TreeRecord] = []
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            for line in gz:
                if line.strip():
                    out.append(TreeRecord.from_dict(json.loads(line)))
    except ShardError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, TypeError) as e:
        raise ShardError(f"{what}: unreadable data ({type(e).__name__}: {e})") from e
    return out


def _checked_data(store, manifest: dict[str, Any], round_no: int, what: str) -> list[TreeRecord]:
    from rstar.store import NotFound

    key = manifest.get("data_key")
    if not isinstance(key, str) or not key.startswith(shard_prefix(round_no)):
        raise ShardError(f"{what}: manifest names data {key!r} outside round {round_no}")
    try:
        data = store.get(key)
    except NotFound as e:
        raise ShardError(f"{what}: manifest present but data {key} missing") from e
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ShardError(f"{what}: data does not match the manifest's sha256")
    trees = _decode(data, what)
    if len(trees) != manifest.get("trees"):
        raise ShardError(f"{what}: {len(trees)} trees, manifest says {manifest.get('trees')}")
    return trees


def read_shard(store, round_no: int, shard: str) -> Iterator[TreeRecord]:
    """The trees of a stored shard as records, checked against its manifest.

    Everything is checked before the first tree is yielded, so a caller never
    gets part of a bad shard: any fault is one ShardError up front.
    """
    manifest = read_manifest(store, round_no, shard)
    yield from _checked_data(store, manifest, round_no, f"shard {shard!r}")


def list_shards(store, round_no: int) -> list[ShardInfo]:
    """Shards of a round whose manifest and data are both present, sorted by name, partial ones included."""
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


def list_complete_shards(store, round_no: int) -> list[ShardInfo]:
    """Complete shards of a round (manifest and data present, not marked `complete: false`), sorted."""
    return [i for i in list_shards(store, round_no) if i.complete]


# --- shards built as their trees finish ---


def write_part(store, round_no: int, shard: str, trees: Iterable[TreeRecord | dict[str, Any]],
               metadata: dict[str, Any] | None = None) -> str:
    """Store finished trees of a shard still being built: data, then the part's marker. Returns the marker key."""
    prefix = parts_prefix(round_no, shard)
    part = f"{time.time_ns():020d}-{secrets.token_hex(4)}"   # sorts by time, unique across writers
    records = _records(trees)
    data, count = encode_trees(records)
    key = f"{prefix}{part}.jsonl.gz"
    store.put(key, data, create_only=True)
    marker = {**(metadata or {}), "schema": PART_SCHEMA, "tree_schema": TREE_SCHEMA, "round": int(round_no),
              "shard": shard, "data_key": key, "trees": count, "sha256": hashlib.sha256(data).hexdigest(),
              "problem_ids": [str(r.get("problem_id", "")) for r in records], "created": time.time()}
    mkey = f"{prefix}{part}.part.json"
    store.put(mkey, _dump(marker), create_only=True)
    return mkey


def read_parts(store, round_no: int, shard: str) -> list[TreeRecord]:
    """The trees of a shard's committed parts, oldest first; a part that fails its checks is skipped (logged)."""
    prefix = parts_prefix(round_no, shard)
    out: list[TreeRecord] = []
    for k in store.list(prefix):
        if not k.endswith(".part.json"):
            continue
        try:
            marker = json.loads(store.get(k))
            if not isinstance(marker, dict) or not str(marker.get("schema", "")).startswith("rstar.trajectory-part/"):
                raise ShardError("not a part marker")
            out += _checked_data(store, marker, round_no, f"part {k}")
        except (ShardError, ValueError, KeyError) as e:
            log.warning("ignoring part %s of shard %r: %s", k, shard, e)
    return out


def delete_parts(store, round_no: int, shard: str) -> None:
    for k in store.list(parts_prefix(round_no, shard)):
        store.delete(k)


class ShardBuilder:
    """Builds one shard while its trees finish, so a run killed at any point keeps its finished trees.

    `add` stores each batch of finished trees at once as a part (a data object
    and its marker under `<shard>.parts/`, invisible to `list_complete_shards`).
    `stored()` gives a rerun the trees of an earlier run's parts, so it searches
    only the rest. `finish` writes the shard (create-only) from all the trees and
    then removes the parts. A part that cannot be written (store down) is kept
    in memory and retried with the next `add` or at `finish`; the failure is
    logged and counted (`rstar_trajectory_shard_faults_total{op="write_part"}`).
    """

    def __init__(self, store, round_no: int, shard: str):
        shard_key(round_no, shard)   # validates the name
        if store.exists(manifest_key(round_no, shard)):
            raise ShardExists(f"shard {shard!r} of round {round_no} is already stored (shards are written once)")
        self.store, self.round, self.shard = store, int(round_no), shard
        self._pending: list[dict[str, Any]] = []

    def stored(self) -> list[TreeRecord]:
        return read_parts(self.store, self.round, self.shard)

    def add(self, trees: Iterable[TreeRecord | dict[str, Any]]) -> bool:
        """Store finished trees (with any earlier batch that failed); False if the store refused for now."""
        from rstar import metrics
        from rstar.store import StoreError

        batch = self._pending + _records(trees)
        if not batch:
            return True
        try:
            write_part(self.store, self.round, self.shard, batch)
        except StoreError as e:
            self._pending = batch
            metrics.TRAJECTORY_SHARD_FAULTS.labels("write_part").inc()
            log.warning("shard %r of round %d: %d finished trees not stored yet (%s); retrying with the next part",
                        self.shard, self.round, len(batch), e)
            return False
        self._pending = []
        return True

    def finish(self, trees: Iterable[TreeRecord | dict[str, Any]], metadata: dict[str, Any] | None = None) -> ShardInfo:
        """Write the shard from every tree (in order), then drop the parts it supersedes."""
        from rstar.store import StoreError

        info = write_shard(self.store, self.round, self.shard, trees, metadata)
        self._pending = []
        try:
            delete_parts(self.store, self.round, self.shard)
        except StoreError as e:   # leftovers are harmless: a stored shard is never rebuilt from parts
            log.warning("shard %r of round %d stored; its parts were not all removed: %s", self.shard, self.round, e)
        return info
