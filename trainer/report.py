"""`rstar report`: evolution rounds and `rstar eval` reports -> one self-contained HTML page of plots.

Inputs, read only:
- rounds from an object store: `rounds/round-<n>/state.json` (`rstar.rounds`), the stage
  summaries (`summary_key`), the eval stage's `eval-report.json`, and the round's trajectory
  shards (`rstar.trees`);
- standalone `rstar eval` reports (`trainer.evaluate.write_report`; `.json` or gzipped
  `.json.gz`), each under a label (`LABEL=FILE`, else the file name). A report whose label
  (or whose model, `policy@r2`) is `base` or `r<n>` is also placed at that round.

Plots (PNG, matplotlib), one section each, embedded as data URIs (the page loads nothing):
- accuracy per round: greedy, majority@N and MCTS+PPM@N, base model first;
- accuracy against the number of trajectories, one line per round and method;
- PPM pairwise accuracy: on its training pairs (the train-ppm summary, where the training
  recorded it) and on the pairs `trainer.data.build_pairs` builds from the next round's trees,
  scored with the `ppm_score` the search stored on each node (the PPM that guided that search);
- PPM calibration: stored node scores in bins against the share of those nodes whose subtree
  holds a correct answer (a PPM in [-1, 1] that estimates the value predicts (s + 1) / 2);
- synthesized problems solved per round and bootstrap method;
- time per stage (task start and end times in the round state);
- with eval reports: accuracy against trajectories and against generated tokens per problem,
  one line per method (greedy, majority, PPM best-of-N, MCTS+PPM) and report.
A quantity the input lacks is named in its section ("not in the input: ...") instead of
plotted; the page is still written.

This module computes nothing that needs a model: no scoring, no generation, no grading
(verdicts come from the stored trees and reports). It writes only the page and, with
`png_dir`, the PNGs.
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rstar import rounds as rstate
from rstar.store import NotFound
from rstar.trees import TreeRecord

# section ids, in page order (also the PNG file names under --png-dir)
ROUND_SECTIONS = ("accuracy-by-round", "accuracy-vs-trajectories", "ppm-pair-accuracy", "ppm-calibration",
                  "synthesis-solved", "stage-time")
EVAL_SECTIONS = ("eval-accuracy-vs-trajectories", "eval-accuracy-vs-tokens")
CALIBRATION_BINS = 10
_POSITION = re.compile(r"^(base|r\d+)$")


# --------------------------------------------------------------------------- inputs


@dataclass
class PPMTreeStats:
    """What the stored PPM scores of one round's trees say (the PPM that guided that round's search)."""

    ppm_version: str = ""
    pairs: int = 0                 # preference pairs whose two nodes both carry a score
    pairs_right: int = 0           # ... scored higher on the preferred side
    # per calibration bin: (sum of scores, nodes, nodes whose subtree holds a correct answer)
    bins: list[list[float]] = field(default_factory=lambda: [[0.0, 0, 0] for _ in range(CALIBRATION_BINS)])

    @property
    def scored_nodes(self) -> int:
        return int(sum(b[1] for b in self.bins))


@dataclass
class RoundInput:
    number: int
    state: rstate.RoundState | None
    summaries: dict[str, Any]
    stage_eval: dict[str, Any] | None          # rounds/round-<n>/eval-report.json: {"candidate", "current"}
    ppm: PPMTreeStats
    synthesis_shards: list[dict[str, Any]] = field(default_factory=list)   # synthesis-<i>.json summaries


@dataclass
class EvalInput:
    label: str
    path: str
    report: dict[str, Any]


@dataclass
class ReportInputs:
    rounds: list[RoundInput]
    evals: list[EvalInput]
    store_url: str = ""

    def eval_at(self, position: str) -> EvalInput | None:
        """The eval report placed at a round position (`base`, `r<n>`), if any (the last given wins)."""
        found = [e for e in self.evals if eval_position(e) == position]
        return found[-1] if found else None


def read_eval_report(path: str | Path) -> dict[str, Any]:
    """An `rstar eval` JSON report, plain or gzipped (ValueError if it is not one)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    report = json.loads(raw)
    if not isinstance(report, dict) or not any(k in report for k in ("greedy", "majority", "mcts")):
        raise ValueError(f"{path}: not an `rstar eval` report (no greedy, majority or mcts section)")
    return report


