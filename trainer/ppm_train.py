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

`train_ppm_head` is the CPU-sized variant: the backbone stays frozen, the last
token's hidden state of every distinct input is computed once (batched by
length, cached in the work directory so a killed run resumes without
recomputing), and only the Linear head is fitted on the cached features with
the same weighted loss: a linear probe. One forward pass per input instead of
forward + backward per pair and epoch.
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


@torch.no_grad()   # not inference_mode: the features feed an autograd graph (the head's) afterwards
def hidden_features(model, tok, texts: Sequence[str], max_length: int, batch: int = 8, device="cpu",
                    on_batch=None) -> torch.Tensor:
    """The backbone's last-token hidden state of each text ([N, hidden], fp32), batched by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.value_head.in_features)
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length).to(device)
        mask = enc["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = model.backbone(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids)
        out[idx] = h.last_hidden_state[:, -1, :].float().cpu()
        if on_batch:
            on_batch(min(b + batch, len(order)), len(order))
    return out


def train_ppm_head(policy_dir: str | Path, pairs: Sequence[Pair], out_dir: str | Path, cfg: training.TrainConfig,
                   work_dir: str | Path | None = None, head_seed: int = 0, feature_batch: int = 8,
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit only the value head on a frozen backbone (see the module docstring); same output as `train_ppm`."""
    import hashlib

    from rstar.ppm import load_value_model

    if not pairs:
        raise ValueError("no preference pairs to train the PPM on")
    out_dir = Path(out_dir)
    work_dir = Path(work_dir or out_dir.with_name(out_dir.name + ".work"))
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    model, tok = load_value_model(policy_dir, head_seed=head_seed, dtype=torch.float32)
    style = prompt_style(policy_dir)
    pos_texts, neg_texts = _texts(pairs, style)
    uniq = sorted(set(pos_texts) | set(neg_texts))
    index = {t: i for i, t in enumerate(uniq)}
    digest = hashlib.sha256(("\x00".join(uniq) + f"|{policy_dir}|{cfg.max_length}").encode()).hexdigest()[:16]
    cache = work_dir / f"features-{digest}.pt"
    t_feat = time.monotonic()
    if cache.is_file():
        feats = torch.load(cache)
        log.info("PPM head: %d cached features from %s", len(uniq), cache)
    else:
        def progress(done: int, total: int) -> None:
            if done == total or done % (feature_batch * 25) == 0:
                log.info("PPM head: features %d/%d (%.0f s)", done, total, time.monotonic() - t_feat)

        feats = hidden_features(model, tok, uniq, cfg.max_length, feature_batch, on_batch=progress)
        tmp = cache.with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.replace(cache)   # a killed run leaves no half-written cache
    feature_seconds = time.monotonic() - t_feat
    pi = torch.tensor([index[t] for t in pos_texts])
    ni = torch.tensor([index[t] for t in neg_texts])
    w = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    head = model.value_head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(pairs) // cfg.batch_size))
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    order = torch.randperm(len(pairs), generator=gen)
    pos = 0
    for _ in range(total_steps):
        if pos >= len(order):
            order, pos = torch.randperm(len(pairs), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        r = head(feats).squeeze(-1)
        loss = bt_loss(r[pi[idx]], r[ni[idx]], w[idx]) / w[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        r = head(feats).squeeze(-1)
        train_acc = float((r[pi] > r[ni]).float().mean())
    save_ppm(model, tok, out_dir, {"kind": "ppm", "policy": str(policy_dir), "head_seed": head_seed, "mode": "head",
                                   "prompt_style": style, "train": asdict(cfg), **(metadata or {})})
    return {"mode": "head", "pairs": len(pairs), "inputs": len(uniq), "steps": total_steps,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "train_pair_accuracy": train_acc,
            "feature_seconds": round(feature_seconds, 1), "wall_seconds": round(time.monotonic() - t0, 1)}


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
