"""`rstar solve` (and the solve of `rstar demo`): one search through `rstar.client.SearchClient`.

While the search runs, progress goes to stderr (one rewritten line on a terminal, a
line per rollout otherwise). Then stdout gets either `--json`: the SolveResponse as
protobuf JSON, exactly the service's message (the client's `raw` response), or the
readable report `format_result` writes: each step of the winning trajectory with its
code and the real program output in separate blocks, failed steps marked with their
reason, answer and dead-end steps marked, then a compact summary of the search
(nodes, nodes per depth on the finished trajectories, answers with votes and scores,
stop reason, time per stage, model versions). Colour only when stdout is a terminal
(and NO_COLOR is unset). Every result is also kept as $RSTAR_HOME/last-solve.json,
which `rstar view` shows.

The token: `SearchClient`'s default (RSTAR_TOKEN, else to a loopback address the token
`rstar up` wrote under $RSTAR_HOME/auth; `rstar.auth.user_token`), so `rstar up` + `rstar
solve` need no flag.

Not here: the flags (`rstar_cli/main.py` defines the parser), starting services.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

from rstar import steps as stepfmt
from rstar.client import (AuthError, SearchClient, SearchError, SolveDone, SolveProgress, SolveResult, Step,
                          Unavailable)
from rstar.viewer.model import FAILURE_REASONS  # why a step failed, for people (one table, the viewer's too)

# failures of a program that ran: its (possibly empty) output is part of the story
_RAN = {"error", "timeout", "memory", "killed", "output_limit", "error_output"}

MAX_ANSWERS_SHOWN = 5
_CLI_RETRY_BUDGET_S = 3.0  # a CLI user with no service running should hear about it quickly


def _eprint(*a, **kw):
    print(*a, file=sys.stderr, **kw)


# ---------------------------------------------------------------- request


def solve_kwargs(args, default_rollouts: int) -> dict:
    """The flags as `SearchClient.solve` arguments. No budget flag: the service's default budget;
    any budget flag without --rollouts: `default_rollouts` rollouts."""
    budget = dict(rollouts=args.rollouts or 0, candidates=args.k, max_depth=args.max_depth,
                  max_tokens=args.max_tokens, max_seconds=args.max_seconds, trajectories=args.trajectories)
    kw: dict = dict(strategy=args.strategy, seed=args.seed, temperature=args.temperature or None)
    if any(budget.values()):
        budget["rollouts"] = budget["rollouts"] or default_rollouts
        kw.update({k: v for k, v in budget.items() if v})
    return kw


# ---------------------------------------------------------------- the command


def _progress_line(p: SolveProgress, elapsed: float) -> str:
    return (f"rollout {p.rollouts_done}/{p.rollouts_total}  best {p.best_answer or '-'} ({p.best_score:+.2f})  "
            f"tokens {p.generated_tokens}  exec {p.executions}  {elapsed:5.1f} s")


def cmd_solve(args, address: str, *, default_rollouts: int = 8) -> int:
    if not args.problem.strip():
        _eprint("error: the problem is empty")
        return 2
    start = time.monotonic()
    show_progress = not args.quiet and sys.stderr.isatty() or args.progress
    result: SolveResult | None = None
    try:
        client = SearchClient(address, timeout=args.timeout, wait_for_ready=args.wait,
                              retry_budget_s=args.timeout if args.wait else _CLI_RETRY_BUDGET_S)
    except ValueError as e:
        _eprint(f"error: {e}")
        return 2
    with client:
        try:
            stream = client.solve_stream(args.problem, **solve_kwargs(args, default_rollouts))
        except ValueError as e:
            _eprint(f"error: {e}")
            return 2
        try:
            for event in stream:
                if isinstance(event, SolveProgress) and not args.quiet:
                    msg = _progress_line(event, time.monotonic() - start)
                    if show_progress:
                        _eprint("\r" + msg.ljust(100), end="")
                    else:
                        _eprint(msg)
                elif isinstance(event, SolveDone):
                    result = event.result
        except SearchError as e:
            if show_progress:
                _eprint()
            _eprint(f"error: {e}")
            if isinstance(e, Unavailable):
                _eprint(f"(is the search service running at {address}? start it with `rstar up`)")
            elif isinstance(e, AuthError):
                # the token comes from RSTAR_TOKEN, else (loopback) the one `rstar up` wrote to $RSTAR_HOME/auth
                _eprint("(the token is RSTAR_TOKEN, or for a local stack $RSTAR_HOME/auth/user.token)")
            return 1
        except KeyboardInterrupt:
            stream.cancel()
            _eprint("\ncancelled")
            return 130
    if show_progress:
        _eprint()
    if result is None:
        _eprint("error: the stream ended without a result")
        return 1
    save_last_result(result, args.problem, address)
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(result.raw, preserving_proto_field_name=True))
    else:
        print(format_result(result, color=use_color(sys.stdout)))
        print(f"wall time: {time.monotonic() - start:.1f} s")
    return 0


def save_last_result(result: SolveResult, problem: str, address: str) -> None:
    """Keep the result as $RSTAR_HOME/last-solve.json for `rstar view`; a failure to write it only warns
    (the solve itself succeeded)."""
    from rstar.viewer.model import last_solve_path, save_solve

    try:
        save_solve(last_solve_path(), result, problem, address)
    except (OSError, ValueError) as e:
        _eprint(f"warning: could not save the result for `rstar view`: {e}")


def use_color(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR") \
        and os.environ.get("TERM") != "dumb"


# ---------------------------------------------------------------- the readable report


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, t: str) -> str:
        return self._wrap("1", t)

    def dim(self, t: str) -> str:
        return self._wrap("2", t)

    def red(self, t: str) -> str:
        return self._wrap("31", t)

    def green(self, t: str) -> str:
        return self._wrap("32", t)

    def yellow(self, t: str) -> str:
        return self._wrap("33", t)


def _block(lines: list[str], label: str, body: str, prefix: str, st: _Style) -> None:
    lines.append(f"    {label}:")
    for ln in body.splitlines() or [""]:
        lines.append(f"      {st.dim(prefix)} {ln}".rstrip())


def _step_marks(s: Step, st: _Style) -> str:
    if s.failure:
        why = FAILURE_REASONS.get(s.failure)
        return "  " + st.red(f"[FAILED: {s.failure}" + (f" - {why}]" if why else "]"))
    if s.terminal_kind == "answer":
        return "  " + st.green(f"[ANSWER: {s.answer}]")
    if s.terminal_kind == "dead_end":
        return "  " + st.yellow("[dead end: every continuation failed]")
    return ""


def format_step(s: Step, st: _Style | None = None) -> list[str]:
    st = st or _Style(False)
    lines = [st.bold(f"  -- step {s.index + 1}") + f"  Q={s.q:+.3f}  N={s.visits}  ppm={s.ppm_score:+.3f}"
             + _step_marks(s, st)]
    if s.code.strip():
        _block(lines, "code", s.code.strip("\n"), "|", st)
    else:
        text = _plain_text(s.text)
        for ln in (text.splitlines() or ["(empty step)"]):
            lines.append(f"    {ln}")
    out = s.output.strip("\n")
    if out.strip():
        _block(lines, "output", out, ">", st)
    elif s.ends_code and not s.failure or s.failure in _RAN:
        lines.append("    output: " + st.dim("(nothing printed)"))
    return lines


def _plain_text(text: str) -> str:
    """A non-code step's text without the step markers (`<answer>`, `<end_of_answer>`, ...)."""
    for m in stepfmt.SPECIAL_TOKENS:
        text = text.replace(m, "")
    return text.strip("\n").strip()


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def nodes_per_depth(result: SolveResult) -> dict[int, int]:
    """Distinct nodes per depth (1 = first step) on the finished trajectories and the chosen one
    (a partial path when no answer was reached): the part of the tree a SolveResponse describes;
    the full tree's shape is not in it (`stats.nodes` counts every node)."""
    seen: dict[int, set] = defaultdict(set)
    paths = [(t.seed, t.steps) for t in result.trajectories] + [(result.seed, result.trajectory)]
    for seed, steps in paths:
        key: tuple = (seed,)
        for depth, s in enumerate(steps, 1):
            key = key + (s.text,)
            seen[depth].add(key)
    return {d: len(v) for d, v in sorted(seen.items())}


