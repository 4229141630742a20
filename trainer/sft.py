"""Policy SFT: fine-tune the BASE model on selected trajectories (spec section 4, step 3).

Text = `render_prompt(question, [], few_shot=False)` + the trajectory steps, the
exact string the policy service renders for a fine-tuned model (served with
`few_shot=False`; the trainer writes `rstar_model.json` with `"few_shot":
false` next to the weights). The loss covers only the policy-written step
tokens: the prompt and the system-written `<output>...<end_of_output>` are
context. Token/character alignment comes from the fast tokenizer's offsets on
the whole string, so training sees the same tokenisation as serving.

Step markers (`<code>`, `<end_of_step>`, ...): `markers="added"` (default)
adds them to the tokenizer as single added tokens that decode as text (the
policy service detokenises with `skip_special_tokens=False` either way), new
embedding rows initialised to the mean of the embeddings of the pieces the
old tokenizer split the marker into; `"special"` registers them as additional
special tokens instead; `"none"` keeps the base tokenizer.

The output directory is written in the model-artifact format, atomically
(`rstar.artifacts.save_model_dir`). Not here: the optimisation loop
(`trainer.training`), publishing the version (`trainer.publish`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from rstar import steps as stepfmt
from rstar.artifacts import prompt_style, save_model_dir
from trainer import training
from trainer.data import SFTExample, sft_text

log = logging.getLogger(__name__)

MARKER_MODES = ("added", "special", "none")


def add_marker_tokens(tokenizer, model, mode: str) -> list[str]:
    """Add the step markers to the tokenizer (and embedding rows to the model); returns those added."""
    if mode not in MARKER_MODES:
        raise ValueError(f"markers must be one of {MARKER_MODES}, got {mode!r}")
    if mode == "none":
        return []
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [m for m in stepfmt.SPECIAL_TOKENS if m not in vocab]
    if not new:
        return []
    pieces = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in new}
    if mode == "special":
        tokenizer.add_special_tokens({"additional_special_tokens": new})
    else:
        tokenizer.add_tokens([AddedToken(m, special=False, normalized=False) for m in new])
    old_n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        for m in new:
            tid = tokenizer.convert_tokens_to_ids(m)
            ids = [i for i in pieces[m] if i < old_n] or [0]
            emb[tid] = emb[ids].mean(0)
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[tid] = out.weight[ids].mean(0)
    return new


def tokenize_example(tokenizer, ex: SFTExample, max_length: int, style: str = "rstar") -> dict[str, Any] | None:
    text, spans = sft_text(ex.question, ex.steps, style)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) > max_length:
        return None
    labels = []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = e > s and any(a <= s < b for a, b in spans)
        labels.append(tid if inside else -100)
    n_train = sum(1 for x in labels if x != -100)
    if n_train == 0:
        return None
    return {"input_ids": ids, "labels": labels, "n_train": n_train}


def _collate(rows: list[dict[str, Any]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def train_policy(base_dir: str | Path, examples: Sequence[SFTExample], out_dir: str | Path, cfg: training.TrainConfig,
                 work_dir: str | Path | None = None, markers: str = "added", on_step=None,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune `base_dir` on `examples`; writes an HF model directory to `out_dir`. Returns a report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = training.setup_dist()
    out_dir, work_dir = Path(out_dir), Path(work_dir or Path(out_dir).with_name(Path(out_dir).name + ".work"))
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    style = prompt_style(base_dir)   # train in the prompt the served version will get
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    added = add_marker_tokens(tokenizer, model, markers)
    rows, dropped = [], 0
    for ex in examples:
        r = tokenize_example(tokenizer, ex, cfg.max_length, style)
        if r is None:
            dropped += 1
        else:
            rows.append(r)
    if not rows:
        raise ValueError(f"no SFT example fits (examples: {len(examples)}, dropped as too long/empty: {dropped})")
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained_tokens = sum(r["n_train"] for r in rows)
    if dist.main:
        log.info("SFT: %d examples (%d dropped), %d tokens (%d trained), markers=%s (%d added)",
                 len(rows), dropped, tokens, trained_tokens, markers, len(added))
    if cfg.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise RuntimeError("LoRA needs peft: pip install peft==0.21.2") from e
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          trainable_token_indices={"embed_tokens": [tokenizer.convert_tokens_to_ids(m) for m in added]}
                          if added else None)
        model = get_peft_model(model, lcfg)
    model.to(dist.device)
    pad = tokenizer.pad_token_id

    def forward(m, idx: list[int]) -> torch.Tensor:
        ids, labels, mask = _collate([rows[i] for i in idx], pad, dist.device)
        targets = labels[:, 1:]
        keep = targets != -100
        if dist.world == 1:
            # the LM head only where a loss is taken: the vocabulary projection dominates small models
            hidden = m.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            logits = m.get_output_embeddings()(hidden[keep])
        else:  # DDP must see its own forward
            logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")

    digest = training.digest_rows([[r["input_ids"], r["labels"]] for r in rows])
    fp = cfg.fingerprint(digest, {"base": str(base_dir), "markers": markers, "kind": "sft"})
    report = training.train_loop(model, len(rows), cfg=cfg, dist=dist, work_dir=work_dir, fingerprint=fp,
                                 forward=forward, weight_of=lambda i: rows[i]["n_train"],
                                 tokens_of=lambda i: len(rows[i]["input_ids"]), on_step=on_step, desc="sft")
    info = {"kind": "policy", "few_shot": False, "prompt_style": style, "markers": markers, "base": str(base_dir),
            "train": asdict(cfg), **(metadata or {})}
    if cfg.lora_r > 0 and not added:
        # the adapter is the artifact: the version is the base merged with it at the file level
        # (rstar.lora.merge_into), exactly what a shipped round materialises on a fresh clone
        if dist.main:
            _save_lora_version(model, base_dir, out_dir, cfg, info)
    else:
        if cfg.lora_r > 0:
            model = model.merge_and_unload()
        if dist.main:  # bf16 safetensors + tokenizer + rstar_model.json, atomically
            save_model_dir(out_dir, model, tokenizer, info)
    if dist.main:
        training.remove_checkpoint(work_dir)
    training.barrier(dist)
    report.update(examples=len(rows), dropped=dropped, tokens=tokens, trained_tokens=trained_tokens,
                  markers=markers, markers_added=added, wall_seconds=round(time.monotonic() - t0, 1))
    return report



def _save_lora_version(model, base_dir: Path, out_dir: Path, cfg: training.TrainConfig, info: dict[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    from rstar import lora
    from rstar.artifacts import atomic_dir, read_model_info, write_model_info

    tensors = lora.from_peft_state(get_peft_model_state_dict(model.module if hasattr(model, "module") else model))
    base_info = read_model_info(base_dir)
    with atomic_dir(out_dir) as tmp:
        adapter = lora.save_adapter(Path(tmp).with_name(Path(tmp).name + ".adapter"), tensors, r=cfg.lora_r,
                                    alpha=cfg.lora_alpha, base={"model": base_info.get("model", str(base_dir))})
        try:
            Path(tmp).rmdir()  # merge_into writes a new directory
            lora.merge_into(base_dir, adapter, tmp)
            adapter.replace(Path(tmp) / lora.LORA_FILE)
        finally:
            adapter.unlink(missing_ok=True)
        write_model_info(tmp, {**info, "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "file": lora.LORA_FILE}})
