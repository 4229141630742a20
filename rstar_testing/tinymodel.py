"""Tiny real models for tests: a random Llama with the default model's tokenizer,
optionally fitted for a few seconds to texts in the step format (tests and bench only)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from rstar.models import DONE_MARKER

log = logging.getLogger(__name__)


def make_tiny_model(out_dir: Path, tokenizer_dir: Path, hidden: int = 128, layers: int = 2, seed: int = 0,
                    train_on: list[str] | None = None, train_steps: int = 100) -> Path:
    """A randomly initialised Llama with the default model's tokenizer (tests only).

    head_dim stays 64: vLLM's CPU attention kernels reject smaller heads. With `train_on`,
    the random model is then fitted to those texts for `train_steps` steps (a few seconds),
    so it writes steps that end with the step markers instead of running to the token limit.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / DONE_MARKER).is_file():
        return out_dir
    torch.manual_seed(seed)
    base = AutoConfig.from_pretrained(tokenizer_dir)
    config = type(base)(
        vocab_size=base.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
        max_position_embeddings=base.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, rope_theta=getattr(base, "rope_theta", 10000.0),
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if train_on:
        _fit(model, tokenizer, train_on, train_steps)
    model = model.to(torch.bfloat16)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text("{}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _fit(model, tokenizer, texts: list[str], steps: int, lr: float = 3e-3) -> None:
    """Fit the model to `texts` (one padded batch, full-batch AdamW): memorised in ~100 steps."""
    import torch

    seqs = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.monotonic()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    log.info("tiny model fitted: %d steps, final loss %.3f, %.1f s", steps, loss.item(), time.monotonic() - start)


