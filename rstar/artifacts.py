"""The model-artifact format: what a model version directory holds, and how it is written.

A model version directory is an HF checkpoint (config.json, *.safetensors,
tokenizer files) plus, where the trainer wrote it:
- `rstar_model.json` (MODEL_INFO): kind (policy/ppm), parent, round, data used,
  and `few_shot` (whether the policy prompt needs the worked examples);
- `value_head.safetensors` (VALUE_HEAD_FILE): the PPM's Linear(hidden, 1) head,
  keys `value_head.weight` / `value_head.bias`.
The PPM score map is `tanh(raw / SCORE_SCALE)` (`ppm_score`), in [-1, 1].
A directory is written whole or not at all (`save_model_dir`, `atomic_dir`):
into a temporary sibling, renamed into place at the end.

This module owns those names, the score map and the reading/writing of those
files, for the trainer and the services alike. It does not build or load
backbones (`rstar.ppm`, `rstar.local_policy`, `policy_svc` do) and knows
nothing of the registry (`rstar.registry` publishes finished directories).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

MODEL_INFO = "rstar_model.json"
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_PREFIX = "value_head."
SCORE_SCALE = 5.0   # PPM score = tanh(raw / SCORE_SCALE), in [-1, 1]


# --------------------------------------------------------------------------- model info


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """The directory's `rstar_model.json`, or {} when absent or unreadable (logged)."""
    p = Path(model_dir) / MODEL_INFO
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", p, e)
        return {}
    return info if isinstance(info, dict) else {}


def write_model_info(model_dir: str | Path, info: dict[str, Any]) -> None:
    (Path(model_dir) / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))


def model_few_shot(model_dir: str | Path, default: bool) -> bool:
    """Whether the policy prompt needs the worked examples: the model's own word, else `default`."""
    value = read_model_info(model_dir).get("few_shot")
    return value if isinstance(value, bool) else default


def prompt_style(model_dir: str | Path) -> str:
    """How prompts are wrapped for this model (`rstar.steps.PROMPT_STYLES`).

    The model's own word: `prompt_style` in its model info, written when an embedded
    model is converted (`rstar.models`) and by the trainer (a fine-tuned version is
    prompted as it was trained). A directory without one gets the paper's plain `rstar`
    format; write `{"prompt_style": "chatml"}` into its rstar_model.json to change that.
    """
    from rstar.steps import PROMPT_STYLES

    value = read_model_info(model_dir).get("prompt_style")
    return value if value in PROMPT_STYLES else "rstar"


# --------------------------------------------------------------------------- PPM value head and score map


def ppm_score(raw):
    """The PPM score map: raw head outputs (a tensor) -> tanh(raw / SCORE_SCALE), float32."""
    import torch

    return torch.tanh(raw.float() / SCORE_SCALE)


def save_value_head(head, model_dir: str | Path) -> Path:
    """Write the value head's parameters (`head` is the Linear(hidden, 1)) as VALUE_HEAD_FILE."""
    from safetensors.torch import save_file

    path = Path(model_dir) / VALUE_HEAD_FILE
    save_file({VALUE_HEAD_PREFIX + k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def load_value_head(head, model_dir: str | Path) -> bool:
    """Load VALUE_HEAD_FILE into `head` if the directory has one; False when it has none."""
    path = Path(model_dir) / VALUE_HEAD_FILE
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    state = load_file(str(path))
    head.load_state_dict({k.removeprefix(VALUE_HEAD_PREFIX): v for k, v in state.items()})
    return True


# --------------------------------------------------------------------------- writing a directory


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Write a directory whole or not at all: yields a temporary sibling, which replaces
    `out_dir` when the block succeeds and is removed when it raises."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.save-", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "d")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old is not None:  # put the previous directory back
                os.rename(old / "d", out_dir)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` for the block: several processes that prepare the
    same directory (the policy and PPM services starting together) do it once; the others wait,
    logging that `what` is being prepared by another process."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", what)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_model_dir(out_dir: str | Path, model, tokenizer, info: dict[str, Any], value_head=None) -> Path:
    """A model version directory, atomically: `model` as bf16 safetensors (its dtype is restored
    afterwards), the tokenizer, `value_head` (a PPM's head) when given, and `rstar_model.json`."""
    import torch

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        dtype = next(model.parameters()).dtype
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.to(dtype)
        tokenizer.save_pretrained(tmp)
        if value_head is not None:
            save_value_head(value_head, tmp)
        write_model_info(tmp, info)
    return out_dir
