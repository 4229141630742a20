"""A local transformers causal LM as the engine's `Policy` (greedy at temperature 0, else seeded sampling).

Used by `rstar eval` and `rstar evolve` when no policy service is given. An
item's candidates depend on the item alone (question, steps, n, seed), never on
the rest of the batch: each item is generated on its own (its n candidates as
one batch of identical prompts, so no padding), and each candidate samples from
its own generator seeded from (item seed, candidate index), not from torch's
global RNG. It does not serve: no batching across callers, no hot reload (that
is `policy_svc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rstar import steps as stepfmt
from rstar.artifacts import model_few_shot, prompt_style


class HFPolicy:
    """A transformers causal LM as the search engine's `Policy`, one item at a time (see the module doc)."""

    def __init__(self, model_dir: str | Path, few_shot: bool | None = None, batch_size: int = 8,
                 version: str = "", threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.few_shot = model_few_shot(model_dir, True) if few_shot is None else few_shot
        self.prompt_style = prompt_style(model_dir)
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

    def _complete(self, prompt: str, seeds: list[int], params) -> tuple[list[tuple[str, str, int]], int]:
        """Completions of one prompt, one per seed (`batch_size` rows per forward at most);
        returns them and the prompt's token count."""
        import torch

        out: list[tuple[str, str, int]] = []
        greedy = params.temperature <= 0
        prompt_tokens = 0
        for b in range(0, len(seeds), self.batch_size):
            chunk_seeds = seeds[b:b + self.batch_size]
            enc = self.tok([prompt] * len(chunk_seeds), return_tensors="pt").to(self.device)  # same prompt: no padding
            prompt_tokens = int(enc["input_ids"].shape[1])
            # the same stop strings as every policy (a step means the same whoever wrote it)
            kw: dict[str, Any] = dict(max_new_tokens=params.max_tokens, stop_strings=list(stepfmt.GENERATION_STOPS),
                                      tokenizer=self.tok, pad_token_id=self.tok.pad_token_id)
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if not greedy:  # sampled by a processor that owns one generator per row; greedy then takes its pick
                kw["logits_processor"] = _row_sampler(chunk_seeds, params.temperature, params.top_p, self.device)
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kw)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = self.tok.decode(row, skip_special_tokens=False)
                for s in self._strip:
                    text = text.replace(s, "")
                cut = [(text.find(s) + len(s)) for s in stepfmt.GENERATION_STOPS if s in text]
                n_tok = int((row != self.tok.pad_token_id).sum())
                if cut:
                    out.append((text[:min(cut)], "stop", n_tok))
                else:
                    out.append((text, "length" if n_tok >= params.max_tokens else "stop", n_tok))
        return out, prompt_tokens

    def generate(self, items, params, scope=None):
        """n candidates per item; candidate j of an item depends only on the item and j."""
        from rstar.protocols import Candidate, Versioned
        from rstar.search.mcts import derive_seed

        res: list[list] = []
        prompt_tokens: list[int] = []
        for it in items:
            if scope is not None:
                scope.check()  # stop between items once the caller is gone
            prompt = stepfmt.render_prompt(it.question, list(it.steps), few_shot=self.few_shot, style=self.prompt_style)
            if params.temperature <= 0:  # greedy: every candidate is the same, decode it once
                done, ptoks = self._complete(prompt, [0], params)
                done = done * it.n
            else:
                done, ptoks = self._complete(prompt, [derive_seed(it.seed, j) for j in range(it.n)], params)
            res.append([Candidate(text, reason, n) for text, reason, n in done])
            prompt_tokens.append(ptoks)
        return Versioned(res, model_version=self.version, prompt_tokens=prompt_tokens)


def _row_sampler(seeds: list[int], temperature: float, top_p: float, device):
    """A logits processor that samples row r's next token (temperature, nucleus top_p) from its own
    generator seeded with seeds[r], and leaves only that token possible."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class RowSampler(LogitsProcessor):
        def __init__(self):
            self.gens = [torch.Generator(device=device).manual_seed(s & 0x7FFFFFFFFFFFFFFF) for s in seeds]

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, idx = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p (>= 1 token)
                probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
            picked = torch.full_like(scores, float("-inf"))
            for r, gen in enumerate(self.gens):
                picked[r, torch.multinomial(probs[r], 1, generator=gen)] = 0.0
            return picked

    return LogitsProcessorList([RowSampler()])
