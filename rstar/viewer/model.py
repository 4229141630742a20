"""The viewer's data: one search as the page's JSON (`VIEW_SCHEMA`), from a stored tree or a solve result.

`view_of_tree(TreeRecord)` shows the whole tree: every node with its step text, code,
real program output, Q, N, PPM score, terminal kind and failure reason; the chosen
path is the one the search's default strategy (top PPM) would pick from it, and the
answer alternatives are grouped the way the search groups them
(`rstar.search.selection.group_answers`). `view_of_result(SolveResult)` shows what a
SolveResponse carries: the finished trajectories and the chosen one merged into one
tree by shared prefix (a response does not carry the unfinished branches, so the
view says `complete: false` and keeps `stats.nodes`, the size of the searched tree).

Also here, so that one module owns the format: the saved last solve
(`$RSTAR_HOME/last-solve.json`, written by `rstar solve`, read by `rstar view`) and
the reference of a stored tree (`trajectories/round-<n>/<shard>#<problem id>`).

Not here: HTTP (`rstar.viewer.http`), the page itself (`page.html`, `viewer.js`,
`viewer.css`), reading the store beyond `load_stored_tree`, running searches.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from rstar import trees as tj
from rstar.search import selection

VIEW_SCHEMA = "rstar.view/1"
SAVED_SOLVE_SCHEMA = "rstar.saved-solve/1"
LAST_SOLVE_FILE = "last-solve.json"

# terminal kinds (as `rstar.client.Step.terminal_kind`): an answer; a failed step; a step whose every
# continuation failed; an inner step whose every continuation is terminal (fully explored)
ANSWER, FAILURE, DEAD_END, EXHAUSTED = "answer", "failure", "dead_end", "exhausted"

# why a step failed, for people (the names are the search's failure kinds)
FAILURE_REASONS = {
    "error": "the program raised an error",
    "timeout": "the program ran out of time",
    "memory": "the program ran out of memory",
    "killed": "the program was killed",
    "output_limit": "the program printed too much",
    "error_output": "the program's output mentions an error",
    "depth": "depth limit reached without an answer",
    "length": "cut off at the token limit",
    "empty": "empty step",
    "incomplete": "the step does not end with a step marker",
    "unboxed_answer": "an answer without \\boxed{}",
    "answer_in_code": "an answer inside a code block",
}

_REF = re.compile(r"^(?:trajectories/)?round-(\d+)/([^#/]+?)(?:\.jsonl\.gz)?(?:#(.*))?$")


# ---------------------------------------------------------------- nodes


def _node(id_: int, parent: int | None, depth: int, *, text: str = "", code: str = "", output: str = "",
          q: float = 0.0, visits: int = 0, ppm: float | None = None, kind: str = "", failure: str = "",
          answer: str | None = None, correct: bool | None = None, tokens: int = 0,
          finish_reason: str = "") -> dict[str, Any]:
    return {"id": id_, "parent": parent, "depth": depth, "children": [], "text": text, "code": code,
            "output": output, "q": q, "n": visits, "ppm": ppm, "terminal": kind, "failure": failure,
            "why": FAILURE_REASONS.get(failure, "") if failure else "", "answer": answer, "correct": correct,
            "tokens": tokens, "finish_reason": finish_reason}


def terminal_kind(tree: tj.TreeRecord, node: tj.NodeRecord, reaches_answer: set[int]) -> str:
    if node.failure:
        return FAILURE
    if node.is_answer:
        return ANSWER
    if node.terminal and node.parent is not None:
        return EXHAUSTED if node.id in reaches_answer else DEAD_END
    return ""


def _reaching_answer(tree: tj.TreeRecord) -> set[int]:
    """Ids of the nodes with a finished answer at or below them."""
    out: set[int] = set()
    for a in tree.answer_nodes():
        cur: int | None = a.id
        while cur is not None and cur not in out:
            out.add(cur)
            cur = tree.nodes[cur].parent
    return out


def _final_score(node: tj.NodeRecord) -> float:
    # as `selection.final_score`: the PPM score, else (terminal-guided synthesis) the terminal value
    return float(node.ppm_score) if node.ppm_score is not None else node.q


def _best_partial(tree: tj.TreeRecord) -> int:
    """As `selection.best_partial`: without an answer, follow the highest-Q non-failed child."""
    node = tree.nodes[0]
    while True:
        kids = [tree.nodes[c] for c in node.children]
        options = [c for c in kids if not c.failure]
        if not options:
            if kids:
                node = max(kids, key=lambda c: c.ppm_score if c.ppm_score is not None else -2.0)
            return node.id
        node = max(options, key=lambda c: (c.q, c.ppm_score if c.ppm_score is not None else -2.0))


# ---------------------------------------------------------------- a stored tree


def view_of_tree(tree: tj.TreeRecord | dict[str, Any], *, source: str = "") -> dict[str, Any]:
    """The page JSON of a whole stored tree."""
    tree = tj.TreeRecord.coerce(tree)
    reach = _reaching_answer(tree)
    nodes = [_node(n.id, n.parent, n.depth, text=n.text if n.parent is not None else tree.question, code=n.code,
                   output=n.output, q=n.q, visits=n.visits, ppm=n.ppm_score, kind=terminal_kind(tree, n, reach),
                   failure=n.failure, answer=n.answer, correct=n.correct, tokens=n.num_tokens,
                   finish_reason=n.finish_reason if n.parent is not None else "")
             for n in tree.nodes]
    for v, n in zip(nodes, tree.nodes):
        v["children"] = list(n.children)
    # every non-failed answer node is one finished trajectory, grouped as the search groups them
    trajs = sorted((selection.Trajectory(steps=[n], answer=n.answer or "", final_score=_final_score(n),
                                         mean_q=0.0, seed=tree.seed) for n in tree.answer_nodes()),
                   key=lambda t: -t.final_score)
    groups = sorted(selection.group_answers(trajs), key=lambda g: (g.best_score, g.votes), reverse=True)
    if groups:
        best = max(groups[0].trajectories, key=lambda t: t.final_score)
        chosen_end, answer = best.steps[0].id, groups[0].answer
    else:
        chosen_end, answer = _best_partial(tree), ""
    chosen = [0] + tree.path_ids(chosen_end) if chosen_end else [0]
    alternatives = [{"answer": g.answer, "votes": g.votes, "best_score": g.best_score,
                     "weighted_score": g.weighted_score, "chosen": i == 0,
                     "correct": next((n.correct for t in g.trajectories for n in t.steps
                                      if n.correct is not None), None)} for i, g in enumerate(groups)]
    stats = {"nodes": len(tree.nodes) - 1, "rollouts": tree.rollouts_done,
             "generated_tokens": sum(n.num_tokens for n in tree.nodes),
             "answers": len(trajs), "failed": sum(1 for n in tree.nodes if n.failure)}
    for k in ("stop_reason", "round", "source"):
        if k in tree.extra:
            stats[k] = tree.extra[k]
    return {"schema": VIEW_SCHEMA, "kind": "tree", "source": source or tree.problem_id,
            "title": tree.problem_id or "search tree", "question": tree.question, "gold": tree.gold,
            "answer": answer, "solved": tree.solved, "seed": tree.seed, "complete": True,
            "strategy": selection.TOP_PPM, "nodes": nodes, "chosen": chosen, "alternatives": alternatives,
            "stats": stats, "times": None, "settings": dict(tree.settings),
            "model_versions": dict(tree.model_versions), "live": None}


# ---------------------------------------------------------------- a solve result


def view_of_result(result, *, problem: str = "", source: str = "", live: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The page JSON of a `rstar.client.SolveResult` (None while a live search has no result yet):
    its trajectories merged into one tree by shared prefix (per tree seed)."""
    nodes = [_node(0, None, 0, text=problem)]
    index: dict[tuple, int] = {}

    def add_path(seed: int, steps: Iterable) -> list[int]:
        key: tuple = (seed,)
        ids, parent = [0], 0
        for depth, s in enumerate(steps, 1):
            key = key + (s.text,)
            nid = index.get(key)
            if nid is None:
                nid = index[key] = len(nodes)
                nodes.append(_node(nid, parent, depth, text=s.text, code=s.code, output=s.output, q=s.q,
                                   visits=s.visits, ppm=s.ppm_score, kind=s.terminal_kind, failure=s.failure,
                                   answer=s.answer))
                nodes[parent]["children"].append(nid)
            elif s.terminal_kind and not nodes[nid]["terminal"]:
                nodes[nid]["terminal"] = s.terminal_kind
            ids.append(nid)
            parent = nid
        return ids

    chosen: list[int] = [0]
    if result is not None:
        for t in result.trajectories:
            add_path(t.seed, t.steps)
        chosen = add_path(result.seed, result.trajectory)
    view = {"schema": VIEW_SCHEMA, "kind": "solve", "source": source, "title": "solve",
            "question": problem, "gold": None, "answer": result.answer if result else "", "solved": None,
            "seed": result.seed if result else 0, "complete": False,
            "strategy": result.strategy if result else "", "nodes": nodes, "chosen": chosen,
            "alternatives": [], "stats": {}, "times": None, "settings": {}, "model_versions": {}, "live": live}
    if result is not None:
        view["alternatives"] = [{**a.to_dict(), "chosen": a.answer == result.answer, "correct": None}
                                for a in result.alternatives]
        stats = result.stats.to_dict()
        view["times"] = stats.pop("times")
        view["stats"] = stats
        view["model_versions"] = dict(result.model_versions)
    return view


