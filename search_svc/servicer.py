"""SearchService servicer: protobuf <-> SearchCore, validation, deadlines, cancellation.

Budget semantics: a request without a `budget` message gets the server's
defaults. A request WITH a budget must say how many rollouts it wants
(`rollouts >= 1`; "a budget of 0" is INVALID_ARGUMENT); its other zero fields
mean "default" (k, depth, trajectories) or "unlimited" (tokens, wall time).
Negative values are INVALID_ARGUMENT; values above the server's limits are
RESOURCE_EXHAUSTED, as is a full search queue.

Admission, before any downstream call: the work of a request (rollouts x k x
trees, trees = Solve's trajectories or Synthesize's problems) is capped
(`max_request_work`); its generated tokens are capped at `max_tokens_per_tree`
x trees, which is also what "0 = unlimited" gets; a request without a wall-time
limit gets `default_wall_seconds`. A problem longer than `max_problem_tokens`
by the estimate `estimated_tokens` is INVALID_ARGUMENT: this service has no
tokenizer, and the estimate (UTF-8 bytes / `problem_bytes_per_token`, 6 by
default) is at or below what a real tokenizer makes of maths text, so it refuses
the hopeless (a 16,384-character problem against a 4,096-token context) and
leaves the exact check to the policy, which refuses an over-long prompt item by item.
Per caller (the token's name, `rstar.auth.current_caller`; one shared caller
without authentication): at most `max_searches_per_caller` requests in flight and
`caller_tokens_per_minute` generated tokens (`rstar.search.core.CallerQuotas`),
RESOURCE_EXHAUSTED beyond. A SolveResponse lists the best `response_trajectories`
trajectories and alternatives, with `trajectories_total` / `alternatives_total`
counting all, and each step's output cut as in prompts (`rstar.steps.truncate_output`).

Synthesize stores under `api-<shard>` (a namespace evolution chunk names never
use); a shard already stored is ALREADY_EXISTS, a store fault UNAVAILABLE.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

import grpc

from rstar import auth, metrics
from rstar import steps as stepfmt
from rstar.server import ServiceError, exhausted, invalid, unavailable
from rstar.v1 import common_pb2, search_pb2, search_pb2_grpc
from rstar.search import selection
from rstar.clients import DownstreamError
from search_svc.config import SearchConfig
from rstar.search.core import (Busy, CallerQuotas, CallerTicket, SearchCore, SearchOptions, SynthesisProblem,
                               auto_shard_name)
from rstar.protocols import CallScope, Cancelled, DeadlineExceeded
from rstar.search.engine import Progress, Stats
from rstar.search.mcts import PPM_AUGMENTED, TERMINAL_GUIDED
from rstar.store import StoreError
from rstar.trees import SHARD_NAME, ShardExists

log = logging.getLogger(__name__)

MAX_DEPTH_LIMIT = 64
_STRATEGIES = {
    search_pb2.SELECTION_STRATEGY_UNSPECIFIED: selection.TOP_PPM,
    search_pb2.TOP_PPM: selection.TOP_PPM,
    search_pb2.MAJORITY_VOTE: selection.MAJORITY_VOTE,
    search_pb2.PPM_WEIGHTED_VOTE: selection.PPM_WEIGHTED_VOTE,
}
_ANNOTATIONS = {
    search_pb2.ANNOTATION_MODE_UNSPECIFIED: TERMINAL_GUIDED,
    search_pb2.TERMINAL_GUIDED: TERMINAL_GUIDED,
    search_pb2.PPM_AUGMENTED: PPM_AUGMENTED,
}
_DONE = object()
API_SHARD_PREFIX = "api-"   # every shard Synthesize stores is named api-<requested or generated name>


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def estimated_tokens(text: str, bytes_per_token: float) -> int:
    """A cheap estimate of `text`'s token count without its tokenizer: UTF-8 bytes / bytes_per_token.

    Byte-level tokenizers make at most one token per byte. Measured with Qwen2.5's tokenizer
    (2026-12-01): 3.9 bytes per token (median; 2.7-6.2) on 2,000 GSM8K problems, 2.9
    (1.4-5.7) on 2,000 MATH problems; so at 6 bytes per token the estimate is at or below
    the true count for all but a handful, and a refusal is a problem that cannot fit."""
    return math.ceil(len(text.encode("utf-8")) / bytes_per_token)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, config: SearchConfig, core: SearchCore, info=None):
        self.config = config
        self.core = core
        # () -> (ready, {model: version}); the server's downstream health poller
        self.info = info or (lambda: (True, {}))
        self.quotas = CallerQuotas(config.max_searches_per_caller, config.caller_tokens_per_minute)

    # --- validation ---

    def _options(self, budget: search_pb2.Budget, has_budget: bool, seed: int, exploration: float,
                 temperature: float, trees: int | None = None) -> SearchOptions:
        """Validated, resolved settings; `trees`: how many trees the request grows (default: its trajectories)."""
        cfg = self.config
        b = budget
        if has_budget:
            for name in ("rollouts", "candidates_per_expansion", "max_depth", "max_tokens", "trajectories"):
                if getattr(b, name) < 0:
                    raise invalid(f"budget.{name} must not be negative")
            if not _finite(b.max_wall_seconds) or b.max_wall_seconds < 0:
                raise invalid("budget.max_wall_seconds must be >= 0")
            if b.rollouts < 1:
                raise invalid("budget.rollouts must be >= 1 (omit the budget to use the server defaults)")
        rollouts = b.rollouts if has_budget else cfg.rollouts
        k = b.candidates_per_expansion or cfg.candidates
        depth = b.max_depth or cfg.max_depth
        trajectories = b.trajectories or 1
        if depth > MAX_DEPTH_LIMIT:
            raise invalid(f"budget.max_depth={depth} above {MAX_DEPTH_LIMIT}")
        if rollouts > cfg.max_rollouts:
            raise exhausted(f"budget.rollouts={rollouts} above this server's limit of {cfg.max_rollouts}")
        if k > cfg.max_candidates:
            raise exhausted(f"budget.candidates_per_expansion={k} above the limit of {cfg.max_candidates}")
        if trajectories > cfg.max_trajectories:
            raise exhausted(f"budget.trajectories={trajectories} above the limit of {cfg.max_trajectories}")
        trees = trajectories if trees is None else trees
        work = rollouts * k * trees
        if work > cfg.max_request_work:
            raise exhausted(f"rollouts x k x trees = {rollouts} x {k} x {trees} = {work} above this server's "
                            f"limit of {cfg.max_request_work}")
        token_cap = cfg.max_tokens_per_tree * trees
        if b.max_tokens > token_cap:
            raise exhausted(f"budget.max_tokens={b.max_tokens} above the limit of {token_cap} "
                            f"({cfg.max_tokens_per_tree} per tree)")
        if b.max_wall_seconds > cfg.max_wall_seconds:
            raise exhausted(f"budget.max_wall_seconds={b.max_wall_seconds:g} above the limit of "
                            f"{cfg.max_wall_seconds:g}")
        if not _finite(exploration) or exploration < 0:
            raise invalid("exploration must be >= 0")
        if not _finite(temperature) or temperature < 0:
            raise invalid("temperature must be >= 0")
        return SearchOptions(
            rollouts=rollouts, k=k, max_depth=depth, max_tokens=b.max_tokens or token_cap,
            max_wall_seconds=b.max_wall_seconds or cfg.default_wall_seconds,
            trajectories=trajectories, seed=int(seed), exploration=exploration or cfg.exploration,
            temperature=temperature or cfg.temperature, top_p=cfg.top_p, max_step_tokens=cfg.max_step_tokens,
            max_active_trees=cfg.max_active_trees)

    def _check_problem(self, text: str, what: str = "problem") -> None:
        if not text.strip():
            raise invalid(f"{what} is empty")
        if len(text) > self.config.max_problem_chars:
            raise invalid(f"{what} is {len(text)} characters, above the limit of {self.config.max_problem_chars}")
        tokens = estimated_tokens(text, self.config.problem_bytes_per_token)
        if tokens > self.config.max_problem_tokens:
            raise invalid(f"{what} is about {tokens} tokens ({len(text.encode())} bytes), above the limit of "
                          f"{self.config.max_problem_tokens}")

    def _solve_options(self, request: search_pb2.SolveRequest) -> SearchOptions:
        self._check_problem(request.problem)
        if request.strategy not in _STRATEGIES:
            raise invalid(f"unknown selection strategy {request.strategy}")
        opts = self._options(request.budget, request.HasField("budget"), request.seed, request.exploration,
                             request.temperature)
        opts.strategy = _STRATEGIES[request.strategy]
        return opts

    # --- scope: deadline + cancellation ---

    @staticmethod
    def _scope(context: grpc.ServicerContext) -> CallScope:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e9 else None
        scope = CallScope(deadline)

        def on_done():
            left = context.time_remaining()
            scope.stop("deadline" if left is not None and left <= 0.05 else "cancelled")

        context.add_callback(on_done)
        return scope

    def _admit_caller(self) -> CallerTicket:
        """The caller's quota slot (RESOURCE_EXHAUSTED when it has none left); release it when done."""
        caller = auth.current_caller()
        try:
            return self.quotas.admit(caller.name if caller is not None else "")
        except Busy as e:
            metrics.SEARCH_SOLVES.labels("rejected").inc()
            raise exhausted(str(e)) from None

    def _run(self, context, fn):
        """Run a search, translating domain errors into status codes."""
        try:
            return fn()
        except Busy as e:
            metrics.SEARCH_SOLVES.labels("rejected").inc()
            raise exhausted(str(e)) from None
        except DeadlineExceeded:
            metrics.SEARCH_SOLVES.labels("deadline").inc()
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during the search") from None
        except Cancelled:
            metrics.SEARCH_SOLVES.labels("cancelled").inc()
            raise ServiceError(grpc.StatusCode.CANCELLED, "search cancelled") from None
        except DownstreamError as e:
            metrics.SEARCH_SOLVES.labels("error").inc()
            code = e.code if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED) else grpc.StatusCode.INTERNAL
            raise ServiceError(code, str(e)) from None

    # --- Solve / SolveStream ---

    def Solve(self, request, context):
        opts = self._solve_options(request)
        with self._admit_caller() as ticket:
            scope = self._scope(context)
            outcome = self._run(context, lambda: self.core.solve(
                request.problem, opts, scope, lambda p, _trees: ticket.charge_to(p.generated_tokens)))
            ticket.charge_to(outcome.stats.generated_tokens)
        metrics.SEARCH_SOLVES.labels("ok").inc()
        return solve_response(outcome.selection, outcome.stats, self.config.response_trajectories)

    def SolveStream(self, request, context):
        opts = self._solve_options(request)
        with self._admit_caller() as ticket:
            yield from self._solve_stream(request, opts, context, ticket)
        metrics.SEARCH_SOLVES.labels("ok").inc()

    def _solve_stream(self, request, opts: SearchOptions, context, ticket: CallerTicket):
        scope = self._scope(context)
        events: queue.Queue = queue.Queue()
        last = {"rollouts": -1}

        def on_progress(p: Progress, trees) -> None:
            ticket.charge_to(p.generated_tokens)
            if p.rollouts_done == last["rollouts"]:
                return
            last["rollouts"] = p.rollouts_done
            best = max((n for t in trees for n in t.answer_nodes()), key=selection.final_score, default=None)
            events.put(search_pb2.SolveEvent(progress=search_pb2.SolveProgress(
                rollouts_done=p.rollouts_done, rollouts_total=p.rollouts_total,
                best_answer=best.answer if best else "", best_score=selection.final_score(best) if best else 0.0,
                generated_tokens=p.generated_tokens, executions=p.executions, elapsed_seconds=p.elapsed_seconds)))

        def work():
            outcome = self.core.solve(request.problem, opts, scope, on_progress)
            ticket.charge_to(outcome.stats.generated_tokens)
            return search_pb2.SolveEvent(result=solve_response(outcome.selection, outcome.stats,
                                                               self.config.response_trajectories))

        yield from self._stream(context, scope, events, work)

    def _stream(self, context, scope: CallScope, events: queue.Queue, work):
        """Run `work` in a thread; yield its events as they come, then its result."""
        box: dict = {}

        def target():
            try:
                box["result"] = work()
            except BaseException as e:  # noqa: BLE001 - re-raised in the handler thread
                box["error"] = e
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=target, name="search-stream", daemon=True)
        thread.start()
        try:
            while True:
                ev = events.get()
                if ev is _DONE:
                    break
                yield ev
        finally:
            if thread.is_alive():     # the client went away while we were yielding
                scope.stop("cancelled")
                thread.join(timeout=5)
        if "error" in box:
            err = box["error"]
            self._run(context, lambda: _reraise(err))
        yield box["result"]

    # --- Synthesize ---

    def Synthesize(self, request, context):
        cfg = self.config
        if not request.problems:
            raise invalid("no problems")
        if len(request.problems) > cfg.max_synthesis_problems:
            raise exhausted(f"{len(request.problems)} problems above the limit of {cfg.max_synthesis_problems}")
        problems = []
        for i, p in enumerate(request.problems):
            self._check_problem(p.problem, f"problems[{i}].problem")
            if not p.answer.strip():
                raise invalid(f"problems[{i}].answer (the gold answer) is empty")
            problems.append(SynthesisProblem(id=p.id or str(i), problem=p.problem, answer=p.answer))
        if request.annotation not in _ANNOTATIONS:
            raise invalid(f"unknown annotation mode {request.annotation}")
        if request.round < 0:
            raise invalid("round must be >= 0")
        named = request.shard
        if named and not (SHARD_NAME.match(named) and SHARD_NAME.match(API_SHARD_PREFIX + named)):
            raise invalid(f"invalid shard name {request.shard!r} (letters, digits, '.', '_', '-'; at most "
                          f"{128 - len(API_SHARD_PREFIX)} characters)")
        if request.store and self.core.store is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this server has no trajectory store")
        opts = self._options(request.budget, request.HasField("budget"), request.seed, request.exploration,
                             request.temperature, trees=len(problems))
        opts.annotation = _ANNOTATIONS[request.annotation]
        with self._admit_caller() as ticket:
            yield from self._synthesize(request, problems, opts, context, ticket)

    def _synthesize(self, request, problems: list[SynthesisProblem], opts: SearchOptions, context,
                    ticket: CallerTicket):
        scope = self._scope(context)
        events: queue.Queue = queue.Queue()
        counts = {"done": 0, "solved": 0}
        total = len(problems)

        def on_tree(tree, d) -> None:
            counts["done"] += 1
            counts["solved"] += int(d["solved"])
            events.put(search_pb2.SynthesizeEvent(tree=search_pb2.TreeResult(
                problem_id=tree.problem_id, solved=d["solved"], nodes=len(tree.nodes) - 1,
                tree_json=_json(d) if request.return_trees else "")))

        def on_progress(p: Progress) -> None:
            ticket.charge_to(p.generated_tokens)
            if not p.finished:
                return
            events.put(search_pb2.SynthesizeEvent(progress=search_pb2.SynthesisProgress(
                problems_done=counts["done"], problems_total=total, solved=counts["solved"],
                rollouts_done=p.rollouts_done, generated_tokens=p.generated_tokens,
                elapsed_seconds=p.elapsed_seconds)))

        # client shards live in their own namespace, so no request can take (or pre-empt) a
        # shard name of the evolution's synthesis, which skips stored shards as done
        shard = API_SHARD_PREFIX + (request.shard or auto_shard_name(opts.seed))

        def work():
            try:
                out = self.core.synthesize(problems, opts, round_no=request.round, shard=shard,
                                           store_trees=request.store, scope=scope, on_progress=on_progress,
                                           on_tree=on_tree)
            except ShardExists as e:
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
            except StoreError as e:   # unreachable, full or refusing: the trees finished so far are kept as parts
                raise unavailable(f"trajectory store: {e}") from None
            ticket.charge_to(out.stats.generated_tokens)
            return search_pb2.SynthesizeEvent(done=search_pb2.SynthesisDone(
                shard_key=out.shard_key, problems=len(out.tree_dicts), solved=out.solved,
                stats=stats_message(out.stats), model_versions=versions_message(out.stats.model_versions)))

        yield from self._stream(context, scope, events, work)

    # --- Info ---

    def Info(self, request, context):
        ready, versions = self.info()
        cfg = self.config
        return common_pb2.InfoResponse(
            service="search", ready=ready, models=versions_message(versions),
            details={"policy": cfg.policy_address, "ppm": cfg.ppm_address, "sandbox": cfg.sandbox_address,
                     "default_rollouts": str(cfg.rollouts), "default_candidates": str(cfg.candidates),
                     "max_depth": str(cfg.max_depth), "store": cfg.store_url or "(local default)",
                     "max_request_work": str(cfg.max_request_work), "max_problem_tokens": str(cfg.max_problem_tokens),
                     "default_wall_seconds": f"{cfg.default_wall_seconds:g}"})


