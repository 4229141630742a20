"""`rstar eval`: accuracy on a dev set by greedy decoding, majority vote over N samples, and MCTS.

- Greedy / sampled trajectories are produced step by step exactly as the
  search produces one path: the policy writes a step (it stops at
  `rstar.steps.GENERATION_STOPS`, as every policy does), the step is
  classified by `rstar.steps.classify_candidate` (the search's own rule: a
  cut-off answer is a failure, model-written system markers cut the step), a
  code step runs in the sandbox (the whole block, re-run from the start), the
  output of a step that closes the code block is appended, and the answer step
  ends the trajectory. Problems advance in lock-step so each step is one
  batched generate call.
- The policy is the local model (`rstar.local_policy.HFPolicy`: transformers, greedy or seeded
  sampling, batched) or the policy service (`rstar.clients.PolicyClient`).
- MCTS (+PPM) goes through the search service's `Solve` with N trajectories.
- Grading: the project grader `rstar.grading.grade` (exact, numeric, then
  math-verify with a bounded timeout), the same one the search uses for
  terminal values. The report counts which path decided each case (`graders`).
- "Format" = the trajectory followed the step format: every step the policy
  wrote ended with a stop string, every program ran, and it finished with a
  well-formed answer step.

This module does not define what a step or a correct answer is (`rstar.steps`,
`rstar.grading` do).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rstar import grading, steps as stepfmt
from rstar.local_policy import HFPolicy  # noqa: F401 - re-exported for callers of the eval API

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grading


def grade(pred: str | None, gold: str) -> tuple[bool, str]:
    """(correct, method): the project grader's verdict and which path decided (see `rstar.grading`)."""
    verdict = grading.grade(pred, gold)
    return verdict.equal, verdict.method


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    question: str
    steps: list[str] = field(default_factory=list)
    answer: str | None = None
    failure: str = ""
    done: bool = False
    tokens: int = 0
    generated: int = 0      # steps the policy wrote (system-written output steps not counted)
    well_formed: int = 0    # of those, steps the policy ended with a stop string itself (not cut, not cut off)

    @property
    def format_ok(self) -> bool:
        return self.done and not self.failure and self.answer is not None and self.well_formed == self.generated


def run_rollouts(policy, executor, questions: Sequence[str], *, temperature: float = 0.0, top_p: float = 0.95,
                 max_tokens: int = 256, max_depth: int = 16, seeds: Sequence[int] | None = None) -> list[Rollout]:
    """One trajectory per question, all advanced in lock-step (one generate call per depth)."""
    from rstar.protocols import GenerationItem, SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    seeds = list(seeds) if seeds is not None else [0] * len(questions)
    rs = [Rollout(q) for q in questions]
    for depth in range(max_depth):
        active = [i for i, r in enumerate(rs) if not r.done]
        if not active:
            break
        log.info("rollouts: depth %d, %d/%d active", depth, len(active), len(rs))
        items = [GenerationItem(rs[i].question, tuple(rs[i].steps), 1, seeds[i] * 1000 + depth) for i in active]
        cands = policy.generate(items, params)
        programs: list[tuple[int, str, bool]] = []   # (rollout, program, the step closes the block)
        for i, cs in zip(active, cands):
            r = rs[i]
            c = cs[0]
            r.tokens += c.num_tokens
            step = stepfmt.classify_candidate(c.text, c.finish_reason, is_first=not r.steps)
            r.generated += 1
            r.well_formed += int(step.well_formed)
            if step.failed:
                r.steps.append(step.text)
                r.failure, r.done = step.failure, True
            elif step.is_answer:
                r.steps.append(step.text)
                r.answer, r.done = step.answer, True
            else:
                programs.append((i, stepfmt.assemble_program(r.steps, step.text), step.ends_code))
                r.steps.append(step.text)
        if programs:
            results = executor.execute([p for _, p, _ in programs])
            for (i, _, ends_code), res in zip(programs, results):
                r = rs[i]
                if res.failure != "ok" or stepfmt.output_is_failure(res.stdout):
                    r.failure, r.done = f"exec:{res.failure}", True
                elif ends_code:
                    r.steps.append(stepfmt.output_step(res.stdout))
    for r in rs:
        if not r.done:
            r.failure, r.done = "depth", True
    return rs


