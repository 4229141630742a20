"""PPM core: the policy backbone + a value head, scoring (question, steps) prefixes.

Score = `rstar.artifacts.ppm_score(Linear(h_last))` = tanh(raw / 5), h_last the
final hidden state of the last token of the rendered prefix (spec section 3).
The value head lives in `value_head.safetensors` beside the backbone (format:
`rstar.artifacts`); a model without one (the base version) gets a freshly
initialised head from a fixed seed, so scores are reproducible. `PPMScorer`
implements the engine's `Scorer` protocol: prefixes sorted by length, scored in
padded batches, the model version on the result.

Not here: gRPC (`ppm_svc`), hot reload (`rstar.reload.ModelSlot` swaps whole
scorers), training (`trainer.ppm_train`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rstar import metrics, steps
from rstar.artifacts import VALUE_HEAD_FILE, load_value_head, ppm_score, prompt_style
from rstar.protocols import CallScope, Versioned

log = logging.getLogger(__name__)


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
    if load_value_head(model.value_head, model_dir):
        log.info("value head loaded from %s", model_dir / VALUE_HEAD_FILE)
    else:
        with torch.no_grad():
            bound = 1.0 / hidden ** 0.5
            model.value_head.weight.copy_(torch.empty(1, hidden).uniform_(-bound, bound, generator=gen))
            model.value_head.bias.zero_()
        log.info("no %s in %s: value head freshly initialised (seed %d)", VALUE_HEAD_FILE, model_dir, head_seed)
    model.eval()
    return model, tokenizer


def build_ppm_dir(policy_dir: str | Path, value_head_file: str | Path, out_dir: str | Path, info: dict) -> Path:
    """A PPM model directory from a policy backbone and a value-head file: what the trainer's
    head-only mode writes (the backbone saved by `save_model_dir`, the head, the model info)."""
    from safetensors.torch import load_file

    from rstar.artifacts import VALUE_HEAD_PREFIX, save_model_dir

    model, tok = load_value_model(policy_dir, dtype=torch.float32)
    state = load_file(str(value_head_file))
    model.value_head.load_state_dict({k.removeprefix(VALUE_HEAD_PREFIX): v for k, v in state.items()})
    return save_model_dir(out_dir, model.backbone, tok, info, value_head=model.value_head)


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return n


def render(question: str, prefix_steps: Sequence[str], style: str = "rstar") -> str:
    """The PPM's input: question + steps, without few-shot examples, in the backbone's prompt style."""
    return steps.render_prompt(question, list(prefix_steps), few_shot=False, style=style)


class PPMScorer:
    """One loaded PPM version as the engine's `Scorer`; thread-safe (one forward at a time)."""

    def __init__(self, model_dir: str | Path, version: str, head_seed: int = 0, batch_size: int = 16,
                 max_length: int = 2048, prefix_reuse: bool = True, min_shared_tokens: int = 16):
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefix_reuse = prefix_reuse
        self.min_shared_tokens = min_shared_tokens
        self._infer = threading.Lock()  # one forward at a time: torch already uses every core
        start = time.monotonic()
        self.model, self.tokenizer = load_value_model(model_dir, head_seed)
        self.version = version
        self.model_dir = str(model_dir)
        self.prompt_style = prompt_style(model_dir)
        self.head_seed = head_seed
        log.info("PPM %s loaded in %.1f s", version, time.monotonic() - start)

    @torch.inference_mode()
    def score(self, prefixes: Sequence[tuple[str, Sequence[str]]], scope: CallScope | None = None) -> Versioned:
        """PPM score in [-1, 1] of each (question, steps) prefix, in order; stops between
        batches (Cancelled / DeadlineExceeded) once `scope` is stopped or past its deadline.

        Siblings (prefixes that differ only in their last step, as an expansion's k children
        do) share their common tokens: with `prefix_reuse`, those are encoded once and each
        sibling only runs its own tokens on a copy of that KV cache (`_score_group`); the
        rest are batched by length with left padding."""
        texts = [render(q, s, self.prompt_style) for q, s in prefixes]
        scores = [0.0] * len(texts)
        with self._infer:
            rest = list(range(len(texts)))
            if self.prefix_reuse and len(texts) > 1:
                rest = self._score_siblings(prefixes, texts, scores, scope)
            order = sorted(rest, key=lambda i: len(texts[i]))
            for b in range(0, len(order), self.batch_size):
                if scope is not None:
                    scope.check()
                idx = order[b:b + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length)
                vals = ppm_score(self.model(enc["input_ids"], enc["attention_mask"])).tolist()
                for i, v in zip(idx, vals):
                    scores[i] = float(v)
        metrics.PPM_SCORED.inc(len(texts))
        metrics.PPM_BATCH_PREFIXES.observe(len(texts))
        return Versioned(scores, self.version)

    def _score_siblings(self, prefixes, texts, scores, scope) -> list[int]:
        """Score groups of siblings with a shared KV cache; returns the indices left to score."""
        groups: dict[tuple, list[int]] = {}
        for i, (q, s) in enumerate(prefixes):
            groups.setdefault((q, tuple(s[:-1])), []).append(i)
        rest: list[int] = []
        for members in groups.values():
            if len(members) < 2:
                rest += members
                continue
            ids = [self.tokenizer(texts[i], add_special_tokens=True)["input_ids"] for i in members]
            if max(len(x) for x in ids) > self.max_length:   # truncated inputs share no prefix
                rest += members
                continue
            shared = _common_prefix_len(ids)
            if shared < self.min_shared_tokens:
                rest += members
                continue
            if scope is not None:
                scope.check()
            for i, v in zip(members, self._score_group(ids, shared, scope)):
                scores[i] = v
        return rest

    def _score_group(self, ids: list[list[int]], shared: int, scope) -> list[float]:
        import copy

        backbone, head = self.model.backbone, self.model.value_head
        # a sibling must keep at least one token of its own: its score is its last token's state
        shared = min(shared, min(len(x) for x in ids) - 1)
        pre = backbone(input_ids=torch.tensor([ids[0][:shared]]), use_cache=True)
        out: list[float] = []
        for b in range(0, len(ids), self.batch_size):
            if scope is not None and b:
                scope.check()
            chunk = [x[shared:] for x in ids[b:b + self.batch_size]]
            n, width = len(chunk), max(len(x) for x in chunk)
            pad = self.tokenizer.pad_token_id or 0
            suffix = torch.tensor([x + [pad] * (width - len(x)) for x in chunk])          # right padding:
            mask = torch.tensor([[1] * (shared + len(x)) + [0] * (width - len(x)) for x in chunk])  # pads come after
            cache = copy.deepcopy(pre.past_key_values)                                      # the token we read
            cache.batch_repeat_interleave(n)
            positions = torch.arange(shared, shared + width).unsqueeze(0).expand(n, -1)
            h = backbone(input_ids=suffix, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).last_hidden_state
            last = h[torch.arange(n), torch.tensor([len(x) - 1 for x in chunk])]
            out += ppm_score(head(last.to(head.weight.dtype)).squeeze(-1)).tolist()
        return out

    def close(self) -> None:
        """Drop the weights (the slot calls this once no request holds this version)."""
        with self._infer:
            self.model = None
