"""The trajectory store: round trip, manifest-last completeness, crashes mid-write, schema checks."""

import gzip
import json
import subprocess
import sys
import textwrap

import pytest

from rstar import steps as stepfmt
from rstar.store import LocalStore
from rstar import trees as tj
from rstar.search.engine import Engine
from rstar_testing.fakes import HashScorer, InProcessExecutor, WalkPolicy
from rstar.search.mcts import PPM_AUGMENTED, SamplingParams, Tree, TreeSettings


def grown_trees(n=3):
    trees = [Tree(f"problem {i}", TreeSettings(rollouts=4, k=3, annotation=PPM_AUGMENTED), seed=i, gold="12",
                  problem_id=f"p{i}") for i in range(n)]
    Engine(WalkPolicy(), InProcessExecutor(), HashScorer(), sampling=SamplingParams()).run(trees)
    return trees


def test_shard_round_trip_keeps_every_node_field(tmp_path):
    store = LocalStore(tmp_path)
    trees = grown_trees()
    dicts = [tj.tree_to_dict(t, {"policy": "walk-1"}) for t in trees]
    info = tj.write_shard(store, 3, "shard-0001", dicts, {"note": "unit"})
    assert info.key == "trajectories/round-3/shard-0001.jsonl.gz"
    assert store.exists("trajectories/round-3/shard-0001.manifest.json")
    back = list(tj.read_shard(store, 3, "shard-0001"))
    assert [t.to_dict() for t in back] == json.loads(json.dumps(dicts))
    node = next(n for n in back[0].nodes if n.answer is not None).to_dict()
    for key in ("text", "code", "output", "failure", "visits", "q", "ppm_score", "terminal", "answer", "correct"):
        assert key in node
    assert back[0].schema == tj.TREE_SCHEMA and back[0].model_versions == {"policy": "walk-1"}
    # one tree per gzip JSON line
    raw = gzip.decompress(store.get(info.key)).decode().splitlines()
    assert len(raw) == 3 and json.loads(raw[1])["problem_id"] == "p1"
    [listed] = tj.list_complete_shards(store, 3)
    assert listed.shard == "shard-0001" and listed.manifest["trees"] == 3 and listed.manifest["note"] == "unit"


def test_prefix_steps_rebuilds_what_the_models_saw():
    tree = grown_trees(1)[0]
    d = tj.tree_to_dict(tree)
    for n in tree.nodes:
        assert tuple(tj.prefix_steps(d, n.id)) == n.prefix_steps()


def test_data_without_manifest_is_not_complete(tmp_path):
    store = LocalStore(tmp_path)
    data, _ = tj.encode_trees([tj.tree_to_dict(grown_trees(1)[0])])
    store.put(tj.shard_key(1, "orphan"), data)
    assert tj.list_complete_shards(store, 1) == []
    with pytest.raises(tj.ShardError, match="no manifest"):
        list(tj.read_shard(store, 1, "orphan"))


def test_corrupted_data_fails_the_manifest_check(tmp_path):
    store = LocalStore(tmp_path)
    tj.write_shard(store, 1, "s", [tj.tree_to_dict(t) for t in grown_trees(2)])
    store.put(tj.shard_key(1, "s"), gzip.compress(b'{"schema": "rstar.tree/1"}\n'))
    with pytest.raises(tj.ShardError, match="sha256"):
        list(tj.read_shard(store, 1, "s"))


@pytest.mark.parametrize("crash_at", ["data", "manifest"])
def test_a_shard_killed_mid_write_is_not_listed(tmp_path, crash_at):
    """A writer process dies (os._exit) while writing the data or just before the manifest."""
    script = textwrap.dedent(f"""
        import os, sys
        from rstar.store import LocalStore
        from rstar import trees as tj

        class Dying(LocalStore):
            def put(self, key, data, **kw):
                if {crash_at!r} == "data" and key.endswith(".jsonl.gz"):
                    path = self._path(key)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.parent / ".tmp-crash"          # what put leaves behind mid-write
                    tmp.write_bytes(data[: len(data) // 2])
                    os._exit(9)
                if {crash_at!r} == "manifest" and key.endswith(".manifest.json"):
                    os._exit(9)
                super().put(key, data, **kw)

        tree = {{"schema": tj.TREE_SCHEMA, "problem_id": "x", "nodes": []}}
        tj.write_shard(Dying(sys.argv[1]), 4, "crashy", [tree] * 100)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    store = LocalStore(tmp_path)
    assert tj.list_complete_shards(store, 4) == []
    assert store.exists(tj.shard_key(4, "crashy")) == (crash_at == "manifest")
    # a later complete write of the same shard is picked up
    tj.write_shard(store, 4, "crashy", [{"schema": tj.TREE_SCHEMA, "problem_id": "x", "nodes": []}])
    assert [s.shard for s in tj.list_complete_shards(store, 4)] == ["crashy"]


def test_newer_schema_and_bad_names_are_rejected(tmp_path):
    store = LocalStore(tmp_path)
    tj.write_shard(store, 0, "future", [{"schema": "rstar.tree/99", "nodes": []}])
    with pytest.raises(tj.ShardError, match="newer"):
        list(tj.read_shard(store, 0, "future"))
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            tj.shard_key(0, bad)


def test_records_round_trip_and_keep_unknown_fields():
    d = tj.tree_to_dict(grown_trees(1)[0], {"policy": "walk-1"}, {"round": 3})
    d["written_by_a_later_tool"] = {"x": 1}
    d["nodes"][1]["note"] = "kept"
    rec = tj.TreeRecord.from_dict(d)
    assert rec.extra["round"] == 3 and rec.nodes[1].extra == {"note": "kept"}
    assert rec.to_dict() == d


def test_records_written_without_optional_fields_load_with_defaults():
    d = {"schema": "rstar.tree/1", "question": "q", "nodes": [
        {"id": 0, "parent": None, "children": [1]},
        {"id": 1, "parent": 0, "text": "<code>\nx = 1\nprint(x)\n<end_of_code>", "ends_code": True, "output": "1",
         "visits": 2, "value_sum": 1.0}]}
    rec = tj.TreeRecord.from_dict(d)
    assert rec.nodes[1].q == 0.5 and rec.nodes[1].failure == "" and rec.nodes[1].answer is None
    assert rec.prefix_steps(1)[-1] == stepfmt.output_step("1")


@pytest.mark.parametrize("nodes", [[], [{"id": 1, "parent": None}], [{"id": 0, "parent": 5}], [{"text": "x"}]])
def test_malformed_records_are_refused(nodes):
    with pytest.raises(tj.ShardError):
        tj.TreeRecord.from_dict({"schema": "rstar.tree/1", "question": "q", "nodes": nodes})


def test_the_prefix_rule_is_the_same_in_the_engine_and_in_records():
    tree = grown_trees(1)[0]
    rec = tj.TreeRecord.from_search_tree(tree)
    for n in tree.nodes:
        assert tuple(rec.nodes[n.id].own_steps()) == n.own_steps()