def parse_eval_arg(arg: str) -> EvalInput:
    """`[LABEL=]FILE`; the label defaults to the file name without .json/.json.gz."""
    label, sep, path = arg.partition("=")
    if not sep or not label or "/" in label:
        path, label = arg, re.sub(r"\.json(\.gz)?$", "", Path(arg).name)
    return EvalInput(label, path, read_eval_report(path))


def eval_position(e: EvalInput) -> str | None:
    """`base` / `r<n>` when the label or the report's model names one (`policy@r2`, `policy/r2`)."""
    if _POSITION.match(e.label):
        return e.label
    model = str(e.report.get("model") or "")
    version = re.sub(r"^policy[@/]", "", model)
    return version if version != model and _POSITION.match(version) else None


def load_round(store, number: int) -> RoundInput:
    state = rstate.load_state(store, number)
    summaries = dict(state.summaries) if state else {}
    for stage in rstate.STAGES:   # a running round has summaries its state has not copied yet
        if stage not in summaries:
            got = _get_json(store, rstate.summary_key(number, stage))
            if got is not None:
                summaries[stage] = got
    shards = [_get_json(store, rstate.summary_key(number, f"synthesis-{i}"))
              for i in range(state.shards if state else 0)]
    return RoundInput(number, state, summaries, _get_json(store, f"{rstate.round_prefix(number)}eval-report.json"),
                      ppm_tree_stats(_round_trees(store, number)), [x for x in shards if x])


def collect(store=None, round_numbers: Sequence[int] | None = None, evals: Sequence[EvalInput] = ()) -> ReportInputs:
    """Everything the page shows; `round_numbers` None = every round the store has."""
    rounds = []
    if store is not None:
        numbers = rstate.known_rounds(store) if round_numbers is None else list(round_numbers)
        rounds = [load_round(store, n) for n in numbers]
    return ReportInputs(rounds, list(evals), store.url if store is not None else "")


def _get_json(store, key: str) -> Any | None:
    try:
        return json.loads(store.get(key))
    except NotFound:
        return None


def _round_trees(store, number: int) -> Iterable[TreeRecord]:
    from trainer.data import iter_round_trees

    return (tree for _, tree in iter_round_trees(store, number))


# --------------------------------------------------------------------------- PPM quantities from trees


def ppm_tree_stats(trees: Iterable[TreeRecord]) -> PPMTreeStats:
    """Pairwise accuracy and calibration of the stored `ppm_score`s, streaming over the trees."""
    from trainer.data import PairConfig, _outcomes, build_pairs

    out = PPMTreeStats()
    versions: set[str] = set()
    for tree in trees:
        if not any(n.ppm_score is not None for n in tree.nodes[1:]):
            continue
        versions.add(str(tree.model_versions.get("ppm") or ""))
        # the same labels the PPM's training pairs use: a subtree holds a correct answer
        good, _ = _outcomes(tree)
        for n in tree.nodes[1:]:
            if n.ppm_score is not None:
                b = out.bins[_bin(n.ppm_score)]
                b[0] += float(n.ppm_score)
                b[1] += 1
                b[2] += int(good[n.id])
        by_prefix = {tuple(tree.prefix_steps(n.id)): n for n in tree.nodes[1:]}
        for p in build_pairs(tree, PairConfig()):
            pos, neg = by_prefix.get(p.pos), by_prefix.get(p.neg)
            if pos is None or neg is None or pos.ppm_score is None or neg.ppm_score is None:
                continue
            out.pairs += 1
            out.pairs_right += int(pos.ppm_score > neg.ppm_score)
    out.ppm_version = ", ".join(sorted(v for v in versions if v)) or ("unnamed" if versions else "")
    return out


def _bin(score: float) -> int:
    """Equal-width bins over the PPM's range [-1, 1]."""
    return min(CALIBRATION_BINS - 1, max(0, int((float(score) + 1.0) / 2.0 * CALIBRATION_BINS)))


# --------------------------------------------------------------------------- numbers per round


def positions(inp: ReportInputs) -> list[str]:
    """Round positions on the x axis: `base` (the first round's CURRENT) when known, then r<n>."""
    out = [f"r{r.number}" for r in inp.rounds]
    first = inp.rounds[0] if inp.rounds else None
    has_base = first is not None and (first.number == 1 and (first.summaries.get("eval") or {}).get("current"))
    return (["base"] if has_base or inp.eval_at("base") else []) + out


