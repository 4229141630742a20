"""Deterministic fakes of the Policy, Scorer and Executor protocols (tests and benchmarks).

These are fakes of the *protocols* the MCTS core talks to, not of our services:
- `ScriptedPolicy`: a hand-written problem space (prefix -> weighted next steps);
- `WalkPolicy`: an endless arithmetic problem space in the real step format
  (code steps, some failing, a print step, an answer step);
- `HashScorer`: a PPM whose score is a stable hash of the prefix (or a table);
- `InProcessExecutor`: runs the (trusted, test-written) programs with `exec`,
  capturing `print`; an `error` becomes failure "error";
- `SimulatedLatency`: wraps any of them and sleeps like a batched model would;
- `Gated`: wraps any of them; every call waits until the test opens the gate
  (in-flight requests across a hot reload, deadlines, cancellation).
Every answer depends only on the request item (prefix, n, seed), never on the
rest of the batch, as the real services promise.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from typing import Callable, Sequence

from rstar import steps as stepfmt
from rstar.protocols import Candidate, ExecResult, GenerationItem, SamplingParams, Versioned
from rstar.search.mcts import derive_seed


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _body_steps(steps: Sequence[str]) -> list[str]:
    """The generated steps of a prefix (system-written output steps left out)."""
    return [s for s in steps if stepfmt.OUTPUT_START not in s]


class CountingMixin:
    def _count(self, n_items: int) -> None:
        with self._lock:
            self.calls += 1
            self.items += n_items


class ScriptedPolicy(CountingMixin):
    """`script[(step, step, ...)] = [(text, weight), ...]`: the next-step distribution after a prefix.

    Keys are the stripped generated steps so far (output steps excluded). Sampling
    with temperature > 0 draws from the weights with the item's seed; temperature 0
    returns the highest-weight option n times (greedy decoding). With `ordered=True`
    candidate j is option j (cycling), which makes hand-computed trees easy.
    """

    def __init__(self, script: dict[tuple[str, ...], list[tuple[str, float]]], version: str = "scripted-1",
                 ordered: bool = False):
        self.script = {tuple(s.strip() for s in k): v for k, v in script.items()}
        self.ordered = ordered
        self.version = version
        self.calls = 0
        self.items = 0
        self._lock = threading.Lock()

    def options(self, steps: Sequence[str]) -> list[tuple[str, float]]:
        key = tuple(s.strip() for s in _body_steps(steps))
        return self.script.get(key, [])

    def generate(self, items: Sequence[GenerationItem], params: SamplingParams, scope=None):
        self._count(len(items))
        out = []
        for item in items:
            opts = self.options(item.steps)
            cands = []
            for j in range(item.n):
                if not opts:
                    cands.append(Candidate("", "stop", 0))
                    continue
                if params.temperature <= 0:
                    text = max(opts, key=lambda o: o[1])[0]
                elif self.ordered:
                    text = opts[j % len(opts)][0]
                else:
                    rng = random.Random(derive_seed(item.seed, j))
                    text = rng.choices([o[0] for o in opts], weights=[o[1] for o in opts])[0]
                finish = "length" if text.endswith("...") else "stop"   # "..." marks a cut-off step
                cands.append(Candidate(text, finish, _tokens(text)))
            out.append(cands)
        return Versioned(out, self.version, [100] * len(items))


class WalkPolicy(CountingMixin):
    """An arithmetic random walk in the step format: `v = a`, `v = v + r`..., print, answer.

    With probability `p_error` a code step divides by zero (a failed node), with
    `p_length` a candidate is cut by the token limit, and the answer step
    sometimes misreads the output (`p_wrong`), so trees hold every node kind.
    """

    def __init__(self, p_error: float = 0.15, p_length: float = 0.05, p_wrong: float = 0.3,
                 max_code_steps: int = 4, version: str = "walk-1"):
        self.p_error, self.p_length, self.p_wrong = p_error, p_length, p_wrong
        self.max_code_steps = max_code_steps
        self.version = version
        self.calls = 0
        self.items = 0
        self._lock = threading.Lock()

    def _one(self, item: GenerationItem, j: int, max_tokens: int = 256) -> Candidate:
        rng = random.Random(derive_seed(item.seed, j, len(item.steps)))
        body = _body_steps(item.steps)
        if item.steps and stepfmt.OUTPUT_START in item.steps[-1]:
            out = item.steps[-1].split(stepfmt.OUTPUT_START)[1].split(stepfmt.OUTPUT_END)[0].strip()
            try:
                val = int(out)
            except ValueError:
                val = 0
            if rng.random() < self.p_wrong:
                val += rng.choice([-1, 1])
            text = f"\n<answer>From the result, the answer is \\boxed{{{val}}}.<end_of_answer>"
            return Candidate(text, "stop", _tokens(text))
        if rng.random() < self.p_length:
            text = "\n# Step: an endless thought " + "and so on " * 8
            return Candidate(text, "length", max_tokens)   # cut at the token limit
        n = len(body)
        if n >= 1 and (n >= self.max_code_steps or rng.random() < 0.35):
            text = "\n# Now print the final answer\nprint(v)\n<end_of_code>"
        elif rng.random() < self.p_error:
            text = f"\n# Step {n + 1}: divide by the number of boxes.\nv = v // 0\n<end_of_step>"
        elif n == 0:
            text = f"<code>\n# Step 1: Start from the first number.\nv = {rng.randint(1, 9)}\n<end_of_step>"
        else:
            text = f"\n# Step {n + 1}: Add the next amount.\nv = v + {rng.randint(1, 9)}\n<end_of_step>"
        return Candidate(text, "stop", _tokens(text))

    def generate(self, items: Sequence[GenerationItem], params: SamplingParams, scope=None):
        self._count(len(items))
        return Versioned([[self._one(item, j, params.max_tokens) for j in range(item.n)] for item in items],
                         self.version,
                         [_tokens(item.question) + 50 * len(item.steps) for item in items])


class HashScorer(CountingMixin):
    """A PPM whose score of a prefix is a stable hash in [-1, 1], or `table[last step]` when given."""

    def __init__(self, table: dict[str, float] | None = None, version: str = "hash-ppm-1",
                 fn: Callable[[str, tuple[str, ...]], float] | None = None):
        self.table = {k.strip(): v for k, v in (table or {}).items()}
        self.fn = fn
        self.version = version
        self.calls = 0
        self.items = 0
        self._lock = threading.Lock()

    def score_one(self, question: str, steps: tuple[str, ...]) -> float:
        if self.fn is not None:
            return self.fn(question, steps)
        body = _body_steps(steps)
        if body and body[-1].strip() in self.table:
            return self.table[body[-1].strip()]
        h = derive_seed(question, *steps)
        return (h % 20001) / 10000.0 - 1.0

    def score(self, prefixes: Sequence[tuple[str, tuple[str, ...]]], scope=None):
        self._count(len(prefixes))
        return Versioned([self.score_one(q, tuple(s)) for q, s in prefixes], self.version)


class InProcessExecutor(CountingMixin):
    """Runs trusted test programs with `exec`; `print` is captured per program (thread-safe)."""

    def __init__(self):
        self.calls = 0
        self.items = 0
        self._lock = threading.Lock()

    @staticmethod
    def run_one(program: str) -> ExecResult:
        out: list[str] = []

        def _print(*args, sep=" ", end="\n", **_kw):
            out.append(sep.join(str(a) for a in args) + end)

        t0 = time.perf_counter()
        try:
            exec(compile(program, "<step>", "exec"), {"print": _print, "__name__": "__step__"})  # noqa: S102
        except Exception as e:  # noqa: BLE001 - a failing program is a result, not an error
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            return ExecResult("".join(out), tb, "error", time.perf_counter() - t0)
        return ExecResult("".join(out), "", "ok", time.perf_counter() - t0)

    def execute(self, programs: Sequence[str], scope=None):
        self._count(len(programs))
        return [self.run_one(p) for p in programs]


class SimulatedLatency:
    """Wraps a fake and sleeps like a batched engine: `base + per_item * items (+ per_token * max tokens)`.

    The default policy model follows vLLM on 2 CPU cores (environment.md: 34 tok/s
    for one sequence, ~283 tok/s for 32): a decode step costs `step_base +
    step_per_seq * running sequences` seconds; a call runs as many steps as its
    longest candidate has tokens, and a finished sequence leaves the batch
    (continuous batching), so a call costs `step_base * longest + step_per_seq * total tokens`.
    """

    def __init__(self, inner, kind: str, base: float = 0.0, per_item: float = 0.0,
                 step_base: float = 0.0267, step_per_seq: float = 0.0027, time_scale: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.inner, self.kind = inner, kind
        self.base, self.per_item = base, per_item
        self.step_base, self.step_per_seq = step_base, step_per_seq
        self.time_scale = time_scale
        self.sleep = sleep
        self.simulated_seconds = 0.0

    def _wait(self, seconds: float) -> None:
        seconds *= self.time_scale
        self.simulated_seconds += seconds
        self.sleep(seconds)

    def generate(self, items, params, scope=None):
        res = self.inner.generate(items, params, scope=scope)
        tokens = [c.num_tokens for cands in res for c in cands]
        longest = max(tokens, default=0)
        self._wait(self.base + self.per_item * len(items) + self.step_base * longest
                   + self.step_per_seq * sum(tokens))
        return res

    def score(self, prefixes, scope=None):
        res = self.inner.score(prefixes, scope=scope)
        self._wait(self.base + self.per_item * len(prefixes))
        return res

    def execute(self, programs, scope=None):
        res = self.inner.execute(programs, scope=scope)
        self._wait(self.base + self.per_item * len(programs))
        return res

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Gated:
    """Wraps a fake; each call records its scope, sets `entered`, and waits until `gate` is set.

    While it waits, a stopped scope (the caller went away, or its deadline passed)
    ends the call with `Cancelled`/`DeadlineExceeded`, as a real engine would.
    """

    def __init__(self, inner, version: str | None = None):
        self.inner = inner
        self.version = version or getattr(inner, "version", "")
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.scopes: list = []

    def _wait(self, scope) -> None:
        self.scopes.append(scope)
        self.entered.set()
        while not self.gate.wait(0.01):
            if scope is not None:
                scope.check()

    def generate(self, items, params, scope=None):
        self._wait(scope)
        res = self.inner.generate(items, params, scope=scope)
        return Versioned(res, self.version, getattr(res, "prompt_tokens", ()))

    def score(self, prefixes, scope=None):
        self._wait(scope)
        return Versioned(self.inner.score(prefixes, scope=scope), self.version)

    def execute(self, programs, scope=None):
        self._wait(scope)
        return self.inner.execute(programs, scope=scope)

    def __getattr__(self, name):
        return getattr(self.inner, name)
