"""The `rstar` command line.

    rstar up [--detach]       start the four services on loopback, wait for health (they end with it)
    rstar down                stop every recorded local service (detached or not)
    rstar status              health and model versions of each service
    rstar solve "PROBLEM"     solve through the search service (progress, trajectory, stats)
    rstar view [REF]          the last solve, a stored tree or a live solve as a local web page
    rstar demo                up + solve a sample problem + down (the README's main job)
    rstar serve SERVICE ...   run one service in the foreground (same as python -m SERVICE)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rstar.config import home_dir
from rstar.services import SERVICES as SERVICE_TABLE, START_ORDER
from rstar_cli import stack

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


# the process management of local stacks lives in rstar_cli/stack.py; these names stay importable
# from here (tests use `cli.start_services`, `cli.wait_healthy`, `cli.Endpoint`, ...)
Endpoint = stack.Endpoint
endpoints = stack.endpoints
start_services = stack.start_services
stop_services = stack.stop_services
wait_healthy = stack.wait_healthy
busy_ports = stack.busy_ports
_check_ports = stack.check_ports
_health = stack.health
_run_dir = stack.run_dir
_pid_alive = stack.pid_alive


def default_store_url() -> str:
    return os.environ.get("RSTAR_STORE_URL") or str(home_dir() / "store")


def _print_endpoints(eps: dict[str, Endpoint]) -> None:
    print("services:")
    for name in (n for n in ("policy", "ppm", "sandbox", "search") if n in eps):
        ep = eps[name]
        print(f"  {name:8s} grpc {ep.address:18s} metrics {ep.metrics_url}")
    print(f"logs: {home_dir() / 'logs'}")


def _model_args(args) -> dict[str, list[str]]:
    """`--model NAME` for the policy and PPM services (an embedded model's name or a directory)."""
    model = getattr(args, "model", "") or ""
    return {"policy": ["--model", model], "ppm": ["--model", model]} if model else {}


def _only(args) -> list[str]:
    """The services `--only` selects (all four by default), in start order."""
    names = [n.strip() for n in (getattr(args, "only", "") or "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(SERVICE_TABLE))
    if unknown:
        raise SystemExit(f"rstar: error: --only: unknown service(s) {', '.join(unknown)} "
                         f"(choose from {', '.join(SERVICE_TABLE)})")
    return [n for n in START_ORDER if not names or n in names]


def cmd_up(args) -> int:
    names = _only(args)
    eps = endpoints(args.host, args.base_port, names)
    ports = {p for ep in eps.values() for p in (ep.port, ep.metrics_port)}
    running = [r for r in stack.live_services() if {r.port, r.metrics_port} & ports]
    if running:
        _eprint(f"services already running ({', '.join(r.describe() for r in running)}); `rstar down` first")
        return 1
    if not _check_ports(eps):
        return 1
    if "search" in names and not {"policy", "ppm", "sandbox"} <= set(names):
        _eprint("note: search is SERVING only once policy, ppm and sandbox answer at their stack addresses")
    what = "policy, ppm, sandbox and search" if len(names) == 4 else ", ".join(names)
    model_note = " (first start downloads and converts the default model, ~4 min)" \
        if {"policy", "ppm"} & set(names) else ""
    _eprint(f"starting {what}{model_note}...")
    with stack.signals_raise():  # SIGTERM/SIGHUP: stop the services in order, like Ctrl-C
        procs: dict[str, subprocess.Popen] = {}
        try:
            # a foreground stack follows this process: its services end when it ends, however it ends
            procs = start_services(eps, store_url=None if args.no_registry else default_store_url(),
                                   service_args=_model_args(args), follow=not args.detach)
            wait_healthy(eps, procs, timeout=args.timeout)
        except (RuntimeError, TimeoutError, KeyboardInterrupt, stack.Terminated) as e:
            _eprint(f"error: {e}" if isinstance(e, (RuntimeError, TimeoutError)) else "interrupted")
            stop_services(procs)
            return 1
        _print_endpoints(eps)
        if args.detach:
            stack.write_state(procs, eps)
            print("detached; stop with `rstar down`")
            return 0
        print("Ctrl-C stops them all")
        try:
            while all(p.poll() is None for p in procs.values()):
                time.sleep(1)
            dead = [f"{n} (code {p.returncode})" for n, p in procs.items() if p.poll() is not None]
            _eprint(f"error: {', '.join(dead)} exited; stopping the others")
            return 1
        except (KeyboardInterrupt, stack.Terminated):
            _eprint("stopping...")
            return 0
        finally:
            stop_services(procs)


def cmd_down(args) -> int:
    """Stop every live service recorded under $RSTAR_HOME/run: detached stacks, foreground
    stacks whose `rstar up` is still running (or was killed), services started by hand with
    RSTAR_RUN_DIR set. Each pid is checked to still be that service before it is signalled."""
    stopped, stale = stack.stop_recorded(grace=args.grace)
    if not stopped:
        print("no services recorded" if not stale else
              f"no services running (removed {stale} stale record{'s' if stale != 1 else ''})")
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
                    info = stubs[name](ch).Info(common_pb2.InfoRequest(), timeout=5,
                                                metadata=stack.token_metadata(addr))
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


def cmd_solve(args) -> int:
    # the solve itself (SearchClient, progress, the readable report, --json) is in rstar_cli/solve.py
    from rstar_cli import solve

    return solve.cmd_solve(args, _addresses(args)["search"], default_rollouts=DEFAULT_ROLLOUTS)


def cmd_view(args) -> int:
    # the viewer command (what to show, the loopback server, --live) is in rstar_cli/view.py
    from rstar_cli import view

    return view.cmd_view(args, _addresses(args)["search"], default_rollouts=DEFAULT_ROLLOUTS)


def cmd_demo(args) -> int:
    with stack.signals_raise():  # SIGTERM/SIGHUP stop the services like Ctrl-C
        try:
            return _demo(args)
        except stack.Terminated:
            _eprint("terminated")
            return 143


def _demo(args) -> int:
    eps = endpoints(args.host, args.base_port)
    if not _check_ports(eps):
        return 1
    _eprint("rstar demo: starting the four services on loopback (first start downloads and converts the default model, ~4 min)...")
    procs = start_services(eps, store_url=None if args.no_registry else default_store_url(),
                           service_args=_model_args(args), follow=not args.keep)
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
            stack.write_state(procs, eps)


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
    "report": "evolution rounds and eval reports -> one HTML page of plots (python -m trainer report --help)",
    "ship": "a trained round -> rstar/shipped/<model>/r<N> (adapter, value head, manifest) (python -m trainer ship --help)",
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
    p.add_argument("--detach", action="store_true", help="leave them running in the background (stop: rstar down); "
                   "without it the services end when `rstar up` ends, however it ends")
    p.add_argument("--only", default="", metavar="NAMES",
                   help="start only these services, comma-separated (e.g. sandbox,search); default: all four")
    p.add_argument("--no-registry", action="store_true",
                   help="serve the model directories directly instead of the registry's promoted versions")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for health")
    _add_model_arg(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop every recorded local service (`rstar up`, detached or not)")
    p.add_argument("--grace", type=float, default=20.0, help="seconds to drain before SIGKILL")
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

    p = sub.add_parser("view", help="show a search tree as a local web page (last solve, stored tree, live solve)")
    from rstar_cli import view

    view.add_arguments(p)
    _add_address_args(p)
    _add_solve_args(p)   # for --live (--json: print the view JSON)
    p.set_defaults(func=cmd_view)

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