def eval_summary_at(inp: ReportInputs, position: str) -> dict[str, Any]:
    """Headline accuracies of one position: greedy from the eval stage (the gate's number), majority and
    MCTS from an eval report placed there (the stage runs greedy only)."""
    out: dict[str, Any] = {}
    if position == "base" and inp.rounds and inp.rounds[0].number == 1:
        stage = (inp.rounds[0].summaries.get("eval") or {}).get("current") or {}
    elif position != "base":
        r = next((r for r in inp.rounds if f"r{r.number}" == position), None)
        stage = (r.summaries.get("eval") or {}).get("candidate") or {} if r else {}
    else:
        stage = {}
    if stage.get("greedy_accuracy") is not None:
        out["greedy"] = stage["greedy_accuracy"]
    e = inp.eval_at(position)
    if e is not None:
        rep = e.report
        if "greedy" not in out and "greedy" in rep:
            out["greedy"] = rep["greedy"]["accuracy"]
        if "majority" in rep:
            out[f"majority@{rep['majority']['samples']}"] = rep["majority"]["accuracy"]
        if "best_of" in rep:
            out[f"PPM best-of-{rep['best_of']['samples']}"] = rep["best_of"]["accuracy"]
        if rep.get("mcts"):
            n = max(int(k) for k in rep["mcts"])
            out[f"MCTS+PPM@{n}"] = _mcts_entry(rep, n)["accuracy"]
    return out


def _mcts_entry(report: dict[str, Any], n: int) -> dict[str, Any]:
    m = report["mcts"]
    return m[n] if n in m else m[str(n)]   # JSON turns the int keys into strings


# the methods of an eval report: (report section, name on the page), in page order
METHODS = (("greedy", "greedy"), ("majority", "majority"), ("best_of", "PPM best-of-N"), ("mcts", "MCTS+PPM"))


