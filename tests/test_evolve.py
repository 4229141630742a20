"""Self-evolution rounds: resumable state, idempotent stages, the promotion gate."""

from __future__ import annotations

import json

import pytest

from rstar import rounds
from rstar.registry import ModelRegistry
from rstar.store import open_store
from rstar import trees as traj
from trainer import evolve, publish
from trainer.stages.promote import stage_promote

SOLVED = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
     "72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
     "10"),
    ("Tom has 3 boxes of 4 eggs. How many eggs?", "He has 3*4 = <<3*4=12>>12 eggs.\n#### 12", "12"),
    ("A pen costs 2 dollars. How much do 5 pens cost?", "They cost 5*2 = <<5*2=10>>10 dollars.\n#### 10", "10"),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    pool = _write(tmp_path / "pool.jsonl", [{"id": f"p{i}", "problem": q, "solution": s, "answer": a}
                                            for i, (q, s, a) in enumerate(SOLVED)]
                  + [{"id": "dev0", "problem": "dev problem in the pool", "solution": "x <<1+1=2>>\n#### 2", "answer": "2"}])
    dev = _write(tmp_path / "dev.jsonl", [{"id": "dev0", "problem": "What is 1 + 1?", "answer": "2"},
                                          {"id": "dev1", "problem": "What is 2 + 2?", "answer": "4"}])
    cfg = evolve.EvolveConfig(
        store_url=str(tmp_path / "store"), pool=str(pool), dev=str(dev), base_model=str(tiny_model_dir),
        chunk=2, sft_max_steps=2, sft_batch_size=2, sft_micro_batch=2, sft_lr=1e-3, sft_max_length=512,
        eval_max_tokens=8, eval_max_depth=2, work_dir=str(tmp_path / "work"), progress=False)
    return cfg


@pytest.mark.timeout(240)
def test_round_killed_after_synthesis_resumes_at_training(setup):
    cfg = setup
    ctx = evolve.Context(cfg)
    seen: list[tuple[str, str]] = []

    def kill_at_training(task, event):
        seen.append((task, event))
        if task == "train-policy" and event == "start":
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        evolve.evolve(ctx, 1, on_task=kill_at_training)
    st = rounds.load_state(ctx.store, 1)   # the state the controller keeps too: it can adopt this round
    assert st.status == "running" and st.tasks["synthesis-0"].status == "succeeded"
    assert st.tasks["train-policy"].status == "running" and st.driver == evolve.LOCAL_DRIVER
    shards = {i.shard: i.manifest["sha256"] for i in traj.list_complete_shards(ctx.store, 1)}
    assert sorted(shards) == ["shard-000-0000", "shard-000-0001"]   # dev0 left out of the pool: 4 problems
    synth = json.loads(ctx.store.get("rounds/round-1/synthesis.json"))
    assert synth["total"] == 4 and synth["solved"] == 4

    seen.clear()
    ctx = evolve.Context(cfg)   # a fresh process
    states = evolve.evolve(ctx, 1, on_task=lambda t, e: seen.append((t, e)))
    assert [t for t, e in seen if e == "start"] == ["train-policy", "train-ppm", "eval", "promote"]
    assert {i.shard: i.manifest["sha256"] for i in traj.list_complete_shards(ctx.store, 1)} == shards
    st = states[0]
    assert st["status"] == "succeeded" and st["tasks"]["train-policy"]["attempt"] == 2
    assert st["summaries"]["train-ppm"]["skipped"] is True          # reference data has no wrong trajectories
    reg = ModelRegistry(ctx.store)
    m = reg.manifest("policy", "r1")
    assert m.round == 1 and m.data["trajectories"] == 4 and m.parent.startswith("policy/")
    assert m.metadata["few_shot"] is False and {f.path for f in m.files} >= {"config.json", "rstar_model.json"}
    # eval then gate: with the current = base model, "not worse" passes and CURRENT moves
    assert st["summaries"]["eval"]["candidate"]["version"] == "r1"
    assert st["summaries"]["promote"]["promoted"] is True and reg.current("policy") == "r1"
    # nothing left to do; re-running a finished stage does not publish again
    assert evolve.evolve(ctx, 1) == []
    again = evolve.run_stage(ctx, "train-policy", 1)
    assert again["trained"] is False and [v.version for v in reg.versions("policy")] == ["r1"]


def test_failed_gate_leaves_current_unchanged(tmp_path):
    store = open_store(str(tmp_path / "store"))
    reg = ModelRegistry(store, cache_dir=tmp_path / "cache")
    for v in ("r1", "r2"):
        d = tmp_path / v
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"v": v}))
        reg.publish("policy", d, v, round=int(v[1:]))
    reg.promote("policy", "r1")
    cfg = evolve.EvolveConfig(store_url=str(tmp_path / "store"), work_dir=str(tmp_path / "work"), max_regression=0.05)
    ctx = evolve.Context(cfg)
    ctx.registry = reg
    history = len(reg.history("policy"))
    ctx.put_json(rounds.summary_key(2, "eval"), {"candidate": {"version": "r2", "greedy_accuracy": 0.40},
                                                 "current": {"version": "r1", "greedy_accuracy": 0.50}})
    out = stage_promote(ctx, 2)
    assert out["promoted"] is False and "regresses" in out["gate"]["reason"]
    assert reg.current("policy") == "r1" and len(reg.history("policy")) == history
    ctx.put_json(rounds.summary_key(2, "eval"), {"candidate": {"version": "r2", "greedy_accuracy": 0.46},
                                                 "current": {"version": "r1", "greedy_accuracy": 0.50}})
    out = stage_promote(ctx, 2)
    assert out["promoted"] is True and reg.current("policy") == "r2"


