"""A local transformers causal LM as the engine's `Policy` (batched; greedy at temperature 0).

Used by `rstar eval` and `rstar evolve` when no policy service is given. It does
not serve: no batching across callers, no hot reload (that is `policy_svc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rstar import steps as stepfmt
from rstar.artifacts import model_few_shot


class HFPolicy:
    """A transformers causal LM as the search engine's `Policy` (batched; greedy at temperature 0)."""

    def __init__(self, model_dir: str | Path, few_shot: bool | None = None, batch_size: int = 8,
                 version: str = "", threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.few_shot = model_few_shot(model_dir, True) if few_shot is None else few_shot
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.version = version or Path(model_dir).name
        self._strip = [t for t in {self.tok.pad_token, self.tok.eos_token} if t]

    def _complete(self, prompts: list[str], seeds: list[int], params) -> list[tuple[str, str, int]]:
        import torch

        out: list[tuple[str, str, int]] = []
        greedy = params.temperature <= 0
        for b in range(0, len(prompts), self.batch_size):
            chunk = prompts[b:b + self.batch_size]
            enc = self.tok(chunk, return_tensors="pt", padding=True).to(self.device)
            kw: dict[str, Any] = dict(max_new_tokens=params.max_tokens, stop_strings=list(stepfmt.STOP_STRINGS),
                                      tokenizer=self.tok, pad_token_id=self.tok.pad_token_id)
            if greedy:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                torch.manual_seed(seeds[b] & 0x7FFFFFFF)
                kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kw)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = self.tok.decode(row, skip_special_tokens=False)
                for s in self._strip:
                    text = text.replace(s, "")
                cut = [(text.find(s) + len(s)) for s in stepfmt.STOP_STRINGS if s in text]
                n_tok = int((row != self.tok.pad_token_id).sum())
                if cut:
                    out.append((text[:min(cut)], "stop", n_tok))
                else:
                    out.append((text, "length" if n_tok >= params.max_tokens else "stop", n_tok))
        return out

    def generate(self, items, params, scope=None):
        from rstar.protocols import Candidate, Versioned

        prompts, seeds, owners = [], [], []
        for i, it in enumerate(items):
            for j in range(it.n):
                prompts.append(stepfmt.render_prompt(it.question, list(it.steps), few_shot=self.few_shot))
                seeds.append(it.seed + j)
                owners.append(i)
        done = self._complete(prompts, seeds, params)
        res: list[list] = [[] for _ in items]
        for i, (text, reason, n) in zip(owners, done):
            res[i].append(Candidate(text, reason, n))
        return Versioned(res, model_version=self.version)
