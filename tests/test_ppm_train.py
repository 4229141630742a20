"""PPM training: Bradley-Terry on a synthetic task, loadable by the PPM service."""

from __future__ import annotations

import random

import pytest
import torch

from trainer import data, ppm_train, training


def _pair(a: int, b: int, wrong: str, group: str) -> data.Pair:
    """Correct vs wrong arithmetic step: the question asks for a sum; the wrong step uses another operation."""
    q = f"What is {a} plus {b}?"
    pos = (f"<code>\n# Step 1: compute it\nx = {a} + {b}\n<end_of_step>",)
    neg = (f"<code>\n# Step 1: compute it\nx = {a} {wrong} {b}\n<end_of_step>",)
    return data.Pair(group, q, pos, neg, 1.0, -1.0, group, 1.0, "step")


def synthetic_pairs(n: int, seed: int) -> list[data.Pair]:
    rng = random.Random(seed)
    return [_pair(rng.randint(1, 99), rng.randint(1, 99), "-*"[i % 2], f"s{seed}-{i}") for i in range(n)]


def test_bt_loss_is_weighted_and_prefers_the_positive():
    rp, rn = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    w = torch.tensor([0.5, 0.5])
    expected = 0.5 * -torch.nn.functional.logsigmoid(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2.0))
    assert ppm_train.bt_loss(rp, rn, w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ppm_train.bt_loss(rn, rp, w) > ppm_train.bt_loss(rp, rn, w)


@pytest.mark.timeout(240)
def test_ppm_learns_to_rank_held_out_pairs(tmp_path, tiny_format_model_dir):
    train = synthetic_pairs(96, seed=1)
    held_out = synthetic_pairs(40, seed=2)
    before = ppm_train.pair_accuracy(tiny_format_model_dir, held_out)
    assert before < 0.8     # the task needs training: an untrained (or constant-loss) model fails the bar below
    cfg = training.TrainConfig(lr=1e-3, epochs=3, batch_size=16, micro_batch=16, warmup_ratio=0.0,
                               checkpoint_every=0, progress=False, max_length=256)
    out = tmp_path / "ppm"
    report = ppm_train.train_ppm(tiny_format_model_dir, train, out, cfg)
    assert report["loss_last"] < report["loss_first"]
    acc = ppm_train.pair_accuracy(out, held_out)
    assert acc >= 0.9, f"held-out ranking accuracy {acc:.2f} (before training {before:.2f}), losses {report['losses']}"
    # what the PPM service loads: backbone + value_head.safetensors, scored as tanh(raw / 5)
    from rstar.artifacts import VALUE_HEAD_FILE
    from rstar.ppm import PPMScorer

    assert (out / VALUE_HEAD_FILE).is_file() and (out / "config.json").is_file()
    scorer = PPMScorer(out, "r1")
    p = held_out[0]
    scores = scorer.score([(p.question, list(p.pos)), (p.question, list(p.neg))])
    (sp, sn), version = scores, scores.model_version
    assert version == "r1" and -1 <= sn < sp <= 1


@pytest.mark.timeout(240)
def test_head_only_ppm_learns_on_a_frozen_backbone_and_resumes_from_cached_features(tmp_path, tiny_format_model_dir):
    train = synthetic_pairs(96, seed=1)
    held_out = synthetic_pairs(40, seed=2)
    cfg = training.TrainConfig(lr=1e-2, epochs=30, batch_size=32, progress=False, max_length=256)
    out, work = tmp_path / "ppm", tmp_path / "ppm.work"
    report = ppm_train.train_ppm_head(tiny_format_model_dir, train, out, cfg, work_dir=work)
    assert report["mode"] == "head" and report["loss_last"] < report["loss_first"]
    acc = ppm_train.pair_accuracy(out, held_out)
    assert acc >= 0.75, f"held-out ranking accuracy {acc:.2f}, train {report['train_pair_accuracy']:.2f}"
    # the backbone is unchanged: only the head was fitted
    from safetensors.torch import load_file

    before = load_file(str(next(tiny_format_model_dir.glob("*.safetensors"))))
    after = load_file(str(next(out.glob("model*.safetensors"))))
    k = next(k for k in after if "layers.0.self_attn.q_proj.weight" in k)
    assert torch.equal(after[k].float(), before["model." + k if "model." + k in before else k].float())
    # a second run finds the cached features (no forward pass) and gives the same head
    report2 = ppm_train.train_ppm_head(tiny_format_model_dir, train, tmp_path / "ppm2", cfg, work_dir=work)
    assert report2["feature_seconds"] < report["feature_seconds"] and report2["losses"] == report["losses"]
