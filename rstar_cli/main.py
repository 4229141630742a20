"""The `rstar` command line.

    rstar up [--detach]       start the four services on loopback, wait for health
    rstar down                stop services started with --detach
    rstar status              health and model versions of each service
    rstar solve "PROBLEM"     solve through the search service (progress, trajectory, stats)
    rstar demo                up + solve a sample problem + down (the README's main job)
    rstar serve SERVICE ...   run one service in the foreground (same as python -m SERVICE)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rstar.config import home_dir
from rstar.services import SERVICES as SERVICE_TABLE, START_ORDER

SERVICES = START_ORDER
DEMO_BUDGET = (4, 4)  # rollouts, candidates per expansion for `rstar demo` without budget flags
DEFAULT_ROLLOUTS = 8  # used when other budget flags are given without --rollouts
SAMPLE_PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def _eprint(*a, **kw):
    print(*a, file=sys.stderr, **kw)


# ---------------------------------------------------------------- services


@dataclass
class Endpoint:
    name: str
    address: str
    metrics_url: str


def endpoints(host: str = "127.0.0.1", base_port: int | None = None) -> dict[str, Endpoint]:
    out = {}
    for name, spec in SERVICE_TABLE.items():
        port = spec.port if base_port is None else base_port + spec.offset
        mport = spec.metrics_port if base_port is None else base_port + 100 + spec.offset
        out[name] = Endpoint(name, f"{host}:{port}", f"http://{host}:{mport}/metrics")
    return out


def _run_dir() -> Path:
    return home_dir() / "run"


def _health(address: str, timeout: float = 2.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
            else e.code().name


def default_store_url() -> str:
    return os.environ.get("RSTAR_STORE_URL") or str(home_dir() / "store")


def start_services(eps: dict[str, Endpoint], extra_env: dict[str, str] | None = None,
                   log_dir: Path | None = None, service_args: dict[str, list[str]] | None = None,
                   store_url: str | None = None) -> dict[str, subprocess.Popen]:
    """Start the four services as subprocesses; with `store_url`, policy and PPM serve the
    registry's promoted versions (and hot-reload), search writes trees there."""
    log_dir = log_dir or home_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("PYTHONUNBUFFERED", "1")
    procs = {}
    for name in SERVICES:
        ep = eps[name]
        port = ep.address.rsplit(":", 1)[1]
        mport = ep.metrics_url.rsplit(":", 1)[1].split("/")[0]
        args = [sys.executable, "-m", SERVICE_TABLE[name].module, "--port", port, "--metrics-port", mport]
        if name == "search":
            args += ["--policy-address", eps["policy"].address, "--ppm-address", eps["ppm"].address,
                     "--sandbox-address", eps["sandbox"].address]
        if store_url and name in ("policy", "ppm", "search"):
            args += ["--store-url", store_url]
        args += (service_args or {}).get(name, [])
        log = open(log_dir / f"{name}.log", "ab")
        procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        log.close()
    return procs


def busy_ports(eps: dict[str, Endpoint]) -> list[str]:
    """The endpoints whose gRPC or metrics port is already taken on this host."""
    import socket

    out = []
    for name, ep in eps.items():
        for what, port in (("grpc", ep.address.rsplit(":", 1)[1]),
                           ("metrics", ep.metrics_url.rsplit(":", 1)[1].split("/")[0])):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0" if what == "metrics" else ep.address.rsplit(":", 1)[0], int(port)))
                except OSError:
                    out.append(f"{name} {what} port {port}")
    return out


def _check_ports(eps: dict[str, Endpoint]) -> bool:
    taken = busy_ports(eps)
    if taken:
        _eprint("error: in use: " + ", ".join(taken) + " (services already running? `rstar status`, `rstar down`, "
                "or pick other ports with --base-port)")
    return not taken


def wait_healthy(eps: dict[str, Endpoint], procs: dict[str, subprocess.Popen] | None = None,
                 timeout: float = 900.0, quiet: bool = False) -> None:
    deadline = time.monotonic() + timeout
    pending = set(eps)
    start = time.monotonic()
    while pending:
        for name in sorted(pending):
            if procs and procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {procs[name].returncode}; see its log "
                                   f"({home_dir() / 'logs' / (name + '.log')})")
            if _health(eps[name].address, 1.0) == "SERVING":
                pending.discard(name)
                if not quiet:
                    _eprint(f"  {name:8s} SERVING after {time.monotonic() - start:5.1f} s")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(sorted(pending))}")
        if pending:
            time.sleep(0.5)


