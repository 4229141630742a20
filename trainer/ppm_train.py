"""PPM training: the round's policy backbone + a value head, pairwise Bradley-Terry loss.

Model = `rstar.ppm.ValueModel` loaded from the new policy directory
(`load_value_model`: backbone without the LM head, Linear(hidden, 1) on the
last token's hidden state, freshly initialised from a fixed seed). Input =
`rstar.ppm.render(question, steps)`, the exact string the PPM service
scores. Loss per pair: -log sigmoid(r+ - r-) on the raw head outputs (the
service reports tanh(r / 5), a monotone map, so rankings are the same),
weighted by the pair's group weight 1 / (n+ * n-) (trainer.data). The saved
directory is what the PPM service loads: backbone HF files + tokenizer +
`value_head.safetensors` + `rstar_model.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from trainer import training
from trainer.data import Pair

log = logging.getLogger(__name__)


def _texts(pairs: Sequence[Pair]) -> tuple[list[str], list[str]]:
    from rstar.ppm import render

    return [render(p.question, list(p.pos)) for p in pairs], [render(p.question, list(p.neg)) for p in pairs]


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
    pos_texts, neg_texts = _texts(pairs)
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
                                       "train": asdict(cfg), **(metadata or {})})
        training.remove_checkpoint(work_dir)
    training.barrier(dist)
    report.update(pairs=len(pairs), groups=len({p.group for p in pairs}), wall_seconds=round(time.monotonic() - t0, 1))
    return report


def save_ppm(model, tok, out_dir: Path, info: dict[str, Any]) -> None:
    from rstar.ppm import save_value_head

    from trainer.sft import MODEL_INFO

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir.parent))
    try:
        model.backbone.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.backbone.to(torch.float32)
        tok.save_pretrained(tmp)
        save_value_head(model, tmp)
        (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.inference_mode()
def pair_accuracy(model_dir: str | Path, pairs: Sequence[Pair], batch: int = 16) -> float:
    """Share of pairs the saved PPM ranks correctly (service scoring: tanh(raw / 5))."""
    from rstar.ppm import load_value_model

    model, tok = load_value_model(model_dir)
    pos_texts, neg_texts = _texts(pairs)
    correct = 0
    for b in range(0, len(pairs), batch):
        p = torch.tanh(_raw_scores(model, tok, pos_texts[b:b + batch], 4096, "cpu") / 5)
        n = torch.tanh(_raw_scores(model, tok, neg_texts[b:b + batch], 4096, "cpu") / 5)
        correct += int((p > n).sum())
    return correct / max(1, len(pairs))