# ---------------------------------------------------------------- the saved last solve


def last_solve_path(home: Path | None = None) -> Path:
    from rstar.config import home_dir

    return (home or home_dir()) / LAST_SOLVE_FILE


def save_solve(path: Path, result, problem: str, address: str = "") -> Path:
    """Write a solve (its SolveResponse as protobuf JSON, the problem, when) atomically to `path`."""
    from google.protobuf import json_format

    doc = {"schema": SAVED_SOLVE_SCHEMA, "problem": problem, "address": address, "saved_at": time.time(),
           "response": json_format.MessageToDict(result.raw, preserving_proto_field_name=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False))
    os.replace(tmp, path)   # a reader never sees half a file
    return path


def load_solve(path: Path):
    """(SolveResult, problem) of a file `save_solve` wrote."""
    from google.protobuf import json_format

    from rstar.client import SolveResult
    from rstar.v1 import search_pb2

    doc = json.loads(Path(path).read_text())
    schema = doc.get("schema", "") if isinstance(doc, dict) else ""
    if not str(schema).startswith("rstar.saved-solve/"):
        raise ValueError(f"{path}: not a saved solve (schema {schema!r})")
    if int(str(schema).split("/")[1]) > int(SAVED_SOLVE_SCHEMA.split("/")[1]):
        raise ValueError(f"{path}: saved-solve schema {schema} is newer than this reader")
    resp = json_format.ParseDict(doc["response"], search_pb2.SolveResponse(), ignore_unknown_fields=True)
    return SolveResult.from_proto(resp), str(doc.get("problem", ""))