# --------------------------------------------------------------------------- MCTS via the search service


def mcts_answers(address: str, problems: Sequence[dict[str, Any]], trajectories: int, rollouts: int = 0,
                 seed: int = 0, timeout: float = 1800.0, max_tokens: int = 0, candidates: int = 0,
                 concurrency: int = 1) -> list[dict[str, Any]]:
    """One `Solve` per problem through the search service, `concurrency` at a time (the policy
    service batches concurrent calls); per problem: answer, generated tokens, seconds."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from rstar import auth
    from rstar.v1 import search_pb2, search_pb2_grpc

    token = auth.user_token(address)   # $RSTAR_TOKEN, or a local stack's own token
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.SearchServiceStub(ch)

        def one(p: dict[str, Any]) -> dict[str, Any]:
            t = time.monotonic()
            req = search_pb2.SolveRequest(problem=p["problem"], seed=seed, budget=search_pb2.Budget(
                trajectories=trajectories, rollouts=rollouts, max_tokens=max_tokens,
                candidates_per_expansion=candidates))
            resp = stub.Solve(req, timeout=timeout, metadata=metadata)
            return {"answer": resp.answer, "tokens": int(resp.stats.generated_tokens),
                    "seconds": round(time.monotonic() - t, 1), "stop_reason": resp.stats.stop_reason}

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, problems))


def best_of(scorer, questions: Sequence[str], rollouts: Sequence[Sequence[Rollout]]) -> tuple[list[list[float | None]], str]:
    """(PPM score of each sampled trajectory's last step, the PPM version): the paper's answer
    choice is the trajectory whose final step scores highest; None for one without an answer."""
    prefixes, where = [], []
    for i, (q, rs) in enumerate(zip(questions, rollouts)):
        for j, r in enumerate(rs):
            if r.answer is not None:
                prefixes.append((q, tuple(r.steps)))
                where.append((i, j))
    scores: list[list[float | None]] = [[None] * len(rs) for rs in rollouts]
    version = ""
    for b in range(0, len(prefixes), 64):
        got = scorer.score(prefixes[b:b + 64])
        version = got.model_version or version
        for (i, j), v in zip(where[b:b + 64], got):
            scores[i][j] = float(v)
    return scores, version


def _pick_best(answers: Sequence[str | None], scores: Sequence[float | None]) -> str | None:
    best = None
    for a, s in zip(answers, scores):
        if a is not None and s is not None and (best is None or s > best[1]):
            best = (a, s)
    return best[0] if best else None


# --------------------------------------------------------------------------- the evaluation


@dataclass
class EvalConfig:
    greedy: bool = True
    samples: int = 0              # majority vote over this many sampled trajectories (0: skip)
    temperature: float = 0.7
    mcts: tuple[int, ...] = ()    # numbers of trajectories for MCTS through the search service
    mcts_rollouts: int = 0
    mcts_max_tokens: int = 0      # generated-token budget of one MCTS solve (0 = the service's)
    mcts_candidates: int = 0      # k of the MCTS solves (0 = the service's)
    mcts_concurrency: int = 4     # Solve calls in flight
    search_address: str = ""
    ppm_address: str = ""         # PPM service for best-of-N over the majority samples
    max_tokens: int = 256
    max_depth: int = 16
    seed: int = 0


def _vote(answers: Sequence[str | None]) -> str | None:
    """Majority answer; answers equal under the grader share a bucket, ties go to the earliest."""
    buckets: list[tuple[str, int, int]] = []   # (representative, votes, first index)
    for idx, a in enumerate(answers):
        if a is None:
            continue
        for j, (rep, v, first) in enumerate(buckets):
            if grading.answers_equal(a, rep):
                buckets[j] = (rep, v + 1, first)
                break
        else:
            buckets.append((a, 1, idx))
    if not buckets:
        return None
    return sorted(buckets, key=lambda b: (-b[1], b[2]))[0][0]


def evaluate(problems: Sequence[dict[str, Any]], policy, executor, cfg: EvalConfig,
             meta: dict[str, Any] | None = None, scorer=None) -> dict[str, Any]:
    """Run the configured methods; `scorer` (a PPM) adds best-of-N over the majority samples.
    Every method reports accuracy, generated tokens per problem and seconds."""
    t0 = time.monotonic()
    golds = [str(p["answer"]) for p in problems]
    questions = [p["problem"] for p in problems]
    report: dict[str, Any] = {"problems": len(problems), "config": asdict(cfg), **(meta or {})}
    graders: Counter = Counter()
    if cfg.greedy:
        t = time.monotonic()
        rs = run_rollouts(policy, executor, questions, temperature=0.0, max_tokens=cfg.max_tokens,
                          max_depth=cfg.max_depth)
        rows = []
        for p, r, g in zip(problems, rs, golds):
            ok, how = grade(r.answer, g)
            graders[how] += 1
            rows.append({"id": p.get("id"), "gold": g, "answer": r.answer, "correct": ok, "format_ok": r.format_ok,
                         "failure": r.failure, "steps": len(r.steps), "tokens": r.tokens,
                         "generated_steps": r.generated, "well_formed_steps": r.well_formed,
                         "trajectory": "".join(r.steps)})
        n = max(1, len(rows))
        report["greedy"] = {
            "accuracy": sum(r["correct"] for r in rows) / n,
            "format_rate": sum(r["format_ok"] for r in rows) / n,
            "answered_rate": sum(r["answer"] is not None for r in rows) / n,
            # share of the steps the policy wrote that are well-formed (ended with a stop string)
            "step_format_rate": sum(r.well_formed for r in rs) / max(1, sum(r.generated for r in rs)),
            "failures": dict(Counter(r["failure"] or "none" for r in rows)),
            "tokens": sum(r["tokens"] for r in rows), "tokens_per_problem": sum(r["tokens"] for r in rows) / n,
            "seconds": round(time.monotonic() - t, 1), "per_problem": rows,
        }
    if cfg.samples > 0:
        t = time.monotonic()
        qs = [q for q in questions for _ in range(cfg.samples)]
        seeds = [cfg.seed * 7919 + i for i in range(len(qs))]
        rs = run_rollouts(policy, executor, qs, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                          max_depth=cfg.max_depth, seeds=seeds)
        groups = [rs[i * cfg.samples:(i + 1) * cfg.samples] for i in range(len(problems))]
        answers = [[r.answer for r in g] for g in groups]
        tokens = [[r.tokens for r in g] for g in groups]
        n = max(1, len(problems))
        curve = {}
        for k in range(1, cfg.samples + 1):
            correct = 0
            for ans, g in zip(answers, golds):
                ok, how = grade(_vote(ans[:k]), g)
                correct += ok
            curve[k] = correct / n
        # tokens per problem of the first k samples (the x axis of accuracy against compute)
        tokens_curve = {k: sum(sum(t[:k]) for t in tokens) / n for k in range(1, cfg.samples + 1)}
        report["majority"] = {"samples": cfg.samples, "temperature": cfg.temperature,
                              "accuracy": curve[cfg.samples], "curve": curve, "tokens_curve": tokens_curve,
                              "tokens_per_problem": tokens_curve[cfg.samples],
                              "format_rate": sum(r.format_ok for r in rs) / max(1, len(rs)),
                              "seconds": round(time.monotonic() - t, 1), "answers": answers, "tokens": tokens}
        if scorer is not None:
            t = time.monotonic()
            scores, ppm_version = best_of(scorer, questions, groups)
            bcurve = {}
            for k in range(1, cfg.samples + 1):
                bcurve[k] = sum(grade(_pick_best(a[:k], sc[:k]), g)[0]
                                for a, sc, g in zip(answers, scores, golds)) / n
            report["best_of"] = {"samples": cfg.samples, "accuracy": bcurve[cfg.samples], "curve": bcurve,
                                 "tokens_curve": tokens_curve, "tokens_per_problem": tokens_curve[cfg.samples],
                                 "scores": scores, "ppm_seconds": round(time.monotonic() - t, 1),
                                 "ppm_version": ppm_version}
    if cfg.mcts:
        if not cfg.search_address:
            raise ValueError("MCTS evaluation needs the search service address (--search-address)")
        res = {}
        for n in cfg.mcts:
            t = time.monotonic()
            rows = mcts_answers(cfg.search_address, problems, n, cfg.mcts_rollouts, cfg.seed,
                                max_tokens=cfg.mcts_max_tokens, candidates=cfg.mcts_candidates,
                                concurrency=cfg.mcts_concurrency)
            oks = [grade(r["answer"] or None, g)[0] for r, g in zip(rows, golds)]
            res[n] = {"accuracy": sum(oks) / max(1, len(oks)), "answers": [r["answer"] for r in rows],
                      "tokens_per_problem": sum(r["tokens"] for r in rows) / max(1, len(rows)),
                      "per_problem": [{**r, "correct": ok} for r, ok in zip(rows, oks)],
                      "budget": {"trajectories": n, "rollouts": cfg.mcts_rollouts, "max_tokens": cfg.mcts_max_tokens,
                                 "candidates": cfg.mcts_candidates},
                      "seconds": round(time.monotonic() - t, 1)}
        report["mcts"] = res
    report["graders"] = dict(graders)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report (what manifests and gates use)."""
    out: dict[str, Any] = {"problems": report.get("problems")}
    if "greedy" in report:
        out["greedy_accuracy"] = report["greedy"]["accuracy"]
        out["format_rate"] = report["greedy"]["format_rate"]
        if "step_format_rate" in report["greedy"]:
            out["step_format_rate"] = report["greedy"]["step_format_rate"]
    if "majority" in report:
        out[f"maj@{report['majority']['samples']}"] = report["majority"]["accuracy"]
    if "best_of" in report:
        out[f"ppm_best_of@{report['best_of']['samples']}"] = report["best_of"]["accuracy"]
    for n, r in (report.get("mcts") or {}).items():
        out[f"mcts@{n}"] = r["accuracy"]
    return out


def plot(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """PNG: accuracy against the number of trajectories (greedy line, majority curve, MCTS points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs_max = 1
    if "majority" in report:
        curve = {int(k): v for k, v in report["majority"]["curve"].items()}
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label="majority vote (sampled)")
        xs_max = max(xs_max, ks[-1])
    if report.get("mcts"):
        ns = sorted(int(n) for n in report["mcts"])
        ax.plot(ns, [report["mcts"][n if n in report["mcts"] else str(n)]["accuracy"] for n in ns],
                marker="s", label="MCTS + PPM")
        xs_max = max(xs_max, ns[-1])
    if "greedy" in report:
        ax.axhline(report["greedy"]["accuracy"], color="gray", linestyle="--",
                   label=f"greedy ({report['greedy']['accuracy']:.1%})")
        ax.plot([1], [report["greedy"]["accuracy"]], marker="x", color="gray")
    ax.set_xlabel("trajectories")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.5, xs_max + 0.5)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{report.get('dataset', '')} ({report.get('problems')} problems)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict[str, Any], out_json: str | Path, out_png: str | Path | None = None) -> None:
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2, default=str))
    if out_png:
        plot(report, out_png)