def tree_summary(result: SolveResult, st: _Style | None = None) -> list[str]:
    st = st or _Style(False)
    s, t = result.stats, result.stats.times
    lines = ["", st.bold("search tree:")]
    lines.append(f"  nodes: {s.nodes} in {s.trees} tree(s) after {s.rollouts} rollouts; "
                 f"stop: {s.stop_reason or '-'}")
    depths = nodes_per_depth(result)
    if depths:
        n = len(result.trajectories)
        where = f"the {_plural(n, 'finished trajectory', 'finished trajectories')}" if n else "the chosen path"
        lines.append(f"  nodes per depth on {where}: " + "  ".join(f"d{d}={k}" for d, k in depths.items()))
    if result.alternatives:
        shown = result.alternatives[:MAX_ANSWERS_SHOWN]
        lines.append(f"  answers found: {max(result.alternatives_total, len(result.alternatives))}")
        width = max(len(a.answer) for a in shown)
        for a in shown:
            chosen = "  <- chosen" if a.answer == result.answer else ""
            lines.append(f"    {a.answer:{width}s}  votes={a.votes}  best={a.best_score:+.3f}  "
                         f"weighted={a.weighted_score:+.3f}" + (st.green(chosen) if chosen else ""))
        rest = result.alternatives[MAX_ANSWERS_SHOWN:]
        if rest:
            lines.append(f"    ... {len(rest)} more with {sum(a.votes for a in rest)} vote(s) (--json lists all)")
    else:
        lines.append("  answers found: none")
    lines.append(f"  stats: {s.generated_tokens} generated tokens ({s.prompt_tokens} prompt), {s.executions} "
                 f"executions; calls: policy {s.policy_calls}, ppm {s.ppm_calls}, sandbox {s.sandbox_calls}")
    lines.append(f"  time: total {t.total_seconds:.1f} s = generate {t.generate_seconds:.1f} + ppm "
                 f"{t.ppm_seconds:.1f} + sandbox {t.sandbox_seconds:.1f} + other {t.other_seconds:.1f}")
    lines.append("  models: " + (", ".join(f"{k}={v}" for k, v in sorted(result.model_versions.items())) or "-"))
    return lines


def format_result(result: SolveResult, *, color: bool = False) -> str:
    """The readable report of one search (plain text unless `color`)."""
    st = _Style(color)
    answer = result.answer or "(none found)"
    lines = [st.bold("answer: ") + (st.green(answer) if result.answer else st.yellow(answer))]
    lines.append(f"trajectory ({_plural(len(result.trajectory), 'step', 'steps')}, final PPM score {result.final_score:+.3f}, "
                 f"strategy {result.strategy or '-'}):")
    for s in result.trajectory:
        lines += format_step(s, st)
    lines += tree_summary(result, st)
    return "\n".join(lines)


def format_response(resp, *, color: bool = False) -> str:
    """`format_result` of a SolveResponse message (or of a `SolveResult`)."""
    result = resp if isinstance(resp, SolveResult) else SolveResult.from_proto(resp)
    return format_result(result, color=color)