def _reraise(err: BaseException):
    raise err


def _json(d: dict) -> str:
    import json

    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def versions_message(versions: dict[str, str]) -> list[common_pb2.ModelVersion]:
    return [common_pb2.ModelVersion(name=k, version=v) for k, v in sorted(versions.items())]


def stats_message(s: Stats) -> search_pb2.SearchStats:
    return search_pb2.SearchStats(
        rollouts=s.rollouts, nodes=s.nodes, generated_tokens=s.generated_tokens, prompt_tokens=s.prompt_tokens,
        executions=s.executions, policy_calls=s.policy_calls, ppm_calls=s.ppm_calls, sandbox_calls=s.sandbox_calls,
        trees=s.trees, stop_reason=s.stop_reason,
        times=search_pb2.StageTimes(generate_seconds=s.generate_seconds, ppm_seconds=s.ppm_seconds,
                                    sandbox_seconds=s.sandbox_seconds, other_seconds=s.other_seconds,
                                    total_seconds=s.total_seconds))


def trajectory_message(tr: selection.Trajectory | None) -> search_pb2.Trajectory:
    if tr is None:
        return search_pb2.Trajectory()
    # each step's output as a prompt carries it: a response stays far below the message limit
    # however much the programs printed (the stored tree keeps the whole output)
    steps = [search_pb2.Step(index=i, text=n.text, code=n.code, output=stepfmt.truncate_output(n.output),
                             q=n.Q, visits=n.N,
                             ppm_score=n.ppm_score if n.ppm_score is not None else 0.0, terminal=n.terminal,
                             failure=n.failure) for i, n in enumerate(tr.steps)]
    return search_pb2.Trajectory(steps=steps, answer=tr.answer, final_score=tr.final_score, mean_q=tr.mean_q,
                                 seed=tr.seed)


def solve_response(sel: selection.Selection, stats: Stats, limit: int | None = None) -> search_pb2.SolveResponse:
    """The response, listing the first `limit` trajectories and alternatives (both come best first)."""
    return search_pb2.SolveResponse(
        answer=sel.answer, trajectory=trajectory_message(sel.trajectory),
        alternatives=[search_pb2.Alternative(answer=g.answer, votes=g.votes, best_score=g.best_score,
                                             weighted_score=g.weighted_score) for g in sel.groups[:limit]],
        trajectories=[trajectory_message(t) for t in sel.trajectories[:limit]],
        trajectories_total=len(sel.trajectories), alternatives_total=len(sel.groups),
        stats=stats_message(stats), model_versions=versions_message(stats.model_versions), strategy=sel.strategy)
