"""The model-artifact format: what a model directory holds besides the HF files.

A model version directory is an HF checkpoint (config.json, *.safetensors,
tokenizer files) plus, where the trainer wrote it:
- `rstar_model.json` (MODEL_INFO): kind (policy/ppm), parent, round, data used,
  and `few_shot` (whether the policy prompt needs the worked examples);
- `value_head.safetensors` (VALUE_HEAD_FILE): the PPM's Linear(hidden, 1) head.
The PPM score map is `tanh(raw / SCORE_SCALE)`.

This module owns the names and the reading/writing of those files; it does not
load backbones (`rstar.ppm`, `rstar.local_policy`, `policy_svc` do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_INFO = "rstar_model.json"
VALUE_HEAD_FILE = "value_head.safetensors"
SCORE_SCALE = 5.0   # PPM score = tanh(raw / SCORE_SCALE), in [-1, 1]


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
