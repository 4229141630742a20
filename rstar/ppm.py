"""PPM core: the policy backbone + a value head, scoring (question, steps) prefixes.

Score = tanh(Linear(h_last) / 5), h_last the final hidden state of the last
token of the rendered prefix (spec section 3). The value head lives in
`value_head.safetensors` beside the backbone; a model without one (the base
version) gets a freshly initialised head from a fixed seed, so scores are
reproducible. Prefixes are sorted by length and scored in padded batches.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch
from torch import nn

from rstar import metrics, steps

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """Backbone (AutoModel, no LM head) + Linear(hidden, 1)."""

    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw value of the last real token of each row (left padding)."""
        # explicit positions: with left padding a row's scores must not depend on its batch
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        h = out.last_hidden_state[:, -1, :]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)


def load_value_model(model_dir: str | Path, head_seed: int = 0, dtype=torch.float32) -> tuple[ValueModel, object]:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModel.from_pretrained(model_dir, dtype=dtype)
    hidden = backbone.config.hidden_size
    gen = torch.Generator().manual_seed(head_seed)
    model = ValueModel(backbone, hidden)
    head_path = model_dir / VALUE_HEAD_FILE
    if head_path.is_file():
        state = load_file(str(head_path))
        model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()})
        log.info("value head loaded from %s", head_path)
    else:
        with torch.no_grad():
            bound = 1.0 / hidden ** 0.5
            model.value_head.weight.copy_(torch.empty(1, hidden).uniform_(-bound, bound, generator=gen))
            model.value_head.bias.zero_()
        log.info("no %s in %s: value head freshly initialised (seed %d)", VALUE_HEAD_FILE, model_dir, head_seed)
    model.eval()
    return model, tokenizer


def save_value_head(model: ValueModel, model_dir: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({f"value_head.{k}": v.contiguous() for k, v in model.value_head.state_dict().items()},
              str(Path(model_dir) / VALUE_HEAD_FILE))


def render(question: str, prefix_steps: list[str]) -> str:
    """The PPM's input: question + steps, without few-shot examples."""
    return steps.render_prompt(question, prefix_steps, few_shot=False)


class PPMScorer:
    def __init__(self, model_dir: str | Path, version: str, head_seed: int = 0, batch_size: int = 16,
                 max_length: int = 2048):
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = threading.Lock()
        self._infer = threading.Lock()  # one forward at a time: torch already uses every core
        start = time.monotonic()
        self.model, self.tokenizer = load_value_model(model_dir, head_seed)
        self.version = version
        self.model_dir = str(model_dir)
        self.head_seed = head_seed
        log.info("PPM %s loaded in %.1f s", version, time.monotonic() - start)

    @torch.inference_mode()
    def score(self, prefixes: list[tuple[str, list[str]]]) -> tuple[list[float], str]:
        with self._lock:
            model, tok, version = self.model, self.tokenizer, self.version
        texts = [render(q, s) for q, s in prefixes]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with self._infer:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length)
                raw = model(enc["input_ids"], enc["attention_mask"])
                vals = torch.tanh(raw.float() / 5.0).tolist()
                for i, v in zip(idx, vals):
                    scores[i] = float(v)
        metrics.PPM_SCORED.inc(len(texts))
        metrics.PPM_BATCH_PREFIXES.observe(len(texts))
        return scores, version

    def swap(self, model_dir: str | Path, version: str) -> None:
        model, tok = load_value_model(model_dir, self.head_seed)
        with self._lock:
            self.model, self.tokenizer, self.version, self.model_dir = model, tok, version, str(model_dir)
