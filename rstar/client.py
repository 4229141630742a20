"""The Python client of the search service, for production users.

    from rstar.client import SearchClient

    with SearchClient("127.0.0.1:50054") as client:                # the search service `rstar up` starts
        result = client.solve("What is 12 times 3?", rollouts=4, candidates=4)
        print(result.answer, result.stats.nodes, result.model_versions)

`SearchClient` wraps the SearchService RPCs (proto/rstar/v1/search.proto):
`solve()` (unary `Solve`), `solve_stream()` (`SolveStream`: typed progress events,
the last one carrying the result, cancellable), `synthesize()` (`Synthesize`:
progress, one event per finished tree, then the shard's summary) and `info()`.
What it does for every call:
- a deadline (`deadline=` seconds for that call, else the client's `timeout`);
- retries of UNAVAILABLE with jittered exponential backoff while attempts
  (`retries`), the retry budget (`retry_budget_s`) and the call's deadline all
  allow, for unary calls and for a stream that failed before its first message
  (a search is seeded and read-only, so re-running it is safe; a stream that
  already delivered events is never re-run); `wait_for_ready=True` makes a call
  wait for an unreachable server until its deadline instead of failing fast;
- a token as `authorization: Bearer <token>` metadata: call credentials over TLS,
  plain metadata on an insecure channel (loopback only unless
  `allow_insecure_token=True`: a bearer token must not cross a network in clear);
  without `token=`, $RSTAR_TOKEN, else, to a loopback address, the token `rstar up`
  wrote to $RSTAR_HOME/auth/user.token (`rstar.auth.user_token`); `token=""` sends none;
- TLS with `grpc.ssl_channel_credentials` (`root_certs`, optional client
  certificate for mutual TLS), each given as a path or as PEM bytes;
- typed results: frozen dataclasses with `.to_dict()` (JSON-ready), never raw
  protobuf; `SolveResult.raw` keeps the `SolveResponse` as an escape hatch;
- errors as `SearchError` subclasses (`InvalidArgument`, `ResourceExhausted`,
  `DeadlineExceeded`, `Unavailable`, `AuthError`, `Cancelled`) with the gRPC
  `code` and the server's one-line `message`.

Not here: the internal clients of the policy, PPM and sandbox services
(`rstar.clients`), any server-side validation (the service decides what a valid
request is; the client only maps Python arguments onto the request), load
balancing beyond what a gRPC target string gives, and printing (the CLI formats
results: `rstar_cli/solve.py`).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar, Union

import grpc

from rstar import auth
from rstar import steps as stepfmt
from rstar.services import SERVICES
from rstar.v1 import common_pb2, search_pb2, search_pb2_grpc

DEFAULT_ADDRESS = f"127.0.0.1:{SERVICES['search'].port}"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the services' limit (rstar.server; not imported: a client needs no server code)

__all__ = [
    "SearchClient", "DEFAULT_ADDRESS",
    "SolveResult", "Step", "Trajectory", "Alternative", "SearchStats", "StageTimes", "ServiceInfo",
    "SolveProgress", "SolveDone", "SolveEvent",
    "Problem", "SynthesisProgress", "TreeDone", "SynthesisDone", "SynthesisResult", "SynthesisEvent",
    "EventStream",
    "SearchError", "InvalidArgument", "ResourceExhausted", "DeadlineExceeded", "Unavailable", "AuthError",
    "Cancelled",
]


# ---------------------------------------------------------------- errors


class SearchError(Exception):
    """A failed call: `code` (a `grpc.StatusCode`) and the server's one-line `message`."""

    def __init__(self, code: grpc.StatusCode, message: str = ""):
        Exception.__init__(self, f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __reduce__(self):
        return type(self), (self.code, self.message)


class InvalidArgument(SearchError, ValueError):
    """INVALID_ARGUMENT: the request is malformed (empty problem, negative budget, ...)."""


class ResourceExhausted(SearchError):
    """RESOURCE_EXHAUSTED: a budget above the server's limits, or its search queue is full."""


class DeadlineExceeded(SearchError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline passed (the server stopped the search)."""


class Unavailable(SearchError, ConnectionError):
    """UNAVAILABLE after the retries: the server is unreachable, loading, or draining."""


class AuthError(SearchError):
    """UNAUTHENTICATED or PERMISSION_DENIED: a missing, wrong or insufficient token."""


class Cancelled(SearchError):
    """CANCELLED: the call was cancelled (by this client, or by the server shutting down)."""


_ERRORS: dict[grpc.StatusCode, type[SearchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _error(e: grpc.RpcError) -> SearchError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return _ERRORS.get(code, SearchError)(code, details or "")


# ---------------------------------------------------------------- typed results


class _Record:
    """`to_dict()`: the dataclass as plain JSON-ready values (the `raw` escape hatch left out)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "raw"}  # type: ignore[arg-type]


def _plain(v: Any) -> Any:
    if isinstance(v, _Record):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# terminal kinds of a step: it reached an answer; it failed; it ends its trajectory without either
# (every continuation failed); an inner step whose every continuation is terminal (fully explored)
ANSWER, FAILURE, DEAD_END, EXHAUSTED = "answer", "failure", "dead_end", "exhausted"


@dataclass(frozen=True)
class Step(_Record):
    """One step of a trajectory, as the search saw it."""

    index: int
    text: str                   # as generated (step markers included)
    code: str                   # the python of this step ("" for an answer step)
    output: str                 # stdout of the program that verified it (on the step that ends a code block)
    q: float                    # MCTS value Q
    visits: int                 # MCTS visit count N
    ppm_score: float
    terminal: bool
    failure: str                # "" or why it failed: a sandbox failure ("error", "timeout", ...), "depth", "length"
    terminal_kind: str          # "" (not terminal), "answer", "failure", "dead_end", "exhausted" (see above)
    answer: str | None          # the \boxed{} answer of an answer step
    ends_code: bool             # the step closes its code block: the program ran, `output` is its stdout

    @classmethod
    def from_proto(cls, s: search_pb2.Step, last: bool = True) -> "Step":
        """`last`: the step ends its trajectory (an inner step is never a dead end)."""
        answer = stepfmt.extract_boxed(s.text)
        if s.failure:
            kind = FAILURE
        elif answer is not None:
            kind = ANSWER
        elif s.terminal:
            kind = DEAD_END if last else EXHAUSTED
        else:
            kind = ""
        return cls(index=s.index, text=s.text, code=s.code, output=s.output, q=s.q, visits=s.visits,
                   ppm_score=s.ppm_score, terminal=s.terminal, failure=s.failure, terminal_kind=kind,
                   answer=answer, ends_code=stepfmt.END_OF_CODE in s.text)


def _steps(steps) -> list[Step]:
    return [Step.from_proto(s, last=i == len(steps) - 1) for i, s in enumerate(steps)]


@dataclass(frozen=True)
class Trajectory(_Record):
    steps: list[Step]
    answer: str
    final_score: float          # PPM score of the final step
    mean_q: float
    seed: int                   # the seed of the tree it came from

    @classmethod
    def from_proto(cls, t: search_pb2.Trajectory) -> "Trajectory":
        return cls(steps=_steps(t.steps), answer=t.answer, final_score=t.final_score,
                   mean_q=t.mean_q, seed=t.seed)


@dataclass(frozen=True)
class Alternative(_Record):
    """One distinct answer the search reached."""

    answer: str
    votes: int                  # trajectories reaching it
    best_score: float           # best final PPM score among them
    weighted_score: float       # sum of (final score + 1) / 2 over them


@dataclass(frozen=True)
class StageTimes(_Record):
    generate_seconds: float
    ppm_seconds: float
    sandbox_seconds: float
    other_seconds: float        # search bookkeeping and queueing
    total_seconds: float


@dataclass(frozen=True)
class SearchStats(_Record):
    rollouts: int
    trees: int
    nodes: int
    generated_tokens: int
    prompt_tokens: int
    executions: int
    policy_calls: int
    ppm_calls: int
    sandbox_calls: int
    stop_reason: str            # "budget", "tokens", "wall_time", "exhausted"
    times: StageTimes

    @classmethod
    def from_proto(cls, s: search_pb2.SearchStats) -> "SearchStats":
        t = s.times
        return cls(rollouts=s.rollouts, trees=s.trees, nodes=s.nodes, generated_tokens=s.generated_tokens,
                   prompt_tokens=s.prompt_tokens, executions=s.executions, policy_calls=s.policy_calls,
                   ppm_calls=s.ppm_calls, sandbox_calls=s.sandbox_calls, stop_reason=s.stop_reason,
                   times=StageTimes(t.generate_seconds, t.ppm_seconds, t.sandbox_seconds, t.other_seconds,
                                    t.total_seconds))


def _versions(models) -> dict[str, str]:
    return {m.name: m.version for m in models}


@dataclass(frozen=True)
class SolveResult(_Record):
    """What a search found: the answer, the winning trajectory, the alternatives, the stats."""

    answer: str                 # "" when no trajectory reached an answer
    strategy: str               # "top_ppm", "majority_vote", "ppm_weighted_vote"
    trajectory: list[Step]      # the winning trajectory (a partial one when no answer was reached)
    final_score: float          # its final PPM score
    mean_q: float
    seed: int
    alternatives: list[Alternative]
    trajectories: list[Trajectory]      # every finished trajectory, best final score first
    stats: SearchStats
    model_versions: dict[str, str]      # {"policy": ..., "ppm": ...}: the versions that produced it
    raw: Any = field(default=None, repr=False, compare=False)   # the SolveResponse (escape hatch)
    trajectories_total: int = 0   # finished trajectories found (the response lists the best few)
    alternatives_total: int = 0   # distinct answers found (likewise)

    @classmethod
    def from_proto(cls, r: search_pb2.SolveResponse) -> "SolveResult":
        t = r.trajectory
        return cls(answer=r.answer, strategy=r.strategy, trajectory=_steps(t.steps),
                   final_score=t.final_score, mean_q=t.mean_q, seed=t.seed,
                   alternatives=[Alternative(a.answer, a.votes, a.best_score, a.weighted_score)
                                 for a in r.alternatives],
                   trajectories=[Trajectory.from_proto(x) for x in r.trajectories],
                   stats=SearchStats.from_proto(r.stats), model_versions=_versions(r.model_versions), raw=r,
                   # a server older than the totals sends 0: the lists are then complete
                   trajectories_total=max(r.trajectories_total, len(r.trajectories)),
                   alternatives_total=max(r.alternatives_total, len(r.alternatives)))


@dataclass(frozen=True)
class SolveProgress(_Record):
    """Sent after each rollout of a `solve_stream`."""

    rollouts_done: int
    rollouts_total: int
    best_answer: str
    best_score: float
    generated_tokens: int
    executions: int
    elapsed_seconds: float


@dataclass(frozen=True)
class SolveDone(_Record):
    """The last event of a `solve_stream`."""

    result: SolveResult


SolveEvent = Union[SolveProgress, SolveDone]


@dataclass(frozen=True)
class Problem(_Record):
    """A synthesis problem with its gold answer."""

    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class SynthesisProgress(_Record):
    problems_done: int
    problems_total: int
    solved: int
    rollouts_done: int
    generated_tokens: int
    elapsed_seconds: float


@dataclass(frozen=True)
class TreeDone(_Record):
    """One problem's tree is finished (and stored, with `store=True`)."""

    problem_id: str
    solved: bool                # some terminal reached the gold answer
    nodes: int
    tree: dict | None           # the schema-versioned tree (`rstar.trees`), with `return_trees=True`


@dataclass(frozen=True)
class SynthesisResult(_Record):
    shard_key: str              # object key of the stored shard ("" if not stored)
    problems: int
    solved: int
    stats: SearchStats
    model_versions: dict[str, str]
    trees: list[TreeDone]       # every TreeDone event of the stream, in arrival order


@dataclass(frozen=True)
class SynthesisDone(_Record):
    """The last event of a `synthesize` stream."""

    result: SynthesisResult


SynthesisEvent = Union[SynthesisProgress, TreeDone, SynthesisDone]


@dataclass(frozen=True)
class ServiceInfo(_Record):
    ready: bool
    models: dict[str, str]
    details: dict[str, str]


# ---------------------------------------------------------------- streams

E = TypeVar("E")


class EventStream(Generic[E]):
    """An iterator of typed events of one streaming call; the last event carries the result.

    The call starts when the stream is created. `cancel()` (or `close()`, or leaving a
    `with` block early) cancels the RPC, which stops the search on the server; iteration
    then ends. `result()` drains the stream and returns the final result.
    """

    def __init__(self, client: "SearchClient", method, request, timeout: float,
                 convert: Callable[[Any], E | None], done_type: type, what: str):
        self._client = client
        self._method = method
        self._request = request
        self._end = time.monotonic() + timeout
        self._convert = convert
        self._done_type = done_type
        self._what = what
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._received = False
        self._finished = False
        self._final: E | None = None
        self._attempts = 0
        self._retry_end = time.monotonic() + client.retry_budget_s
        self._delay = client.backoff
        self._call = self._start()

    def _start(self):
        self._attempts += 1
        return self._method(self._request, timeout=max(0.001, self._end - time.monotonic()),
                            **self._client._call_kwargs())

    def __iter__(self) -> "EventStream[E]":
        return self

    def __next__(self) -> E:
        while True:
            if self._finished or self._cancelled.is_set():
                raise StopIteration
            try:
                msg = next(self._call)
            except StopIteration:
                self._finished = True
                raise
            except grpc.RpcError as e:
                if self._cancelled.is_set():
                    self._finished = True
                    raise StopIteration from None
                if not self._received and self._client._retry_wait(
                        e, self._attempts, self._retry_end, self._end, self._delay, self._cancelled):
                    self._delay = min(self._delay * 2, self._client.max_backoff)
                    with self._lock:
                        if self._cancelled.is_set():
                            continue
                        self._call = self._start()
                    continue
                self._finished = True
                raise _error(e) from None
            self._received = True
            event = self._convert(msg)
            if event is None:
                continue
            if isinstance(event, self._done_type):
                self._final = event
            return event

    def cancel(self) -> None:
        """Cancel the RPC (the server stops the search); iteration ends. Idempotent."""
        with self._lock:
            self._cancelled.set()
            self._call.cancel()

    close = cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self):
        """Drain the stream; the result the last event carries. `Cancelled` if it was cancelled."""
        for _ in self:
            pass
        if self._final is None:
            if self._cancelled.is_set():
                raise Cancelled(grpc.StatusCode.CANCELLED, f"{self._what} cancelled by the client")
            raise SearchError(grpc.StatusCode.UNKNOWN, f"the {self._what} stream ended without a result")
        return self._final.result  # type: ignore[attr-defined]

    def __enter__(self) -> "EventStream[E]":
        return self

    def __exit__(self, *exc) -> None:
        if not self._finished:
            self.cancel()

    def __del__(self):
        try:
            if not self._finished and not self._cancelled.is_set():
                self._call.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ---------------------------------------------------------------- the client

