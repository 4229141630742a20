"""The trajectory store: synthesis trees as schema-versioned gzip JSON Lines shards.

Layout in the object store (`rstar.store`):
    trajectories/round-<n>/<shard>.jsonl.gz          one tree per line
    trajectories/round-<n>/<shard>.manifest.json     written LAST: count, sha256, schema, ...
A shard is complete iff its manifest exists and names the data object; the
store's `put` is atomic, so a crash mid-shard leaves either no data object or a
data object without a manifest, and `list_complete_shards` lists neither.
`read_shard` checks the data against the manifest's sha256.

This is the reader API the trainer uses; it knows nothing of gRPC or models.
Tree schema (`TREE_SCHEMA`): a flat node list in creation order, node 0 = root
(the question), each node with its parent id, so prefixes are rebuilt with
`prefix_steps`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from rstar import steps as stepfmt
from rstar.search.mcts import Node, Tree

TREE_SCHEMA = "rstar.tree/1"
MANIFEST_SCHEMA = "rstar.trajectory-shard/1"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ShardError(Exception):
    """A shard is missing, incomplete or does not match its manifest."""


def node_to_dict(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "parent": node.parent.id if node.parent is not None else None,
        "depth": node.depth,
        "text": node.text,
        "code": node.code,
        "output": node.output,
        "ends_code": node.ends_code,
        "failure": node.failure,
        "finish_reason": node.finish_reason,
        "num_tokens": node.num_tokens,
        "visits": node.N,
        "value_sum": node.W,
        "q": node.Q,
        "ppm_score": node.ppm_score,
        "terminal": node.terminal,
        "answer": node.answer,
        "correct": node.correct,
        "children": [c.id for c in node.children],
    }


def tree_to_dict(tree: Tree, model_versions: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    s = tree.settings
    d = {
        "schema": TREE_SCHEMA,
        "problem_id": tree.problem_id,
        "question": tree.question,
        "gold": tree.gold,
        "seed": tree.seed,
        "settings": {"rollouts": s.rollouts, "k": s.k, "max_depth": s.max_depth, "c": s.c,
                     "annotation": s.annotation, "keep_one_answer": s.keep_one_answer},
        "rollouts_done": tree.rollouts_done,
        "solved": any(n.correct for n in tree.nodes),
        "model_versions": dict(model_versions or {}),
        "nodes": [node_to_dict(n) for n in tree.nodes],
    }
    if extra:
        d.update(extra)
    return d


def check_tree(d: dict[str, Any]) -> dict[str, Any]:
    schema = d.get("schema", "")
    if not isinstance(schema, str) or not schema.startswith("rstar.tree/"):
        raise ShardError(f"not a tree record (schema {schema!r})")
    if int(schema.split("/")[1]) > int(TREE_SCHEMA.split("/")[1]):
        raise ShardError(f"tree schema {schema} is newer than this reader ({TREE_SCHEMA})")
    return d


def node_steps(node: dict[str, Any]) -> list[str]:
    """What a stored node adds to its children's prefix (its text, then the output step after a code block)."""
    if node["parent"] is None:
        return []
    if node["ends_code"] and not node["failure"] and node["answer"] is None:
        return [node["text"], stepfmt.output_step(node["output"])]
    return [node["text"]]


def prefix_steps(tree: dict[str, Any], node_id: int) -> list[str]:
    """The steps from the root through node `node_id` (the PPM/policy prefix of that node)."""
    nodes = tree["nodes"]
    chain = []
    cur: int | None = node_id
    while cur is not None:
        chain.append(nodes[cur])
        cur = nodes[cur]["parent"]
    return [s for n in reversed(chain) for s in node_steps(n)]


# --- shards ---


def shard_prefix(round_no: int) -> str:
    return f"trajectories/round-{int(round_no)}/"


def shard_key(round_no: int, shard: str) -> str:
    if not _SHARD_NAME.match(shard):
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


def encode_trees(trees: Iterable[dict[str, Any]]) -> tuple[bytes, int]:
    buf = io.BytesIO()
    count = 0
    # mtime=0: the same trees always give the same bytes (and sha256)
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for t in trees:
            gz.write(json.dumps(t, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            count += 1
    return buf.getvalue(), count


def write_shard(store, round_no: int, shard: str, trees: Iterable[dict[str, Any]],
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


def read_shard(store, round_no: int, shard: str) -> Iterator[dict[str, Any]]:
    """The trees of a complete shard, checked against its manifest."""
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
                yield check_tree(json.loads(line))
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