# ---------------------------------------------------------------- stored trees


def parse_tree_ref(ref: str) -> tuple[int, str, str | None]:
    """`trajectories/round-2/<shard>#<problem id>` (prefix and `.jsonl.gz` optional) -> (2, shard, id or None)."""
    m = _REF.match(ref.strip())
    if not m:
        raise ValueError(f"not a stored-tree reference: {ref!r} (expected trajectories/round-<n>/<shard>#<problem id>)")
    round_no, shard, pid = int(m.group(1)), m.group(2), m.group(3)
    tj.shard_key(round_no, shard)   # validates the shard name
    return round_no, shard, pid or None


def load_stored_tree(store, round_no: int, shard: str, problem_id: str | None) -> tj.TreeRecord:
    """The tree of `problem_id` in a complete shard (the first tree when None); LookupError if absent."""
    ids = []
    for tree in tj.read_shard(store, round_no, shard):
        if problem_id is None or tree.problem_id == problem_id:
            return tree
        ids.append(tree.problem_id)
    shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
    raise LookupError(f"no problem {problem_id!r} in round-{round_no}/{shard} (it has: {shown or 'no trees'})")


def store_index(store, round_no: int | None = None, shard: str | None = None) -> dict[str, Any]:
    """The page JSON of a listing: the complete shards of every round, or the problems of one shard."""
    entries: list[dict[str, Any]] = []
    if shard is not None and round_no is not None:
        for tree in tj.read_shard(store, round_no, shard):
            entries.append({"label": tree.problem_id, "ref": f"round-{round_no}/{shard}#{tree.problem_id}",
                            "nodes": len(tree.nodes), "solved": tree.solved})
        title = f"round-{round_no}/{shard}"
    else:
        rounds = sorted({int(m.group(1)) for k in store.list("trajectories/")
                         if (m := re.match(r"trajectories/round-(\d+)/", k))})
        for r in rounds:
            for info in tj.list_complete_shards(store, r):
                entries.append({"label": f"round-{r}/{info.shard}", "ref": f"round-{r}/{info.shard}",
                                "trees": info.manifest.get("trees")})
        title = "stored trees"
    return {"schema": VIEW_SCHEMA, "kind": "index", "title": title, "entries": entries}