_STRATEGIES = {
    "top-ppm": search_pb2.TOP_PPM, "top_ppm": search_pb2.TOP_PPM,
    "majority": search_pb2.MAJORITY_VOTE, "majority_vote": search_pb2.MAJORITY_VOTE,
    "weighted": search_pb2.PPM_WEIGHTED_VOTE, "ppm_weighted_vote": search_pb2.PPM_WEIGHTED_VOTE,
}
_ANNOTATIONS = {
    "terminal-guided": search_pb2.TERMINAL_GUIDED, "terminal_guided": search_pb2.TERMINAL_GUIDED,
    "ppm-augmented": search_pb2.PPM_AUGMENTED, "ppm_augmented": search_pb2.PPM_AUGMENTED,
}


def _pem(value: str | bytes | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


_is_loopback = auth.loopback_target


class SearchClient:
    """A client of one search service (`address`: a gRPC target, `host:port`).

    `timeout`: default deadline of a call in seconds (a search is long: 30 min by
    default); `retries`: how many times UNAVAILABLE is retried; `retry_budget_s`: the
    most time spent retrying one call; `backoff`: the first retry delay (doubling,
    jittered, at most `max_backoff`). TLS when `tls=True` or any certificate is given.
    One client (one channel) serves any number of threads and calls; `close()` ends it.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, tls: bool = False,
                 root_certs: str | bytes | Path | None = None, client_cert: str | bytes | Path | None = None,
                 client_key: str | bytes | Path | None = None, timeout: float = 1800.0, retries: int = 8,
                 retry_budget_s: float = 30.0, backoff: float = 0.2, max_backoff: float = 5.0,
                 wait_for_ready: bool = False, allow_insecure_token: bool = False,
                 options: Sequence[tuple[str, Any]] = ()):
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if retries < 0 or retry_budget_s < 0 or backoff < 0:
            raise ValueError("retries, retry_budget_s and backoff must be >= 0")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together (mutual TLS)")
        self.address = address
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.retry_budget_s = float(retry_budget_s)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.wait_for_ready = wait_for_ready
        self.tls = bool(tls or root_certs is not None or client_cert is not None)
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # reconnect soon after a restart, so a retry finds the server back
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", int(max(1.0, self.max_backoff) * 1000)),
                *options]
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token is None:
            token = auth.user_token(address)
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=_pem(root_certs), private_key=_pem(client_key),
                                                 certificate_chain=_pem(client_cert))
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            if token:
                if not (_is_loopback(address) or allow_insecure_token):
                    raise ValueError(f"a token over an insecure channel to {address} would cross the network "
                                     "in clear: use tls=True (or allow_insecure_token=True inside a trusted network)")
                self._metadata = (("authorization", f"Bearer {token}"),)
            self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)

    # --- lifecycle ---

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SearchClient({self.address!r}, tls={self.tls})"

    # --- calls ---

    def solve(self, problem: str, *, rollouts: int | None = None, candidates: int | None = None,
              max_depth: int | None = None, max_tokens: int | None = None, max_seconds: float | None = None,
              trajectories: int | None = None, strategy: str = "top-ppm", seed: int = 0,
              temperature: float | None = None, exploration: float | None = None,
              deadline: float | None = None) -> SolveResult:
        """Search for an answer; returns when the search ends.

        Budget fields left at None take the server's defaults; with no budget field at all
        the whole budget is the server's. Given any, `rollouts` is required (the contract:
        a budget says how many rollouts it wants). `deadline`: seconds this call may take.
        """
        req = self._solve_request(problem, rollouts, candidates, max_depth, max_tokens, max_seconds, trajectories,
                                  strategy, seed, temperature, exploration)
        return SolveResult.from_proto(self._unary(self._stub.Solve, req, deadline))

    def solve_stream(self, problem: str, *, rollouts: int | None = None, candidates: int | None = None,
                     max_depth: int | None = None, max_tokens: int | None = None,
                     max_seconds: float | None = None, trajectories: int | None = None, strategy: str = "top-ppm",
                     seed: int = 0, temperature: float | None = None, exploration: float | None = None,
                     deadline: float | None = None) -> EventStream[SolveEvent]:
        """`solve` with progress: `SolveProgress` after each rollout, then one `SolveDone(result)`.

        The search starts now; `.cancel()` / `.close()` stops it; `.result()` waits for the result.
        """
        req = self._solve_request(problem, rollouts, candidates, max_depth, max_tokens, max_seconds, trajectories,
                                  strategy, seed, temperature, exploration)
        return EventStream(self, self._stub.SolveStream, req, self._timeout(deadline), _solve_event, SolveDone,
                           "solve")

    def synthesize(self, problems: Iterable[Problem | tuple[str, str, str] | dict], *,
                   rollouts: int | None = None, candidates: int | None = None, max_depth: int | None = None,
                   max_tokens: int | None = None, max_seconds: float | None = None,
                   annotation: str = "terminal-guided", seed: int = 0, round: int = 0, shard: str = "",
                   store: bool = False, return_trees: bool = False, temperature: float | None = None,
                   exploration: float | None = None, deadline: float | None = None) -> EventStream[SynthesisEvent]:
        """Search trees for problems with gold answers (training data).

        `problems`: `Problem`s, `(id, problem, answer)` tuples or dicts with those keys.
        Events: `SynthesisProgress`, one `TreeDone` per problem (with the tree itself when
        `return_trees`), then `SynthesisDone(result)`; `.result()` returns the `SynthesisResult`.
        `store=True` writes the trees to the service's store as `trajectories/round-<round>/<shard>`.
        """
        items = []
        for p in problems:
            if isinstance(p, Problem):
                pid, text, gold = p.id, p.problem, p.answer
            elif isinstance(p, dict):
                pid, text, gold = p.get("id", ""), p["problem"], p["answer"]
            else:
                pid, text, gold = p
            items.append(search_pb2.Problem(id=str(pid), problem=text, answer=str(gold)))
        if annotation not in _ANNOTATIONS:
            raise ValueError(f"unknown annotation {annotation!r} (one of terminal-guided, ppm-augmented)")
        req = search_pb2.SynthesizeRequest(
            problems=items, budget=self._budget(rollouts, candidates, max_depth, max_tokens, max_seconds, None),
            annotation=_ANNOTATIONS[annotation], seed=seed, round=round, shard=shard, store=store,
            return_trees=return_trees, exploration=exploration or 0.0, temperature=temperature or 0.0)
        trees: list[TreeDone] = []

        def convert(msg):
            kind = msg.WhichOneof("event")
            if kind == "progress":
                p = msg.progress
                return SynthesisProgress(p.problems_done, p.problems_total, p.solved, p.rollouts_done,
                                         p.generated_tokens, p.elapsed_seconds)
            if kind == "tree":
                t = msg.tree
                tree = TreeDone(t.problem_id, t.solved, t.nodes, json.loads(t.tree_json) if t.tree_json else None)
                trees.append(tree)
                return tree
            if kind == "done":
                d = msg.done
                return SynthesisDone(SynthesisResult(d.shard_key, d.problems, d.solved, SearchStats.from_proto(d.stats),
                                                     _versions(d.model_versions), list(trees)))
            return None

        return EventStream(self, self._stub.Synthesize, req, self._timeout(deadline), convert, SynthesisDone,
                           "synthesis")

    def info(self, *, deadline: float | None = 10.0) -> ServiceInfo:
        """Whether the service is ready, the model versions it serves, its settings."""
        r = self._unary(self._stub.Info, common_pb2.InfoRequest(), deadline)
        return ServiceInfo(ready=r.ready, models=_versions(r.models), details=dict(r.details))

    # --- internals ---

    def _timeout(self, deadline: float | None) -> float:
        t = self.timeout if deadline is None else float(deadline)
        if t <= 0:
            raise ValueError("deadline must be > 0 seconds")
        return t

    def _call_kwargs(self) -> dict:
        kw: dict = {"wait_for_ready": self.wait_for_ready}
        if self._metadata:
            kw["metadata"] = self._metadata
        return kw

    def _budget(self, rollouts, candidates, max_depth, max_tokens, max_seconds, trajectories):
        given = dict(candidates_per_expansion=candidates, max_depth=max_depth, max_tokens=max_tokens,
                     max_wall_seconds=max_seconds, trajectories=trajectories)
        if rollouts is None:
            if any(v is not None for v in given.values()):
                raise ValueError("rollouts is required when other budget fields are given "
                                 "(leave them all unset for the server's default budget)")
            return None
        return search_pb2.Budget(rollouts=rollouts, **{k: v for k, v in given.items() if v is not None})

    def _solve_request(self, problem, rollouts, candidates, max_depth, max_tokens, max_seconds, trajectories,
                       strategy, seed, temperature, exploration) -> search_pb2.SolveRequest:
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (one of top-ppm, majority, weighted)")
        return search_pb2.SolveRequest(
            problem=problem, budget=self._budget(rollouts, candidates, max_depth, max_tokens, max_seconds,
                                                 trajectories),
            seed=seed, strategy=_STRATEGIES[strategy], temperature=temperature or 0.0,
            exploration=exploration or 0.0)

    def _retry_wait(self, e: grpc.RpcError, attempts: int, retry_end: float, end: float, delay: float,
                    stop: threading.Event | None = None) -> bool:
        """After a failed attempt: whether to try again (having waited the backoff)."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or attempts > self.retries:
            return False
        wait = delay * random.uniform(0.5, 1.0)
        now = time.monotonic()
        if now + wait > min(retry_end, end - 0.05):
            return False
        if stop is not None:
            return not stop.wait(wait)
        time.sleep(wait)
        return True

    def _unary(self, method, request, deadline: float | None):
        end = time.monotonic() + self._timeout(deadline)
        retry_end = time.monotonic() + self.retry_budget_s
        delay, attempts = self.backoff, 0
        while True:
            attempts += 1
            try:
                return method(request, timeout=max(0.001, end - time.monotonic()), **self._call_kwargs())
            except grpc.RpcError as e:
                if self._retry_wait(e, attempts, retry_end, end, delay):
                    delay = min(delay * 2, self.max_backoff)
                    continue
                raise _error(e) from None


def _solve_event(msg) -> SolveEvent | None:
    kind = msg.WhichOneof("event")
    if kind == "progress":
        p = msg.progress
        return SolveProgress(p.rollouts_done, p.rollouts_total, p.best_answer, p.best_score, p.generated_tokens,
                             p.executions, p.elapsed_seconds)
    if kind == "result":
        return SolveDone(SolveResult.from_proto(msg.result))
    return None
