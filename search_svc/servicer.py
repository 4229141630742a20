"""SearchService servicer: protobuf <-> SearchCore, validation, deadlines, cancellation.

Budget semantics: a request without a `budget` message gets the server's
defaults. A request WITH a budget must say how many rollouts it wants
(`rollouts >= 1`; "a budget of 0" is INVALID_ARGUMENT); its other zero fields
mean "default" (k, depth, trajectories) or "unlimited" (tokens, wall time).
Negative values are INVALID_ARGUMENT; values above the server's limits are
RESOURCE_EXHAUSTED, as is a full search queue.

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

from rstar import metrics
from rstar.server import ServiceError, exhausted, invalid, unavailable
from rstar.v1 import common_pb2, search_pb2, search_pb2_grpc
from rstar.search import selection
from rstar.clients import DownstreamError
from search_svc.config import SearchConfig
from rstar.search.core import Busy, SearchCore, SearchOptions, SynthesisProblem, auto_shard_name
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


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, config: SearchConfig, core: SearchCore, info=None):
        self.config = config
        self.core = core
        # () -> (ready, {model: version}); the server's downstream health poller
        self.info = info or (lambda: (True, {}))

    # --- validation ---

    def _options(self, budget: search_pb2.Budget, has_budget: bool, seed: int, exploration: float,
                 temperature: float) -> SearchOptions:
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
        if not _finite(exploration) or exploration < 0:
            raise invalid("exploration must be >= 0")
        if not _finite(temperature) or temperature < 0:
            raise invalid("temperature must be >= 0")
        return SearchOptions(
            rollouts=rollouts, k=k, max_depth=depth, max_tokens=b.max_tokens, max_wall_seconds=b.max_wall_seconds,
            trajectories=trajectories, seed=int(seed), exploration=exploration or cfg.exploration,
            temperature=temperature or cfg.temperature, top_p=cfg.top_p, max_step_tokens=cfg.max_step_tokens,
            max_active_trees=cfg.max_active_trees)

    def _check_problem(self, text: str, what: str = "problem") -> None:
        if not text.strip():
            raise invalid(f"{what} is empty")
        if len(text) > self.config.max_problem_chars:
            raise invalid(f"{what} is {len(text)} characters, above the limit of {self.config.max_problem_chars}")

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
        scope = self._scope(context)
        outcome = self._run(context, lambda: self.core.solve(request.problem, opts, scope))
        metrics.SEARCH_SOLVES.labels("ok").inc()
        return solve_response(outcome.selection, outcome.stats)

    def SolveStream(self, request, context):
        opts = self._solve_options(request)
        scope = self._scope(context)
        events: queue.Queue = queue.Queue()
        last = {"rollouts": -1}

        def on_progress(p: Progress, trees) -> None:
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
            return search_pb2.SolveEvent(result=solve_response(outcome.selection, outcome.stats))

        yield from self._stream(context, scope, events, work)
        metrics.SEARCH_SOLVES.labels("ok").inc()

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
                             request.temperature)
        opts.annotation = _ANNOTATIONS[request.annotation]
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
                     "max_depth": str(cfg.max_depth), "store": cfg.store_url or "(local default)"})


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
    steps = [search_pb2.Step(index=i, text=n.text, code=n.code, output=n.output, q=n.Q, visits=n.N,
                             ppm_score=n.ppm_score if n.ppm_score is not None else 0.0, terminal=n.terminal,
                             failure=n.failure) for i, n in enumerate(tr.steps)]
    return search_pb2.Trajectory(steps=steps, answer=tr.answer, final_score=tr.final_score, mean_q=tr.mean_q,
                                 seed=tr.seed)


def solve_response(sel: selection.Selection, stats: Stats) -> search_pb2.SolveResponse:
    return search_pb2.SolveResponse(
        answer=sel.answer, trajectory=trajectory_message(sel.trajectory),
        alternatives=[search_pb2.Alternative(answer=g.answer, votes=g.votes, best_score=g.best_score,
                                             weighted_score=g.weighted_score) for g in sel.groups],
        trajectories=[trajectory_message(t) for t in sel.trajectories],
        stats=stats_message(stats), model_versions=versions_message(stats.model_versions), strategy=sel.strategy)