def trajectory_curves(report: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """method -> [(trajectories, accuracy)] of one eval report."""
    out: dict[str, list[tuple[int, float]]] = {}
    for key, name in METHODS:
        sec = report.get(key)
        if not sec:
            continue
        if key == "greedy":
            out[name] = [(1, sec["accuracy"])]
        elif key == "mcts":
            out[name] = sorted((int(k), v["accuracy"]) for k, v in sec.items())
        else:
            out[name] = sorted((int(k), v) for k, v in sec["curve"].items())
    return out


def token_curves(report: dict[str, Any]) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """method -> [(generated tokens per problem, accuracy)], and the methods whose tokens are not recorded
    (reports written before `rstar eval` counted them for every method have them for greedy only)."""
    out: dict[str, list[tuple[float, float]]] = {}
    missing: list[str] = []
    n = max(1, int(report.get("problems") or 1))
    for key, name in METHODS:
        sec = report.get(key)
        if not sec:
            continue
        pts: list[tuple[float, float]] | None = None
        if key == "greedy":
            tpp = sec.get("tokens_per_problem")
            if tpp is None and isinstance(sec.get("tokens"), (int, float)):
                tpp = sec["tokens"] / n
            pts = None if tpp is None else [(float(tpp), sec["accuracy"])]
        elif key == "mcts":
            if all(v.get("tokens_per_problem") is not None for v in sec.values()):
                pts = sorted((float(v["tokens_per_problem"]), v["accuracy"]) for v in sec.values())
        elif sec.get("tokens_curve"):
            # the first k samples' tokens per problem against the accuracy of voting (or picking) among them
            tokens = {int(k): float(v) for k, v in sec["tokens_curve"].items()}
            pts = [(tokens[k], acc) for k, acc in sorted((int(k), v) for k, v in sec["curve"].items()) if k in tokens]
        if pts:
            out[name] = pts
        else:
            missing.append(name)
    return out, missing


def stage_seconds(r: RoundInput) -> dict[str, float]:
    """Seconds per stage: the sum over its tasks of (finished_at - started_at) of the last attempt."""
    out: dict[str, float] = {}
    if r.state is None:
        return out
    for t in r.state.tasks.values():
        if t.started_at is not None and t.finished_at is not None:
            out[t.stage] = out.get(t.stage, 0.0) + max(0.0, t.finished_at - t.started_at)
    return out


def train_pair_accuracy(r: RoundInput) -> float | None:
    """The PPM's accuracy on its own training pairs, where the training recorded it."""
    train = (r.summaries.get("train-ppm") or {}).get("train") or {}
    v = train.get("train_pair_accuracy", train.get("pair_accuracy"))
    return None if v is None else float(v)


# --------------------------------------------------------------------------- plots


@dataclass
class Section:
    id: str
    title: str
    caption: str
    png: bytes | None = None
    absent: str = ""            # why there is no plot (the input lacks the quantity)


def _figure(width: float = 6.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    # no timestamp in the PNG: the same input gives the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_accuracy_by_round(inp: ReportInputs) -> Section:
    s = Section("accuracy-by-round", "Accuracy per round",
                "Dev-set accuracy of each round's policy (base = the model CURRENT when round 1 started). "
                "Greedy comes from the eval stage; majority@N and MCTS+PPM@N from `rstar eval` reports placed "
                "at the round.")
    pos = positions(inp)
    table = {p: eval_summary_at(inp, p) for p in pos}
    methods = sorted({m for v in table.values() for m in v}, key=_method_order)
    if not methods:
        s.absent = "not in the input: no eval stage summary and no eval report placed at a round"
        return s
    fig, ax = _figure()
    for j, m in enumerate(methods):
        # a small sideways offset per method, so equal accuracies do not hide each other
        xs = [i + (j - (len(methods) - 1) / 2) * 0.06 for i, p in enumerate(pos) if m in table[p]]
        ys = [table[p][m] for p in pos if m in table[p]]
        ax.plot(xs, ys, marker="osv^D"[j % 5], label=m)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0%}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize="x-small",
                        ha="center")
    ax.set_xticks(range(len(pos)), pos)
    _accuracy_axis(ax, "round")
    s.png = _png(fig)
    missing = [m for m in ("greedy", "majority", "MCTS+PPM") if not any(x.startswith(m) for x in methods)]
    if missing:
        s.caption += f" Not in the input: {', '.join(missing)}."
    return s


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _method_order(m: str) -> tuple[int, str]:
    return (0 if m.startswith("greedy") else 1 if m.startswith("majority") else 2 if m.startswith("PPM") else 3, m)


