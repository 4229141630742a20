"""Benchmark of the search engine (issue 3): batching speed-up and bookkeeping overhead.

Prints, from one run:
1. synthesis throughput (problems per minute) at batch 1 vs batch N (default 32)
   and their ratio (goal: >= 5x from batching on 2 CPU cores);
2. the share of search wall time spent outside policy, PPM and sandbox calls
   (goal: < 10%).

By default the three services are deterministic fakes that sleep like the real
ones would on 2 CPU cores: the policy like vLLM with SmolLM2-135M (34 tok/s for
one sequence, ~283 tok/s for 32: a decode step costs 26.7 ms + 2.7 ms per
sequence), the PPM 20 ms + 4 ms per prefix, the sandbox 5 ms + 5 ms per program
over 2 workers. `--time-scale` shrinks every sleep (the ratio of simulated times
does not change; the overhead share grows as the sleeps shrink, so a scale < 1
overstates it). With `--policy/--ppm/--sandbox ADDR` it runs against real
services instead (e.g. the tiny-model services of the integration test).

    python bench/bench_search.py                    # ~1-2 minutes
    python bench/bench_search.py --problems 64 --time-scale 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rstar.search.core import SearchCore, SearchOptions, SynthesisProblem  # noqa: E402
from rstar.search.engine import Stats  # noqa: E402
from rstar_testing.fakes import HashScorer, InProcessExecutor, SimulatedLatency, WalkPolicy  # noqa: E402
from rstar.search.mcts import PPM_AUGMENTED  # noqa: E402


def services(args):
    if args.policy:
        from rstar.clients import PolicyClient, PPMClient, SandboxClient

        return PolicyClient(args.policy), PPMClient(args.ppm), SandboxClient(args.sandbox)
    s = args.time_scale
    policy = SimulatedLatency(WalkPolicy(), "policy", base=0.02, time_scale=s)
    scorer = SimulatedLatency(HashScorer(), "ppm", base=0.02, per_item=0.004, time_scale=s)
    executor = SimulatedLatency(InProcessExecutor(), "sandbox", base=0.005, per_item=0.005 / 2, time_scale=s)
    return policy, scorer, executor


def run(args, batch: int, n_problems: int) -> tuple[float, Stats]:
    policy, scorer, executor = services(args)
    core = SearchCore(policy, executor, scorer, store=None)
    problems = [SynthesisProblem(id=f"p{i}", problem=f"Add up the numbers of problem {i}.", answer=str(10 + i % 7))
                for i in range(n_problems)]
    opts = SearchOptions(rollouts=args.rollouts, k=args.k, annotation=PPM_AUGMENTED, seed=1,
                         max_active_trees=batch, max_step_tokens=args.max_step_tokens)
    t0 = time.perf_counter()
    out = core.synthesize(problems, opts, store_trees=False)
    wall = time.perf_counter() - t0
    return n_problems / wall * 60.0, out.stats


def share_outside(stats: Stats) -> float:
    return stats.other_seconds / stats.total_seconds if stats.total_seconds else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="trees advanced together in the batched run")
    ap.add_argument("--problems", type=int, default=32, help="problems in the batched run")
    ap.add_argument("--problems-batch1", type=int, default=8, help="problems in the batch-1 run (rate is per problem)")
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-step-tokens", type=int, default=256)
    ap.add_argument("--time-scale", type=float, default=0.25, help="multiply every simulated latency")
    ap.add_argument("--policy", default="", help="real PolicyService address (then --ppm and --sandbox too)")
    ap.add_argument("--ppm", default="")
    ap.add_argument("--sandbox", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rate1, st1 = run(args, 1, args.problems_batch1)
    rate_n, st_n = run(args, args.batch, args.problems)
    # the engine's own cost, with no service latency at all (fakes answer instantly)
    zero = argparse.Namespace(**{**vars(args), "time_scale": 0.0, "policy": ""})
    _rate0, st0 = run(zero, args.batch, args.problems)
    result = {
        "services": "real" if args.policy else f"simulated (time scale {args.time_scale})",
        "rollouts": args.rollouts, "k": args.k,
        "batch1": {"problems": args.problems_batch1, "problems_per_minute": round(rate1, 2),
                   "policy_calls": st1.policy_calls, "outside_share": round(share_outside(st1), 4)},
        f"batch{args.batch}": {"problems": args.problems, "problems_per_minute": round(rate_n, 2),
                               "policy_calls": st_n.policy_calls, "outside_share": round(share_outside(st_n), 4),
                               "stage_seconds": {"generate": round(st_n.generate_seconds, 3),
                                                 "ppm": round(st_n.ppm_seconds, 3),
                                                 "sandbox": round(st_n.sandbox_seconds, 3),
                                                 "other": round(st_n.other_seconds, 3),
                                                 "total": round(st_n.total_seconds, 3)}},
        "speedup": round(rate_n / rate1, 2),
        "engine_us_per_node": round(st0.total_seconds / max(1, st0.nodes) * 1e6, 1),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"services: {result['services']}; rollouts {args.rollouts}, k {args.k}")
    print(f"batch 1 : {rate1:8.1f} problems/min ({args.problems_batch1} problems, {st1.policy_calls} policy calls, "
          f"outside-call share {share_outside(st1):.1%})")
    print(f"batch {args.batch}: {rate_n:8.1f} problems/min ({args.problems} problems, {st_n.policy_calls} policy calls, "
          f"outside-call share {share_outside(st_n):.1%})")
    print(f"speed-up from batching: {rate_n / rate1:.1f}x (goal >= 5x)")
    print(f"share of wall time outside policy/PPM/sandbox calls at batch {args.batch}: "
          f"{share_outside(st_n):.1%} (goal < 10%)")
    print(f"engine bookkeeping without any service latency: {result['engine_us_per_node']} us per node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