def test_gate_rules():
    assert publish.gate(0.5, 0.5).passed and not publish.gate(0.49, 0.5).passed
    assert publish.gate(0.45, 0.5, max_regression=0.05).passed
    assert publish.gate(0.1, None).passed and not publish.gate(None, 0.1).passed
    assert not publish.gate(0.3, None, min_accuracy=0.5).passed


def test_promotion_refuses_an_incomplete_version(tmp_path):
    store = open_store(str(tmp_path / "store"))
    reg = ModelRegistry(store, cache_dir=tmp_path / "cache")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    reg.publish("policy", d, "r1")
    reg.promote("policy", "r1")
    store.put("models/policy/r2/config.json", b"{}")   # an upload that never wrote its manifest
    with pytest.raises(Exception):
        publish.promote_pair(reg, "r2", None, "test")
    assert reg.current("policy") == "r1"


def test_config_and_stage_errors(tmp_path):
    from rstar.config import ConfigError

    with pytest.raises(ConfigError):
        evolve.EvolveConfig(bootstrap="nope").validate()
    cfg = evolve.EvolveConfig(rollouts="8,16")
    assert [cfg.rollouts_for(r) for r in (1, 2, 3)] == [8, 16, 16]
    ctx = evolve.Context(evolve.EvolveConfig(store_url=str(tmp_path / "s"), work_dir=str(tmp_path / "w")))
    with pytest.raises(evolve.StageError, match="pool"):
        evolve.run_stage(ctx, "synthesis", 1)
    with pytest.raises(evolve.StageError, match="no evaluation summary"):
        evolve.run_stage(ctx, "promote", 1)


def test_stages_and_summary_keys_have_one_definition():
    from trainer import controller, stages

    assert evolve.STAGES is controller.STAGES is rounds.STAGES
    assert set(stages.STAGE_FUNCTIONS) | {"synthesis"} == set(rounds.STAGES)
    assert evolve.summary_key is controller.summary_key is rounds.summary_key


def test_evolve_cli_argument_errors(tmp_path, capsys, monkeypatch):
    from trainer.cli import main

    monkeypatch.setenv("RSTAR_HOME", str(tmp_path))
    assert main(["evolve"]) == 2
    assert main(["evolve", "--stage", "eval"]) == 2
    assert main(["evolve", "--stage", "promote", "--round", "1", "--store-url", str(tmp_path / "s")]) == 1
    assert main(["evolve", "--rounds", "1", "--bootstrap", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--rounds N" in err and "no evaluation summary" in err and "bootstrap must be one of" in err


@pytest.mark.timeout(300)
def test_round1_bootstrap_reference_plus_policy_over_two_pools(setup, tmp_path):
    """Round 1 from converted references AND terminal-guided MCTS trees, over two pool files."""
    import dataclasses

    from trainer.stages.synthesis import stage_synthesis

    math_pool = _write(tmp_path / "math.jsonl", [{"id": "m0", "problem": "What is 3 + 4?", "answer": "7",
                                                   "solution": "$3+4=\\boxed{7}$"}])
    cfg = dataclasses.replace(setup, pool=f"{setup.pool},{math_pool}", bootstrap="reference+policy", rollouts="1",
                              candidates=2, max_depth=2, max_step_tokens=8, chunk=8)
    cfg.validate()
    ctx = evolve.Context(cfg)
    summary = stage_synthesis(ctx, 1)
    shards = {s.shard: s.manifest for s in traj.list_complete_shards(ctx.store, 1)}
    assert set(shards) == {"ref-shard-000-0000", "shard-000-0000"}
    assert shards["ref-shard-000-0000"]["method"] == "gsm8k-reference"
    mcts = list(traj.read_shard(ctx.store, 1, "shard-000-0000"))
    assert {t.problem_id for t in mcts} == {"p0", "p1", "p2", "p3", "m0"}   # dev0 excluded, both pools
    assert summary["method"] == "reference+policy" and summary["by_method"]["reference"]["solved"] == 4
    assert summary["total"] == 5
    again = stage_synthesis(ctx, 1)   # resumable: nothing is redone
    assert again["chunks_run"] == 0


def test_bootstrap_methods_are_validated(setup):
    import dataclasses

    from rstar.config import ConfigError

    for bad in ("policy+teacher", "reference+reference", "magic", "reference+"):
        with pytest.raises(ConfigError):
            dataclasses.replace(setup, bootstrap=bad).validate()


def test_pool_offset_and_exclude_files(setup, tmp_path):
    """A later round takes a fresh slice (--pool-offset); --exclude leaves out a second dev set's ids."""
    import dataclasses

    from rstar.config import ConfigError

    other_dev = _write(tmp_path / "other_dev.jsonl", [{"id": "p1", "problem": "x", "answer": "1"}])
    cfg = dataclasses.replace(setup, pool_limit=2, exclude=str(other_dev))
    assert [p["id"] for p in evolve.Context(cfg).pool_problems()] == ["p0", "p2"]
    cfg = dataclasses.replace(cfg, pool_offset=2)
    assert [p["id"] for p in evolve.Context(cfg).pool_problems()] == ["p3"]   # dev0 is always left out
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, pool_offset=-1).validate()


def test_ppm_holdout_is_a_stable_share_of_problem_ids():
    from rstar.config import ConfigError
    from trainer.stages.train import held_out

    ids = [f"gsm8k/train/{i}" for i in range(2000)]
    share = sum(held_out(i, 0.25) for i in ids) / len(ids)
    assert 0.2 < share < 0.3
    assert [held_out(i, 0.25) for i in ids] == [held_out(i, 0.25) for i in ids]   # the same every run
    assert not any(held_out(i, 0.0) for i in ids)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError):
            evolve.EvolveConfig(ppm_holdout=bad).validate()
