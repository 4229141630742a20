"""rstar.evolved: a trained round exported as small files, verified, materialised and registered."""

from __future__ import annotations

import json

import pytest
import torch

from rstar import evolved, lora
from rstar.artifacts import VALUE_HEAD_FILE, write_model_info
from rstar.registry import ModelRegistry, sha256_file
from rstar.store import open_store

MODEL = "smollm2-135m-instruct"   # an embedded name; the tests pass the tiny model as its base


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _trained_round(tmp_path, base_dir, registry, round_no=1):
    """What `train-policy` + `train-ppm --ppm-mode head` publish: a LoRA policy, a head on its backbone."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rstar.ppm import build_ppm_dir

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    adapter = lora.save_adapter(tmp_path / "a.safetensors", lora.from_peft_state(get_peft_model_state_dict(model)),
                                r=4, alpha=8, base={"model": MODEL})
    policy = tmp_path / "policy"
    lora.merge_into(base_dir, adapter, policy)
    adapter.rename(policy / lora.LORA_FILE)
    write_model_info(policy, {"kind": "policy", "few_shot": False, "prompt_style": "rstar", "lora": {"r": 4}})
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, generator=g)
    from safetensors.torch import save_file

    save_file({"value_head.weight": head.weight.detach(), "value_head.bias": head.bias.detach()},
              str(tmp_path / "head.safetensors"))
    ppm = build_ppm_dir(policy, tmp_path / "head.safetensors", tmp_path / "ppm", {"kind": "ppm", "mode": "head"})
    registry.publish("policy", policy, f"r{round_no}")
    registry.publish("ppm", ppm, f"r{round_no}")
    return policy, ppm


@pytest.mark.timeout(300)
def test_export_verify_materialise_register(tmp_path, home, tiny_model_dir):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    reg = ModelRegistry(open_store(str(tmp_path / "trained-store")))
    policy, ppm = _trained_round(tmp_path, tiny_model_dir, reg)
    shipped = evolved.export_round(reg, 1, MODEL, out_root=tmp_path / "shipped", eval_results={"r1": {"gsm8k_dev100": {"greedy": 0.5}}},
                                   reproduce="scripts/evolve-embedded.sh train1")
    m = shipped.manifest
    assert (shipped.path / "policy" / lora.LORA_FILE).is_file() and (shipped.path / "ppm" / VALUE_HEAD_FILE).is_file()
    assert not list(shipped.path.glob("*/*model.safetensors")), "no full weights in a shipped round"
    assert m["bytes"] < evolved.MAX_ROUND_BYTES and shipped.eval_of("r1") == {"gsm8k_dev100": {"greedy": 0.5}} and m["round"] == 1
    assert [r.round for r in evolved.shipped_rounds(MODEL, tmp_path / "shipped")] == [1]
    evolved.verify(shipped)

    # a fresh clone: the base + the shipped files give the very versions the trainer published
    dirs = evolved.materialise(shipped, base_dir=tiny_model_dir)
    for name, src in (("policy", policy), ("ppm", ppm)):
        for f in src.glob("*.safetensors"):
            a, b = load_file(str(f)), load_file(str(dirs[name] / f.name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}/{f.name} differs"
    assert json.loads((dirs["policy"] / "rstar_model.json").read_text())["few_shot"] is False

    fresh = ModelRegistry(open_store(str(tmp_path / "fresh-store")))
    fresh.publish("policy", tiny_model_dir, "base-smollm2-135m")
    fresh.promote("policy", "base-smollm2-135m", deep=False)
    assert evolved.register(fresh, shipped) == {"policy": "r1", "ppm": "r1"}   # CURRENT was the base: evolved now
    fresh.promote("policy", "base-smollm2-135m", deep=False, reason="operator goes back to the base")
    assert evolved.register(fresh, shipped)["policy"] == "base-smollm2-135m"   # the operator's choice is kept
    assert fresh.verify("ppm", "r1").version == "r1"
    assert {i.version: i.eval for i in fresh.versions("policy")}["r1"] == {"gsm8k_dev100": {"greedy": 0.5}}


def test_corrupted_or_missing_files_are_refused(tmp_path, home):
    root = tmp_path / "shipped" / MODEL / "r1"
    (root / "policy").mkdir(parents=True)
    (root / "ppm").mkdir()
    (root / "policy" / lora.LORA_FILE).write_bytes(b"adapter bytes")
    good = {"size": 13, "sha256": sha256_file(root / "policy" / lora.LORA_FILE)[0]}
    manifest = {"schema": 1, "base_model": MODEL, "round": 1, "policy": {"version": "r1", "files": {lora.LORA_FILE: good}},
                "ppm": {"version": "r1", "files": {VALUE_HEAD_FILE: {"size": 3, "sha256": "0" * 64}}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    shipped = evolved.read_round(root)
    with pytest.raises(evolved.ShippedError, match="ppm/value_head.safetensors is missing"):
        evolved.verify(shipped)
    (root / "ppm" / VALUE_HEAD_FILE).write_bytes(b"abc")
    with pytest.raises(evolved.ShippedError, match="ppm/value_head.safetensors does not match its sha256"):
        evolved.verify(shipped)
    with pytest.raises(evolved.ShippedError, match="does not match"):
        evolved.materialise(shipped, base_dir=tmp_path)   # refused before anything is built
    assert not evolved.cache_dir(shipped).exists()
    (root / "manifest.json").write_text(json.dumps({**manifest, "schema": 9}))
    with pytest.raises(evolved.ShippedError, match="schema 9"):
        evolved.read_round(root)


def test_default_means_the_shipped_round_and_a_name_means_the_base(tmp_path, monkeypatch):
    from rstar import models

    monkeypatch.setenv("RSTAR_SHIPPED_DIR", str(tmp_path / "none"))
    assert evolved.for_spec("default") is None
    root = tmp_path / "shipped" / models.DEFAULT.name / "r2"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"schema": 1, "base_model": models.DEFAULT.name, "round": 2,
                                                    "policy": {"version": "r2", "files": {}},
                                                    "ppm": {"version": "r2", "files": {}}}))
    monkeypatch.setenv("RSTAR_SHIPPED_DIR", str(tmp_path / "shipped"))
    assert evolved.for_spec("default").round == 2
    assert evolved.for_spec(models.DEFAULT.name) is None    # the base stays one name away
    monkeypatch.setenv("RSTAR_NO_SHIPPED", "1")
    assert evolved.for_spec("default") is None


@pytest.mark.timeout(300)
def test_rstar_ship_writes_the_round_with_its_eval_numbers(tmp_path, home, tiny_model_dir, capsys):
    pytest.importorskip("peft")
    import gzip

    from trainer.cli import main

    store = tmp_path / "store"
    _trained_round(tmp_path, tiny_model_dir, ModelRegistry(open_store(str(store))))
    report = {"dataset": "../shared/data/gsm8k_dev100.jsonl", "problems": 100,
              "greedy": {"accuracy": 0.31, "format_rate": 0.9}, "majority": {"samples": 8, "accuracy": 0.4}}
    (tmp_path / "r1.json.gz").write_bytes(gzip.compress(json.dumps(report).encode()))
    rc = main(["ship", "--round", "1", "--model", MODEL, "--store", str(store), "--out", str(tmp_path / "shipped"),
               "--eval", f"r1={tmp_path / 'r1.json.gz'}", "--reproduce", "scripts/evolve-embedded.sh train1"])
    assert rc == 0 and "shipped round 1" in capsys.readouterr().out
    shipped = evolved.latest(MODEL, tmp_path / "shipped")
    assert shipped.eval_of("r1") == {"gsm8k_dev100": {"greedy_accuracy": 0.31, "format_rate": 0.9, "maj@8": 0.4}}
    assert shipped.manifest["reproduce"] == "scripts/evolve-embedded.sh train1"
    assert main(["ship", "--round", "1", "--eval", "nonsense"]) == 2
    assert main(["ship", "--round", "7", "--model", MODEL, "--store", str(store), "--out", str(tmp_path / "x")]) == 1
    assert "r7" in capsys.readouterr().err and not (tmp_path / "x").exists()
