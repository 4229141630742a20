"""What earlier code wrote still loads: trajectory shards and model versions from main at fcf44af.

`tests/fixtures/legacy/` was written by `make_fixture.py` (beside it) with the code
of commit fcf44af, before the domain library was split out: a synthesis shard
from the search core, a bootstrap shard, and a tiny policy and PPM version
published and promoted in the registry, with the PPM's scores of four prefixes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rstar import trees as tj
from rstar.registry import ModelRegistry
from rstar.store import LocalStore

FIXTURE = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture()
def store(tmp_path):
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


def test_legacy_shards_load_as_records(store, expected):
    shards = {s.shard: s for s in tj.list_complete_shards(store, 1)}
    assert set(shards) == {"legacy-mcts", "legacy-bootstrap"}
    mcts = list(tj.read_shard(store, 1, "legacy-mcts"))
    assert len(mcts) == expected["synthesis"]["problems"]
    for tree in mcts:
        assert tree.nodes[0].parent is None and len(tree.nodes) > 1
        for n in tree.nodes[1:]:
            prefix = tree.prefix_steps(n.id)
            assert prefix[-1] == n.text or n.ends_code   # a code-closing node is followed by its output step
        assert tree.extra.get("round") == 1
    boot = list(tj.read_shard(store, 1, "legacy-bootstrap"))
    assert len(boot) == expected["bootstrap_trees"] and boot[0].solved


def test_legacy_shards_feed_the_trainer(store):
    from trainer import data

    trees = list(data.iter_round_trees(store, 1))
    examples, stats = data.build_sft(trees)
    assert stats.problems == len(trees) and any(e.problem_id == "g1" for e in examples)
    pairs, _ = data.build_all_pairs(t for _, t in trees)
    assert all(p.pos != p.neg for p in pairs)


def test_legacy_model_versions_load_and_score_the_same(store, expected, tmp_path):
    from rstar.local_policy import HFPolicy
    from rstar.ppm import PPMScorer

    reg = ModelRegistry(store, cache_dir=tmp_path / "cache")
    assert reg.current("policy") == "legacy-r1" and reg.current("ppm") == "legacy-r1"
    ppm_dir = reg.fetch("ppm", "legacy-r1")
    scorer = PPMScorer(ppm_dir, "legacy-r1")
    prefixes = [(q, list(s)) for q, s in expected["ppm_prefixes"]]
    got = scorer.score(prefixes)
    assert list(got) == pytest.approx(expected["ppm_scores"], abs=1e-4) and got.model_version == "legacy-r1"
    policy = HFPolicy(reg.fetch("policy", "legacy-r1"))
    assert policy.few_shot is False   # read from the version's rstar_model.json
