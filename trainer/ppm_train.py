"""PPM training: the round's policy backbone + a value head, pairwise Bradley-Terry loss.

Model = `rstar.ppm.ValueModel` loaded from the new policy directory
(`load_value_model`: backbone without the LM head, Linear(hidden, 1) on the
last token's hidden state, freshly initialised from a fixed seed). Input =
`rstar.ppm.render(question, steps)`, the exact string the PPM service
scores. Loss per pair: -log sigmoid(r+ - r-) on the raw head outputs (the
service reports `rstar.artifacts.ppm_score` = tanh(r / 5), a monotone map, so
rankings are the same), weighted by the pair's group weight 1 / (n+ * n-)
(trainer.data). The saved directory is what the PPM service loads, written
atomically in the model-artifact format (`rstar.artifacts.save_model_dir`):
backbone HF files + tokenizer + `value_head.safetensors` + `rstar_model.json`.
Not here: the optimisation loop (`trainer.training`), publishing (`trainer.publish`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from rstar.artifacts import ppm_score, prompt_style, save_model_dir
from trainer import training
from trainer.data import Pair

log = logging.getLogger(__name__)


def _texts(pairs: Sequence[Pair], style: str = "rstar") -> tuple[list[str], list[str]]:
    from rstar.ppm import render

    return ([render(p.question, list(p.pos), style) for p in pairs],
            [render(p.question, list(p.neg), style) for p in pairs])


def _raw_scores(model, tok, texts: list[str], max_length: int, device) -> torch.Tensor:
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
    return model(enc["input_ids"], enc["attention_mask"]).float()


def bt_loss(r_pos: torch.Tensor, r_neg: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Summed weighted Bradley-Terry loss: sum w * -log sigmoid(r+ - r-)."""
    return (weights * -torch.nn.functional.logsigmoid(r_pos - r_neg)).sum()


def train_ppm(policy_dir: str | Path, pairs: Sequence[Pair], out_dir: str | Path, cfg: training.TrainConfig,
              work_dir: str | Path | None = None, head_seed: int = 0, on_step=None,
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a PPM from `policy_dir` on `pairs`; writes the PPM service's model directory to `out_dir`."""
    from rstar.ppm import load_value_model

    if not pairs:
        raise ValueError("no preference pairs to train the PPM on")
    dist = training.setup_dist()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir or out_dir.with_name(out_dir.name + ".work"))
    t0 = time.monotonic()
    model, tok = load_value_model(policy_dir, head_seed=head_seed, dtype=torch.float32)
    model.to(dist.device)
    pos_texts, neg_texts = _texts(pairs, prompt_style(policy_dir))
    lengths = [len(tok(p)["input_ids"]) + len(tok(n)["input_ids"]) for p, n in zip(pos_texts, neg_texts)]

    def forward(m, idx: list[int]) -> torch.Tensor:
        texts = [pos_texts[i] for i in idx] + [neg_texts[i] for i in idx]
        r = _raw_scores(m, tok, texts, cfg.max_length, dist.device)
        w = torch.tensor([pairs[i].weight for i in idx], device=r.device)
        return bt_loss(r[:len(idx)], r[len(idx):], w)

    digest = training.digest_rows([p.to_dict() for p in pairs])
    fp = cfg.fingerprint(digest, {"policy": str(policy_dir), "kind": "ppm", "head_seed": head_seed})
    report = training.train_loop(model, len(pairs), cfg=cfg, dist=dist, work_dir=work_dir, fingerprint=fp,
                                 forward=forward, weight_of=lambda i: pairs[i].weight,
                                 tokens_of=lambda i: lengths[i], on_step=on_step, desc="ppm")
    if dist.main:
        save_ppm(model, tok, out_dir, {"kind": "ppm", "policy": str(policy_dir), "head_seed": head_seed,
                                       "prompt_style": prompt_style(policy_dir),
                                       "train": asdict(cfg), **(metadata or {})})
        training.remove_checkpoint(work_dir)
    training.barrier(dist)
    report.update(pairs=len(pairs), groups=len({p.group for p in pairs}), wall_seconds=round(time.monotonic() - t0, 1))
    return report


def save_ppm(model, tok, out_dir: Path, info: dict[str, Any]) -> None:
    """Backbone (bf16) + tokenizer + value head + rstar_model.json, atomically."""
    save_model_dir(out_dir, model.backbone, tok, info, value_head=model.value_head)


@torch.inference_mode()
def pair_accuracy(model_dir: str | Path, pairs: Sequence[Pair], batch: int = 16) -> float:
    """Share of pairs the saved PPM ranks correctly (service scoring: `ppm_score`)."""
    from rstar.ppm import load_value_model

    model, tok = load_value_model(model_dir)
    pos_texts, neg_texts = _texts(pairs, prompt_style(model_dir))
    correct = 0
    for b in range(0, len(pairs), batch):
        p = ppm_score(_raw_scores(model, tok, pos_texts[b:b + batch], 4096, "cpu"))
        n = ppm_score(_raw_scores(model, tok, neg_texts[b:b + batch], 4096, "cpu"))
        correct += int((p > n).sum())
    return correct / max(1, len(pairs))
