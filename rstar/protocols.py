"""The engine protocols and their value types: the one set every part speaks.

`Policy` (candidate next steps), `Scorer` (PPM scores of prefixes) and `Executor`
(run step programs) are what the MCTS engine talks to; the policy service's core,
the gRPC clients (`rstar.clients`), the local transformers policy and the test
fakes all implement them with these types. `CallScope` carries one request's
stop flag and deadline into every call. Nothing here does I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Candidate:
    text: str
    finish_reason: str = "stop"   # "stop" (a stop string or end of sequence) or "length"
    num_tokens: int = 0


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str = ""
    failure: str = "ok"           # "ok", "error", "timeout", "memory", "killed", "output_limit"
    duration: float = 0.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256


@dataclass(frozen=True)
class GenerationItem:
    question: str
    steps: tuple[str, ...]
    n: int
    seed: int


class Versioned(list):
    """A list of results that remembers the model version that produced it ("" if unknown).

    Policies may also report the prompt tokens of each item (`prompt_tokens`).
    """

    def __init__(self, items=(), model_version: str = "", prompt_tokens: Sequence[int] = ()):
        super().__init__(items)
        self.model_version = model_version
        self.prompt_tokens = list(prompt_tokens)


class Policy(Protocol):
    def generate(self, items: Sequence[GenerationItem], params: SamplingParams,
                 scope: CallScope | None = None) -> Versioned:
        """`item.n` candidates per item (a `Versioned` list of lists of `Candidate`).

        Contract (tests/test_policy_contract.py): an item's candidates depend on its own
        seed and prefix, never on the rest of the batch; a candidate that stopped at a stop
        string ends with it (`rstar.steps.GENERATION_STOPS`); `finish_reason` is "stop" or
        "length"; the result carries the model version.
        """


class Scorer(Protocol):
    def score(self, prefixes: Sequence[tuple[str, tuple[str, ...]]], scope: CallScope | None = None) -> Versioned:
        """PPM score in [-1, 1] of each (question, steps) prefix (a `Versioned` list of floats)."""


class Executor(Protocol):
    def execute(self, programs: Sequence[str], scope: CallScope | None = None) -> list[ExecResult]:
        """Run the programs (concurrently), results in order."""


class RequestRejected(ValueError):
    """The model cannot serve this input (e.g. a prompt longer than its context): the
    caller's error (INVALID_ARGUMENT), and only this request fails."""


class Cancelled(Exception):
    """The caller went away (or asked to stop); pending work was dropped."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before the search finished."""


class CallScope:
    """Stop flag + deadline shared by one request's engine run and its downstream calls.

    `on_stop` registers callbacks (e.g. cancelling an in-flight gRPC future) that
    run once when the scope is stopped, so nothing needs to poll.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline            # time.monotonic() value, or None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""

    def stop(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            self.reason = reason
            self._stopped.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # noqa: BLE001 - a failing canceller must not mask the stop
                log.exception("stop callback failed")

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait(self, seconds: float) -> bool:
        return self._stopped.wait(seconds)

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register `callback`; returns a function that unregisters it."""
        with self._lock:
            if not self._stopped.is_set():
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback) -> None:
        with self._lock:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop("deadline")
        if self.stopped:
            if self.reason == "deadline":
                raise DeadlineExceeded("deadline exceeded")
            raise Cancelled(self.reason or "cancelled")
