"""Sandbox benchmark: warm isolated pool vs a fresh interpreter per execution.

Runs a typical step program (a few lines with sympy) N times at the same
client concurrency both ways and prints executions/s, median and p90 latency,
and the speed ratio, plus the isolation layers that were active.

    python bench/bench_sandbox.py                 # defaults: 2 concurrent callers
    python bench/bench_sandbox.py --grpc          # through the real gRPC service
    python bench/bench_sandbox.py --json          # one JSON object for machines
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rstar.sandbox.config import SandboxConfig  # noqa: E402
from rstar.sandbox.pool import Sandbox  # noqa: E402
from rstar.sandbox.isolation import LAYERS  # noqa: E402

STEP_PROGRAM = """\
from sympy import symbols, solve, Rational, simplify
x = symbols('x')
# Step 1: solve 2x + 6 = 20
sol = solve(2*x + 6 - 20, x)[0]
# Step 2: three quarters of it, simplified
ans = simplify(Rational(3, 4) * sol)
print(ans)
"""
EXPECTED = "21/4\n"


def measure(run_one, n: int, concurrency: int) -> dict:
    """`n` calls of `run_one()` from `concurrency` threads; each returns its stdout."""
    latencies: list[float] = []
    lock = threading.Lock()
    bad = []

    def one(_):
        t = time.perf_counter()
        out = run_one()
        dt = time.perf_counter() - t
        with lock:
            latencies.append(dt)
            if out != EXPECTED:
                bad.append(out)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    if bad:
        raise SystemExit(f"wrong output from the benchmark program: {bad[0]!r}")
    lat = sorted(latencies)
    return {"executions": n, "seconds": round(wall, 3), "per_second": round(n / wall, 2),
            "median_ms": round(statistics.median(lat) * 1000, 2),
            "p90_ms": round(lat[int(0.9 * (len(lat) - 1))] * 1000, 2)}


def fresh_interpreter() -> str:
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", STEP_PROGRAM], capture_output=True, text=True, env=env,
                          timeout=60).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", type=int, default=16, help="executions with a fresh interpreter (baseline)")
    ap.add_argument("--pool", type=int, default=300, help="executions on the warm pool")
    ap.add_argument("--concurrency", type=int, default=2, help="concurrent callers (and max_concurrent of the pool)")
    ap.add_argument("--pool-size", type=int, default=2, help="warm workers kept ready")
    ap.add_argument("--layers", default=",".join(LAYERS), help="isolation layers to use where they work")
    ap.add_argument("--grpc", action="store_true", help="call the pool through the gRPC service on loopback")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    config = SandboxConfig(pool_size=args.pool_size, max_concurrent=args.concurrency,
                           layers=[x for x in args.layers.split(",") if x], require_layers=["rlimits"], port=0)
    channel = service = None
    if args.grpc:
        import grpc

        from rstar.v1 import sandbox_pb2, sandbox_pb2_grpc
        from sandbox_svc.server import create_server

        service = create_server(config).start()
        service.load()  # starts the pool the service owns
        sandbox = service.core
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        request = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code=STEP_PROGRAM)])

        def warm_pool() -> str:
            return stub.Execute(request, timeout=60).results[0].stdout
    else:
        sandbox = Sandbox(config)
        sandbox.start()

        def warm_pool() -> str:
            return sandbox.execute([STEP_PROGRAM])[0].stdout

    try:
        for _ in range(4):  # first calls warm the client side
            warm_pool()
        pool = measure(warm_pool, args.pool, args.concurrency)
        fresh = measure(fresh_interpreter, args.fresh, args.concurrency)
    finally:
        if channel is not None:
            channel.close()
        if service is not None:
            service.close()  # stops the server, then the pool it owns
        else:
            sandbox.close()

    report = {
        "program": "sympy step (solve + Rational + simplify)",
        "cores": len(os.sched_getaffinity(0)),
        "concurrency": args.concurrency,
        "via": "grpc" if args.grpc else "in-process",
        "isolation_layers": sandbox.state.layers,
        "unavailable_layers": sandbox.state.errors,
        "fresh_interpreter": fresh,
        "warm_pool": pool,
        "speedup_throughput": round(pool["per_second"] / fresh["per_second"], 1),
        "speedup_median_latency": round(fresh["median_ms"] / pool["median_ms"], 1),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"sandbox benchmark: {report['program']}, {report['cores']} cores, {args.concurrency} concurrent callers, "
          f"{report['via']}")
    print(f"isolation layers active: {', '.join(report['isolation_layers']) or 'none'}")
    for layer, err in report["unavailable_layers"].items():
        print(f"  unavailable: {layer}: {err}")
    print(f"{'mode':<22}{'executions':>11}{'exec/s':>10}{'median ms':>11}{'p90 ms':>9}")
    for name, r in (("fresh python -c", fresh), ("warm isolated pool", pool)):
        print(f"{name:<22}{r['executions']:>11}{r['per_second']:>10.1f}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}")
    print(f"speed ratio (throughput): {report['speedup_throughput']}x; "
          f"median latency: {report['speedup_median_latency']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
