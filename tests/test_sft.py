"""Policy SFT: loss masks, marker tokens, memorisation, checkpoint resume."""

from __future__ import annotations

import json
import logging

import pytest

from rstar import steps as stepfmt
from rstar.artifacts import MODEL_INFO
from rstar_testing.fakes import InProcessExecutor
from trainer import data, evaluate, sft, training

Q = "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?"


def _ex(expr: str) -> data.SFTExample:
    steps = (f"<code>\n# Step 1: Count the apples that are left.\nleft = {expr}\n<end_of_step>",
             "\n# Now print the final answer\nprint(left)\n<end_of_code>",
             "\n<output>26<end_of_output>",
             "\n<answer>From the result, the answer is \\boxed{26}.<end_of_answer>")
    return data.SFTExample("p", Q, steps, 1.0, 1.0)


# the top-2 trajectories of one problem, as SFT selection hands them over
EXAMPLES = [_ex("3 * 12 - 10"), _ex("36 - 10")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_cover_only_generated_steps(tokenizer):
    row = sft.tokenize_example(tokenizer, EXAMPLES[0], 4096)
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    text, spans = data.sft_text(Q, EXAMPLES[0].steps)
    assert trained == "".join(text[a:b] for a, b in spans)
    assert "<output>" not in trained and Q not in trained and "\\boxed{26}" in trained
    assert sft.tokenize_example(tokenizer, EXAMPLES[0], 10) is None   # too long: dropped


def test_marker_tokens_are_added_with_embeddings(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n = len(tok)
    added = sft.add_marker_tokens(tok, model, "added")
    assert added == list(stepfmt.SPECIAL_TOKENS) and len(tok) == n + len(added)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    ids = tok("x\n<end_of_step>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<end_of_step>") in ids
    assert tok.decode(ids) == "x\n<end_of_step>"          # decodes as text (not a skipped special token)
    assert sft.add_marker_tokens(tok, model, "added") == []   # idempotent
    with pytest.raises(ValueError):
        sft.add_marker_tokens(tok, model, "bogus")


@pytest.mark.timeout(300)
def test_sft_memorises_a_trajectory(tmp_path, tiny_format_model_dir):
    """The loop really trains: after SFT, greedy decoding reproduces one of the trajectories exactly."""
    before = evaluate.run_rollouts(evaluate.HFPolicy(tiny_format_model_dir, few_shot=False), InProcessExecutor(), [Q],
                                   max_tokens=40, max_depth=5)[0]
    assert all(before.steps != list(e.steps) for e in EXAMPLES)
    cfg = training.TrainConfig(lr=1e-2, epochs=0, max_steps=50, batch_size=2, micro_batch=2, warmup_ratio=0.1,
                               checkpoint_every=0, progress=False)
    out = tmp_path / "policy"
    report = sft.train_policy(tiny_format_model_dir, EXAMPLES, out, cfg, markers="none")
    assert report["loss_last"] < 0.2 * report["loss_first"], report["losses"]
    info = json.loads((out / MODEL_INFO).read_text())
    assert info["few_shot"] is False and info["kind"] == "policy"
    pol = evaluate.HFPolicy(out)            # few_shot read from rstar_model.json
    assert pol.few_shot is False
    got = evaluate.run_rollouts(pol, InProcessExecutor(), [Q], max_tokens=40, max_depth=5)[0]
    assert any(got.steps == list(e.steps) for e in EXAMPLES), "".join(got.steps)
    assert got.answer == "26" and got.format_ok


@pytest.mark.timeout(300)
def test_checkpoint_resume_continues_where_it_stopped(tmp_path, tiny_model_dir, caplog):
    cfg = training.TrainConfig(lr=1e-3, epochs=0, max_steps=4, batch_size=2, micro_batch=1, warmup_ratio=0,
                               checkpoint_every=2, progress=False)
    out, work = tmp_path / "p", tmp_path / "work"

    def crash(step, loss):
        if step == 3:
            raise training.StopTraining("simulated crash")

    with pytest.raises(training.StopTraining):
        sft.train_policy(tiny_model_dir, EXAMPLES, out, cfg, work_dir=work, markers="none", on_step=crash)
    assert (work / training.CHECKPOINT).is_file() and not out.exists()
    caplog.set_level(logging.INFO, logger="trainer.training")
    report = sft.train_policy(tiny_model_dir, EXAMPLES, out, cfg, work_dir=work, markers="none")
    assert report["resumed_from"] == 2 and len(report["losses"]) == 2
    # without a progress bar the loop logs its progress (resumed steps only)
    steps_logged = [r.getMessage() for r in caplog.records if " loss " in r.getMessage()]
    assert any("step 3/4" in m for m in steps_logged) and any("step 4/4" in m for m in steps_logged)
    assert not any("step 2/4" in m for m in steps_logged)
    assert (out / "config.json").is_file() and not (work / training.CHECKPOINT).exists()
    # different data: the checkpoint is not reused
    with pytest.raises(training.StopTraining):
        sft.train_policy(tiny_model_dir, EXAMPLES, out, cfg, work_dir=work, markers="none", on_step=crash)
    report = sft.train_policy(tiny_model_dir, EXAMPLES[:1], out, cfg, work_dir=work, markers="none")
    assert report["resumed_from"] == 0


def test_index_stream_is_seeded_and_covers_epochs():
    a = training.index_stream(5, 2, seed=1)
    assert len(a) == 10 and sorted(a) == sorted(list(range(5)) * 2)
    assert a == training.index_stream(5, 2, seed=1) != training.index_stream(5, 2, seed=2)
    assert len(training.index_stream(4, 0.5, 0)) == 2


@pytest.mark.timeout(300)
def test_lora_option_trains_adapters_and_saves_a_merged_model(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = training.TrainConfig(lr=1e-3, epochs=0, max_steps=2, batch_size=2, micro_batch=2, warmup_ratio=0,
                               checkpoint_every=0, progress=False, lora_r=4, lora_alpha=8)
    out = tmp_path / "lora"
    report = sft.train_policy(tiny_model_dir, EXAMPLES, out, cfg, markers="added")
    assert report["steps"] == 2 and len(report["markers_added"]) == len(stepfmt.SPECIAL_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(out)            # a plain HF model: adapters merged
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.timeout(300)
def test_lora_without_markers_publishes_the_adapter_and_its_file_level_merge(tmp_path, tiny_model_dir):
    """LoRA + markers=none: the version holds the adapter, and its weights are exactly
    rstar.lora.merge_into(base, adapter) (what a shipped round materialises)."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from rstar import lora
    from rstar.artifacts import read_model_info

    cfg = training.TrainConfig(lr=1e-2, epochs=0, max_steps=2, batch_size=2, micro_batch=2, warmup_ratio=0,
                               checkpoint_every=0, progress=False, lora_r=4, lora_alpha=8)
    out = tmp_path / "lora"
    sft.train_policy(tiny_model_dir, EXAMPLES, out, cfg, markers="none")
    assert (out / lora.LORA_FILE).is_file() and read_model_info(out)["lora"]["r"] == 4
    again = tmp_path / "again"
    lora.merge_into(tiny_model_dir, out / lora.LORA_FILE, again)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    base = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    changed = [k for k in a if k.endswith("q_proj.weight") and not (a[k].float() - base[k].float()).abs().max() < 1e-3]
    assert changed, "training moved the adapted weights"