def stop_services(procs: dict[str, subprocess.Popen], grace: float = 20.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _print_endpoints(eps: dict[str, Endpoint]) -> None:
    print("services:")
    for name in ("policy", "ppm", "sandbox", "search"):
        ep = eps[name]
        print(f"  {name:8s} grpc {ep.address:18s} metrics {ep.metrics_url}")
    print(f"logs: {home_dir() / 'logs'}")


def _model_args(args) -> dict[str, list[str]]:
    """`--model NAME` for the policy and PPM services (an embedded model's name or a directory)."""
    model = getattr(args, "model", "") or ""
    return {"policy": ["--model", model], "ppm": ["--model", model]} if model else {}


def cmd_up(args) -> int:
    eps = endpoints(args.host, args.base_port)
    run = _run_dir()
    state_file = run / "services.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        alive = [n for n, pid in state.get("pids", {}).items() if _pid_alive(pid)]
        if alive:
            _eprint(f"services already running ({', '.join(alive)}); `rstar down` first")
            return 1
    if not _check_ports(eps):
        return 1
    _eprint("starting policy, ppm, sandbox and search (first start downloads and converts the default model, ~4 min)...")
    procs = start_services(eps, store_url=None if args.no_registry else default_store_url(),
                           service_args=_model_args(args))
    try:
        wait_healthy(eps, procs, timeout=args.timeout)
    except (RuntimeError, TimeoutError, KeyboardInterrupt) as e:
        _eprint(f"error: {e}" if not isinstance(e, KeyboardInterrupt) else "interrupted")
        stop_services(procs)
        return 1
    _print_endpoints(eps)
    if args.detach:
        run.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"pids": {n: p.pid for n, p in procs.items()},
                                          "endpoints": {n: e.address for n, e in eps.items()}}))
        print("detached; stop with `rstar down`")
        return 0
    print("Ctrl-C stops them all")
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        _eprint(f"error: {', '.join(dead)} exited; stopping the others")
        return 1
    except KeyboardInterrupt:
        _eprint("stopping...")
        return 0
    finally:
        stop_services(procs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def cmd_down(args) -> int:
    state_file = _run_dir() / "services.json"
    if not state_file.exists():
        _eprint("no detached services recorded")
        return 0
    pids = json.loads(state_file.read_text()).get("pids", {})
    for name, pid in pids.items():
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    while any(_pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids.values():
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    state_file.unlink()
    print("stopped")
    return 0


def _addresses(args) -> dict[str, str]:
    eps = endpoints(args.host, args.base_port)
    out = {n: e.address for n, e in eps.items()}
    for n in out:
        override = getattr(args, f"{n}_address", None) or os.environ.get(f"RSTAR_{n.upper()}_ADDRESS")
        if override:
            out[n] = override
    return out


def cmd_status(args) -> int:
    import grpc

    from rstar.v1 import common_pb2, policy_pb2_grpc, ppm_pb2_grpc, sandbox_pb2_grpc, search_pb2_grpc

    stubs = {"policy": policy_pb2_grpc.PolicyServiceStub, "ppm": ppm_pb2_grpc.PPMServiceStub,
             "sandbox": sandbox_pb2_grpc.SandboxServiceStub, "search": search_pb2_grpc.SearchServiceStub}
    rows, ok = [], True
    for name, addr in _addresses(args).items():
        health = _health(addr)
        versions, details = "", {}
        if health not in ("UNREACHABLE",):
            try:
                with grpc.insecure_channel(addr) as ch:
                    info = stubs[name](ch).Info(common_pb2.InfoRequest(), timeout=5)
                versions = ", ".join(f"{m.name}={m.version}" for m in info.models)
                details = dict(info.details)
            except grpc.RpcError as e:
                versions = f"(Info failed: {e.code().name})"
        ok &= health == "SERVING"
        rows.append({"service": name, "address": addr, "health": health, "models": versions, "details": details})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['service']:8s} {r['address']:18s} {r['health']:12s} {r['models']}")
    return 0 if ok else 1


# ---------------------------------------------------------------- solve


def _solve_request(args):
    from rstar.v1 import search_pb2

    strategy = {"top-ppm": search_pb2.TOP_PPM, "majority": search_pb2.MAJORITY_VOTE,
                "weighted": search_pb2.PPM_WEIGHTED_VOTE}[args.strategy]
    fields = dict(rollouts=args.rollouts or 0, candidates_per_expansion=args.k, max_depth=args.max_depth,
                  max_tokens=args.max_tokens, max_wall_seconds=args.max_seconds, trajectories=args.trajectories)
    budget = None
    if any(fields.values()):  # no budget flag: the service's default budget
        if not fields["rollouts"]:
            fields["rollouts"] = DEFAULT_ROLLOUTS
        budget = search_pb2.Budget(**fields)
    return search_pb2.SolveRequest(problem=args.problem, budget=budget, seed=args.seed, strategy=strategy,
                                   temperature=args.temperature)


def format_response(resp) -> str:
    lines = [f"answer: {resp.answer or '(none found)'}"]
    t = resp.trajectory
    lines.append(f"trajectory (final PPM score {t.final_score:+.3f}, {len(t.steps)} steps):")
    for s in t.steps:
        flag = f"  [{s.failure}]" if s.failure else ""
        lines.append(f"  -- step {s.index + 1}  Q={s.q:+.3f}  N={s.visits}  ppm={s.ppm_score:+.3f}{flag}")
        for ln in s.text.strip("\n").splitlines():
            lines.append(f"     {ln}")
        if s.output.strip():
            lines.append("     => output: " + s.output.strip().replace("\n", "\n                "))
    if resp.alternatives:
        lines.append("alternatives:")
        for a in resp.alternatives:
            lines.append(f"  {a.answer!s:20s} votes={a.votes}  best={a.best_score:+.3f}  weighted={a.weighted_score:+.3f}")
    st = resp.stats
    tm = st.times
    lines.append(
        f"stats: {st.rollouts} rollouts, {st.trees} tree(s), {st.nodes} nodes, {st.generated_tokens} tokens, "
        f"{st.executions} executions, stop: {st.stop_reason or '-'}"
    )
    lines.append(
        f"time: total {tm.total_seconds:.1f} s = generate {tm.generate_seconds:.1f} + ppm {tm.ppm_seconds:.1f} "
        f"+ sandbox {tm.sandbox_seconds:.1f} + other {tm.other_seconds:.1f}"
    )
    lines.append("models: " + ", ".join(f"{m.name}={m.version}" for m in resp.model_versions))
    return "\n".join(lines)


def cmd_solve(args) -> int:
    import grpc
    from google.protobuf import json_format

    from rstar.v1 import search_pb2_grpc

    if not args.problem.strip():
        _eprint("error: the problem is empty")
        return 2
    address = _addresses(args)["search"]
    request = _solve_request(args)
    result = None
    start = time.monotonic()
    show_progress = not args.quiet and sys.stderr.isatty() or args.progress
    try:
        with grpc.insecure_channel(address) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            for event in stub.SolveStream(request, timeout=args.timeout, wait_for_ready=args.wait):
                if event.HasField("progress") and not args.quiet:
                    p = event.progress
                    msg = (f"rollout {p.rollouts_done}/{p.rollouts_total}  best {p.best_answer or '-'} "
                           f"({p.best_score:+.2f})  tokens {p.generated_tokens}  exec {p.executions}  "
                           f"{time.monotonic() - start:5.1f} s")
                    if show_progress:
                        _eprint("\r" + msg.ljust(100), end="")
                    else:
                        _eprint(msg)
                elif event.HasField("result"):
                    result = event.result
    except grpc.RpcError as e:
        if show_progress:
            _eprint()
        _eprint(f"error: {e.code().name}: {e.details()}")
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            _eprint(f"(is the search service running at {address}? start it with `rstar up`)")
        return 1
    except KeyboardInterrupt:
        _eprint("\ncancelled")
        return 130
    if show_progress:
        _eprint()
    if result is None:
        _eprint("error: the stream ended without a result")
        return 1
    if args.json:
        print(json_format.MessageToJson(result, preserving_proto_field_name=True))
    else:
        print(format_response(result))
        print(f"wall time: {time.monotonic() - start:.1f} s")
    return 0


def cmd_demo(args) -> int:
    eps = endpoints(args.host, args.base_port)
    if not _check_ports(eps):
        return 1
    _eprint("rstar demo: starting the four services on loopback (first start downloads and converts the default model, ~4 min)...")
    procs = start_services(eps, store_url=None if args.no_registry else default_store_url(),
                           service_args=_model_args(args))
    try:
        wait_healthy(eps, procs, timeout=args.timeout)
        _print_endpoints(eps)
        args.problem = args.problem or SAMPLE_PROBLEM
        if args.rollouts is None and not args.k:  # a budget that finishes in minutes on 2 CPU cores
            args.rollouts, args.k = DEMO_BUDGET
        print(f"\nproblem: {args.problem}\n")
        solve_args = argparse.Namespace(**vars(args))
        solve_args.search_address = eps["search"].address
        solve_args.progress = False
        rc = cmd_solve(solve_args)
        if rc == 0:
            print()
            status_args = argparse.Namespace(host=args.host, base_port=args.base_port, json=False,
                                             **{f"{n}_address": eps[n].address for n in eps})
            cmd_status(status_args)
        return rc
    except (RuntimeError, TimeoutError) as e:
        _eprint(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _eprint("interrupted")
        return 130
    finally:
        if not args.keep:
            stop_services(procs)
        else:
            _run_dir().mkdir(parents=True, exist_ok=True)
            (_run_dir() / "services.json").write_text(json.dumps({"pids": {n: p.pid for n, p in procs.items()}}))


def cmd_serve(args) -> int:
    # a subprocess, not an import: the CLI is an app and imports no other app
    return _run_module(SERVICE_TABLE[args.service].module, args.args)


def _run_module(module: str, argv: list[str]) -> int:
    """`python -m MODULE ARGV...` in the foreground; Ctrl-C reaches it (same process group)."""
    proc = subprocess.Popen([sys.executable, "-m", module, *argv])
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the child got SIGINT too; wait for it to finish its own shutdown


# the trainer's command group, run as `python -m trainer COMMAND ...`
TRAINER_COMMANDS = {
    "eval": "accuracy on a dev set: greedy, majority vote, MCTS; JSON + PNG (python -m trainer eval --help)",
    "evolve": "self-evolution rounds: synthesis, training, evaluation, promotion (python -m trainer evolve --help)",
    "bootstrap": "GSM8K reference solutions -> verified code-step trajectories (python -m trainer bootstrap --help)",
}


# ---------------------------------------------------------------- parser


def _add_address_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="host of the local services")
    p.add_argument("--base-port", type=int, default=None,
                   help="use ports BASE..BASE+3 (metrics BASE+100..) instead of 50051-50054 / 9101-9104")
    for n in ("policy", "ppm", "sandbox", "search"):
        p.add_argument(f"--{n}-address", default=None, help=f"{n} service address (env RSTAR_{n.upper()}_ADDRESS)")


def _add_solve_args(p) -> None:
    p.add_argument("--rollouts", type=int, default=None,
                   help=f"MCTS rollouts per search (default: the service's; {DEFAULT_ROLLOUTS} with other budget flags)")
    p.add_argument("-k", "--k", type=int, default=0, help="candidates per expansion (0 = service default)")
    p.add_argument("--max-depth", type=int, default=0, help="maximum steps (0 = 16)")
    p.add_argument("--max-tokens", type=int, default=0, help="generated-token budget (0 = unlimited)")
    p.add_argument("--max-seconds", type=float, default=0, help="wall-time budget (0 = unlimited)")
    p.add_argument("--trajectories", type=int, default=0, help="independent searches (0 = 1)")
    p.add_argument("--strategy", choices=("top-ppm", "majority", "weighted"), default="top-ppm")
    p.add_argument("--seed", type=int, default=0, help="seed: same seed + same models = same tree")
    p.add_argument("--temperature", type=float, default=0, help="policy sampling temperature (0 = default)")
    p.add_argument("--timeout", type=float, default=1800, help="RPC deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the SolveResponse as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help="wait for the search service to become reachable")


def _add_model_arg(p) -> None:
    from rstar.models import DEFAULT, EMBEDDED

    p.add_argument("--model", default="", help=f"policy and PPM base model: an embedded model "
                   f"({', '.join(EMBEDDED)}; default {DEFAULT.name}) or an HF directory; with the registry, "
                   "it is what gets registered when nothing is promoted yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rstar", description="rStar-Math services: solve, serve, evolve")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the four services locally and wait until they are healthy")
    _add_address_args(p)
    p.add_argument("--detach", action="store_true", help="leave them running in the background (stop: rstar down)")
    p.add_argument("--no-registry", action="store_true",
                   help="serve the model directories directly instead of the registry's promoted versions")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for health")
    _add_model_arg(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop services started with `rstar up --detach`")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="health and model versions of each service")
    _add_address_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("solve", help="solve a problem through the search service")
    p.add_argument("problem", help="the math problem")
    _add_address_args(p)
    _add_solve_args(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("demo", help="start the services, solve a sample problem, stop them")
    p.add_argument("problem", nargs="?", default="", help="problem (default: a GSM8K sample)")
    _add_address_args(p)
    _add_solve_args(p)
    p.add_argument("--keep", action="store_true", help="keep the services running afterwards (stop: rstar down)")
    p.add_argument("--no-registry", action="store_true",
                   help="serve the model directories directly instead of the registry's promoted versions")
    _add_model_arg(p)
    p.set_defaults(func=cmd_demo, timeout=1800)

    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=tuple(SERVICE_TABLE))
    p.add_argument("args", nargs=argparse.REMAINDER, help="flags for the service (see python -m SERVICE_svc --help)")
    p.set_defaults(func=cmd_serve)

    from rstar_cli import models

    models.add_parser(sub)
    for name, help_text in TRAINER_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        return _run_module("trainer", argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