def _accuracy_axis(ax, xlabel: str) -> None:
    """Accuracy from 0; the top follows the data (small models score a few percent: 0..1 would flatten them)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if line.get_label()[:1] != "_"]
    top = min(1.0, max(0.1, 1.2 * max(ys, default=1.0)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02 * top, top * 1.02)
    ax.yaxis.set_major_formatter(_percent())
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def plot_accuracy_vs_trajectories(inp: ReportInputs) -> Section:
    s = Section("accuracy-vs-trajectories", "Accuracy against the number of trajectories",
                "Per round: majority vote over the first k sampled trajectories (solid) and MCTS+PPM with N "
                "trajectories (dashed); greedy is the single point at 1.")
    placed = [(p, inp.eval_at(p)) for p in positions(inp)]
    placed = [(p, e) for p, e in placed if e is not None and (e.report.get("majority") or e.report.get("mcts"))]
    if not placed:
        s.absent = "not in the input: no eval report with majority or MCTS results placed at a round"
        return s
    s.png = _trajectory_figure([(p, e.report) for p, e in placed])
    return s


def _trajectory_figure(labelled: list[tuple[str, dict[str, Any]]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = _figure()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"greedy": ("x", ""), "majority": ("o", "-"), "PPM best-of-N": ("^", ":"), "MCTS+PPM": ("s", "--")}
    xmax = 1
    for i, (label, report) in enumerate(labelled):
        for method, pts in trajectory_curves(report).items():
            marker, line = styles[method]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, linestyle=line or "none",
                    color=colors[i % len(colors)], label=f"{label} {method}")
            xmax = max(xmax, pts[-1][0])
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, xmax * 1.25)
    _accuracy_axis(ax, "trajectories")
    return _png(fig)


def plot_ppm_pair_accuracy(inp: ReportInputs) -> Section:
    s = Section("ppm-pair-accuracy", "PPM pairwise accuracy",
                "Share of preference pairs the PPM scores higher on the preferred side. Training pairs: the "
                "train-ppm stage's measurement on the pairs it trained on; held-out pairs: on the pairs of the "
                "round's problems kept out of training (--ppm-holdout); next round's trees: the pairs "
                "`trainer.data.build_pairs` (default filters) builds from the trees a PPM-guided search grew, "
                "compared on the scores that PPM gave those nodes during the search.")
    bars = ppm_pair_bars(inp)
    if not bars:
        s.absent = ("not in the input: no train-ppm summary with a pair accuracy and no PPM-scored trees "
                    "(rounds before --ppm-from-round are terminal-guided)")
        return s
    fig, ax = _figure()
    labels = list(dict.fromkeys(b[0] for b in bars))
    kinds = [k for k in PAIR_KINDS if any(b[1] == k for b in bars)]
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        mine = [b for b in bars if b[1] == kind]
        xs = [labels.index(b[0]) + (j - (len(kinds) - 1) / 2) * width for b in mine]
        rects = ax.bar(xs, [b[2] for b in mine], width, label=kind)
        ax.bar_label(rects, [f"{b[2]:.0%}" + (f"\n{b[3]} pairs" if b[3] is not None else "") for b in mine],
                     fontsize="x-small")
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.2)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("pairwise accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", fontsize="small")
    s.png = _png(fig)
    return s


PAIR_KINDS = ("training pairs", "held-out pairs", "next round's trees")


def ppm_pair_bars(inp: ReportInputs) -> list[tuple[str, str, float, int | None]]:
    """(PPM version, kind in PAIR_KINDS, pairwise accuracy, pairs) for every measurement the input holds."""
    bars: list[tuple[str, str, float, int | None]] = []
    for r in inp.rounds:
        ppm = r.summaries.get("train-ppm") or {}
        acc = train_pair_accuracy(r)
        if acc is not None:
            bars.append((f"ppm r{r.number}", PAIR_KINDS[0], acc, ppm.get("pairs")))
        held = ppm.get("holdout") or {}
        if held.get("pair_accuracy") is not None:
            bars.append((f"ppm r{r.number}", PAIR_KINDS[1], float(held["pair_accuracy"]), held.get("pairs")))
        if r.ppm.pairs:
            bars.append((f"ppm {r.ppm.ppm_version or '?'}", PAIR_KINDS[2], r.ppm.pairs_right / r.ppm.pairs,
                         r.ppm.pairs))
    return bars


def plot_ppm_calibration(inp: ReportInputs) -> Section:
    s = Section("ppm-calibration", "PPM calibration",
                f"Node scores stored by PPM-guided searches in {CALIBRATION_BINS} equal bins over [-1, 1], against "
                "the share of those nodes whose subtree reaches a correct answer. A PPM that estimates the "
                "value (+1 correct, -1 wrong) lies on the dotted line (s + 1) / 2. Point labels: nodes per bin.")
    scored = [r for r in inp.rounds if r.ppm.scored_nodes]
    if not scored:
        s.absent = "not in the input: no tree node carries a PPM score (no PPM-guided round)"
        return s
    fig, ax = _figure()
    ax.plot([-1, 1], [0, 1], color="gray", linestyle=":", label="(s + 1) / 2")
    for r in scored:
        pts = [(b[0] / b[1], b[2] / b[1], int(b[1])) for b in r.ppm.bins if b[1]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"round {r.number} (ppm {r.ppm.ppm_version or '?'}, {r.ppm.scored_nodes} nodes)")
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 6), fontsize="x-small", ha="center")
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("PPM score")
    _accuracy_axis(ax, "PPM score")
    ax.set_ylabel("share reaching a correct answer")
    s.png = _png(fig)
    return s


def plot_synthesis_solved(inp: ReportInputs) -> Section:
    s = Section("synthesis-solved", "Synthesized problems solved per round",
                "Problems each round's synthesis worked on and those with at least one correct trajectory, per "
                "method (reference = verified GSM8K conversions; policy/teacher = MCTS trees).")
    rows = [(r.number, synthesis_by_method(r)) for r in inp.rounds]
    rows = [(n, m) for n, m in rows if m]
    if not rows:
        s.absent = "not in the input: no synthesis summary"
        return s
    methods = list(dict.fromkeys(k for _, m in rows for k in m))
    fig, ax = _figure()
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, (_, m) in enumerate(rows) if method in m]
        got = [m[method] for _, m in rows if method in m]
        ax.bar(xs, [g["total"] for g in got], width, color="lightgray", edgecolor="gray")
        rects = ax.bar(xs, [g["solved"] for g in got], width, label=f"{method}: solved")
        ax.bar_label(rects, [f"{g['solved']}/{g['total']}" for g in got], fontsize="x-small")
    ax.bar([], [], color="lightgray", edgecolor="gray", label="problems")
    ax.set_xticks(range(len(rows)), [f"round {n}" for n, _ in rows])
    ax.set_ylabel("problems")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize="small")
    s.png = _png(fig)
    return s


def synthesis_by_method(r: RoundInput) -> dict[str, dict[str, int]]:
    """method -> {total, solved}, summed over the per-shard summaries' `by_method` (the aggregate
    `synthesis.json` counts only the last method of a two-method bootstrap); else the aggregate."""
    out: dict[str, dict[str, int]] = {}
    for shard in r.synthesis_shards:
        for method, c in (shard.get("by_method") or {}).items():
            o = out.setdefault(method, {"total": 0, "solved": 0})
            o["total"] += int(c.get("total", 0))
            o["solved"] += int(c.get("solved", 0))
    if out:
        return out
    agg = r.summaries.get("synthesis") or {}
    if "total" not in agg:
        return {}
    return {agg.get("method") or "synthesis": {"total": int(agg["total"]), "solved": int(agg["solved"])}}


def plot_stage_time(inp: ReportInputs) -> Section:
    s = Section("stage-time", "Time per stage",
                "Wall time of each stage's last attempt (synthesis: summed over shards), from the round state.")
    rows = [(r.number, stage_seconds(r)) for r in inp.rounds]
    rows = [(n, t) for n, t in rows if t]
    if not rows:
        s.absent = ("not in the input: no task start and end times in the round state (files written before "
                    "they were recorded)")
        return s
    longest = max(sum(t.values()) for _, t in rows)
    unit, div = ("h", 3600.0) if longest >= 3 * 3600 else ("min", 60.0) if longest >= 180 else ("s", 1.0)
    fig, ax = _figure(6.4, 1.5 + 0.6 * len(rows))
    left = [0.0] * len(rows)
    for stage in rstate.STAGES:
        vals = [t.get(stage, 0.0) / div for _, t in rows]
        if any(vals):
            ax.barh(range(len(rows)), vals, left=left, label=stage)
            left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(rows)), [f"round {n}" for n, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"wall time ({unit})")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="x-small", ncols=len(rstate.STAGES),
              frameon=False)
    s.png = _png(fig)
    return s


def plot_eval_accuracy_vs_trajectories(inp: ReportInputs) -> Section:
    s = Section("eval-accuracy-vs-trajectories", "Eval reports: accuracy against the number of trajectories",
                "One line per method and report (greedy: the point at 1).")
    s.png = _trajectory_figure([(e.label, e.report) for e in inp.evals])
    return s


def plot_eval_accuracy_vs_tokens(inp: ReportInputs) -> Section:
    s = Section("eval-accuracy-vs-tokens", "Eval reports: accuracy against generated tokens per problem",
                "Tokens the policy generated per problem, one line per method and report.")
    curves = [(e.label, *token_curves(e.report)) for e in inp.evals]
    missing = sorted({f"{m} ({label})" for label, _, miss in curves for m in miss})
    if missing:
        s.caption += " Generated tokens not recorded in the report for: " + ", ".join(missing) + "."
    if not any(c for _, c, _ in curves):
        s.absent = "not in the input: no report records generated tokens"
        return s
    import matplotlib.pyplot as plt

    fig, ax = _figure()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"greedy": "x", "majority": "o", "PPM best-of-N": "^", "MCTS+PPM": "s"}
    for i, (label, c, _) in enumerate(curves):
        for method, pts in c.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers[method], color=colors[i % len(colors)],
                    linestyle="-" if len(pts) > 1 else "none", label=f"{label} {method}")
    xs = [x for _, c, _ in curves for pts in c.values() for x, _ in pts]
    if max(xs) > 10 * min(xs):   # log only where the costs span orders of magnitude (MCTS vs greedy)
        ax.set_xscale("log")
    _accuracy_axis(ax, "generated tokens per problem")
    s.png = _png(fig)
    return s


def sections(inp: ReportInputs) -> list[Section]:
    out: list[Section] = []
    if inp.rounds:
        out += [plot_accuracy_by_round(inp), plot_accuracy_vs_trajectories(inp), plot_ppm_pair_accuracy(inp),
                plot_ppm_calibration(inp), plot_synthesis_solved(inp), plot_stage_time(inp)]
    if inp.evals:
        out += [plot_eval_accuracy_vs_trajectories(inp), plot_eval_accuracy_vs_tokens(inp)]
    return out


# --------------------------------------------------------------------------- the page


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.9rem;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:right}th:first-child,td:first-child{text-align:left}figure{margin:2rem 0}img{max-width:100%}
.absent{color:#a33;font-style:italic}figcaption{font-size:.9rem;color:#555}code{font-size:.85rem}"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return html.escape(str(v))


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v:.1%}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _round_rows(inp: ReportInputs) -> list[list[Any]]:
    rows = []
    for r in inp.rounds:
        st, su = r.state, r.summaries
        synth = synthesis_by_method(r)
        ev = (su.get("eval") or {}).get("candidate") or {}
        ppm = su.get("train-ppm") or {}
        secs = sum(stage_seconds(r).values())
        rows.append([f"round {r.number}", st.status if st else "no state", ev.get("version"),
                     (su.get("promote") or {}).get("promoted"), _pct(ev.get("greedy_accuracy")),
                     ", ".join(f"{m} {c['solved']}/{c['total']}" for m, c in synth.items()) or None,
                     (su.get("train-policy") or {}).get("trajectories"),
                     "skipped" if ppm.get("skipped") else ppm.get("pairs"), round(secs, 1) if secs else None])
    return rows


def _eval_rows(inp: ReportInputs) -> list[list[Any]]:
    rows = []
    for e in inp.evals:
        rep = e.report
        g = rep.get("greedy") or {}
        n = max(1, int(rep.get("problems") or 1))
        maj = rep.get("majority") or {}
        mcts_points = sorted((int(k), v) for k, v in (rep.get("mcts") or {}).items())
        mcts = " ".join(f"@{k} {v['accuracy']:.1%}" for k, v in mcts_points)
        rows.append([e.label, eval_position(e), rep.get("model"), rep.get("dataset"), rep.get("problems"),
                     _pct(g.get("accuracy")), _pct(g.get("format_rate")),
                     f"@{maj['samples']} {maj['accuracy']:.1%}" if maj else None, mcts or None,
                     (token_curves(rep)[0].get("greedy") or [(None,)])[0][0], rep.get("seconds")])
    return rows


def render_html(inp: ReportInputs, secs: Sequence[Section], title: str = "") -> str:
    title = title or ("Round report" if inp.rounds else "Evaluation report")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>rstar report</code>"
             + (f" from <code>{html.escape(inp.store_url)}</code>" if inp.store_url else "") + ".</p>"]
    if inp.rounds:
        parts.append("<h2>Rounds</h2>" + _table(
            ["round", "status", "policy", "promoted", "greedy", "synthesis solved", "SFT trajectories",
             "PPM pairs", "seconds"], _round_rows(inp)))
    if inp.evals:
        parts.append("<h2>Eval reports</h2>" + _table(
            ["report", "at", "model", "dataset", "problems", "greedy", "format", "majority", "MCTS+PPM",
             "tokens/problem (greedy)", "seconds"], _eval_rows(inp)))
    for s in secs:
        body = (f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{base64.b64encode(s.png).decode()}'>"
                if s.png else f"<p class='absent'>{html.escape(s.absent)}</p>")
        parts.append(f"<figure id='{s.id}'><h2>{html.escape(s.title)}</h2>{body}"
                     f"<figcaption>{html.escape(s.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_page(inp: ReportInputs, out: str | Path, png_dir: str | Path | None = None,
                      title: str = "") -> list[Section]:
    """Write the page (and, with `png_dir`, each plot as `<section id>.png`); returns the sections."""
    secs = sections(inp)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(inp, secs, title), encoding="utf-8")
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for s in secs:
            if s.png:
                (Path(png_dir) / f"{s.id}.png").write_bytes(s.png)
    return secs
