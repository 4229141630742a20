"""`rstar eval`, `rstar evolve`, `rstar bootstrap`, `rstar report`: the trainer's command group.

    rstar eval --dataset FILE.jsonl [--model default|DIR|policy@VERSION] [--samples N] [--mcts 1,4,8]
        greedy accuracy (+ majority vote over N samples, + MCTS through the search service),
        a JSON report and a PNG plot of accuracy against the number of trajectories
    rstar evolve --rounds N --pool FILE --dev FILE [...]
        run self-evolution rounds in this process, resuming an unfinished round
    rstar evolve --stage STAGE --round N [--shard I --shards S]
        one stage of one round (what trainer/controller.py runs in Kubernetes Jobs)
    rstar bootstrap --pool FILE [--limit N] [--out FILE.jsonl]
        convert GSM8K reference solutions into verified code-step trajectories
    rstar report [--store URL] [--rounds 1,2] [--eval [LABEL=]FILE ...] [--out report.html] [--png-dir DIR]
        one self-contained HTML page of plots from evolution rounds and/or `rstar eval` reports

`python -m trainer COMMAND` runs it; the `rstar` CLI forwards `rstar eval|evolve|bootstrap|report` here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rstar.config import ConfigError, add_arguments, build


def _eprint(*a: Any) -> None:
    print(*a, file=sys.stderr)


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- eval


def _resolve_eval_model(spec: str, store_url: str | None) -> tuple[Path, str]:
    """`default` | an HF directory | `NAME@VERSION` / `NAME@current` from the registry."""
    from rstar.models import base_version_of, resolve_model_dir

    if "@" in spec and not Path(spec).exists():
        from rstar.registry import ModelRegistry
        from rstar.store import open_store

        name, version = spec.split("@", 1)
        reg = ModelRegistry(open_store(store_url or os.environ.get("RSTAR_STORE_URL") or None))
        if version in ("", "current", "CURRENT"):
            version = reg.current(name)
            if version is None:
                raise SystemExit(f"error: model {name!r} has no CURRENT version in {reg.store.url}")
        return reg.fetch(name, version), f"{name}@{version}"
    from rstar import evolved

    if evolved.for_spec(spec) is not None:   # `default`: the shipped evolved round's policy
        return evolved.resolve(spec, "policy")
    path = resolve_model_dir(spec)
    return path, base_version_of(spec) or str(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer import data
    from trainer.evaluate import EvalConfig, HFPolicy, evaluate, summary, write_report
    from trainer.execution import make_executor

    _setup_logging(args.log_level)
    try:
        problems = data.load_problems(args.dataset, limit=args.limit)
    except (OSError, ValueError) as e:
        _eprint(f"error: cannot read {args.dataset}: {e}")
        return 2
    mcts = tuple(int(x) for x in args.mcts.split(",") if x.strip()) if args.mcts else ()
    cfg = EvalConfig(greedy=not args.no_greedy, samples=args.samples, temperature=args.temperature, mcts=mcts,
                     mcts_rollouts=args.mcts_rollouts, mcts_max_tokens=args.mcts_max_tokens,
                     mcts_candidates=args.mcts_candidates, mcts_concurrency=args.mcts_concurrency,
                     search_address=args.search_address or "", ppm_address=args.ppm_address or "",
                     max_tokens=args.max_tokens, max_depth=args.max_depth, seed=args.seed)
    if cfg.ppm_address and not cfg.samples:
        _eprint("error: --ppm-address scores the --samples trajectories (PPM best-of-N): pass --samples N")
        return 2
    if cfg.mcts and not cfg.search_address:
        _eprint("error: --mcts needs --search-address (a running search service, e.g. `rstar up`)")
        return 2
    few_shot = {"auto": None, "yes": True, "no": False}[args.few_shot]
    policy = None
    label = ""
    if cfg.greedy or cfg.samples:
        if args.policy_address:
            from rstar.clients import PolicyClient

            # one call carries every active problem (lock-step): on a CPU that can take many minutes
            policy = PolicyClient(args.policy_address, timeout=args.call_timeout)
            label = f"policy service {args.policy_address}"
        else:
            model_dir, label = _resolve_eval_model(args.model, args.store)
            policy = HFPolicy(model_dir, few_shot=few_shot, batch_size=args.batch, version=label, threads=args.threads)
    scorer = None
    if cfg.ppm_address:
        from rstar.clients import PPMClient

        scorer = PPMClient(cfg.ppm_address, timeout=args.call_timeout)
    executor = make_executor(args.sandbox_address or "")
    try:
        report = evaluate(problems, policy, executor, cfg, meta={"dataset": args.dataset, "model": label},
                          scorer=scorer)
    finally:
        executor.close()
    out = Path(args.out or f"eval-{Path(args.dataset).stem}.json")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    write_report(report, out, png)
    print(json.dumps(summary(report), indent=2))
    print(f"report: {out}\nplot:   {png}")
    return 0


# --------------------------------------------------------------------------- evolve


def cmd_evolve(args: argparse.Namespace) -> int:
    from trainer import evolve

    _setup_logging(args.log_level)
    try:
        cfg = build(evolve.EvolveConfig, "EVOLVE", args, yaml_path=args.config)
    except ConfigError as e:
        _eprint(f"error: {e}")
        return 2
    ctx = evolve.Context(cfg)
    try:
        if args.stage:
            if args.round is None:
                _eprint("error: --stage needs --round N")
                return 2
            summary = evolve.run_stage(ctx, args.stage, args.round, args.shard, cfg.shards)
            print(json.dumps(summary, indent=2, default=str))
            return 0
        if not args.rounds:
            _eprint("error: pass --rounds N (run rounds here) or --stage STAGE --round N (one stage)")
            return 2
        states = evolve.evolve(ctx, args.rounds)
    except evolve.StageError as e:
        _eprint(f"error: {e}")
        return 1
    for st in states:
        s = st.get("summaries", {})
        print(json.dumps({"round": st["round"], "status": st["status"],
                          "synthesis": s.get("synthesis"), "eval": s.get("eval"),
                          "promote": (s.get("promote") or {}).get("gate")}, indent=2, default=str))
    if not states:
        print(f"nothing to do: rounds 1..{args.rounds} have succeeded")
    return 0


# --------------------------------------------------------------------------- bootstrap


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from trainer import bootstrap, data
    from trainer.execution import make_executor

    _setup_logging(args.log_level)
    exclude = [p["id"] for p in data.load_problems(args.exclude)] if args.exclude else []
    rows = data.load_problems(args.pool, limit=args.limit, exclude_ids=exclude)
    convs, n = bootstrap.convert_pool(rows)
    with make_executor(args.sandbox_address or "") as ex:
        ok, stats = bootstrap.verify_conversions(convs, ex)
    stats.problems = n
    print(stats.line())
    if args.out:
        examples = [data.SFTExample(c.problem_id, c.question, c.trajectory(out), 1.0, 1.0, "gsm8k-reference")
                    for c, out in ok]
        Path(args.out).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples))
        print(f"wrote {len(examples)} trajectories to {args.out}")
    return 0


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from rstar.rounds import RoundStateError
    from rstar.store import open_store
    from trainer import report

    try:
        evals = [report.parse_eval_arg(a) for a in args.eval]
    except (OSError, ValueError) as e:
        _eprint(f"error: --eval: {e}")
        return 2
    try:
        numbers = [int(x) for x in args.rounds.split(",") if x.strip()] if args.rounds not in ("", "all") else None
    except ValueError:
        _eprint(f"error: --rounds: comma-separated round numbers or 'all', got {args.rounds!r}")
        return 2
    # the store is read when named, or when there is nothing else to report on
    store = open_store(args.store or None) if args.store or not evals else None
    try:
        inputs = report.collect(store, numbers, evals)
    except (RoundStateError, ValueError) as e:
        _eprint(f"error: {e}")
        return 1
    if not inputs.rounds and not inputs.evals:
        _eprint(f"error: no evolution round in {store.url if store else 'the input'} and no --eval report")
        return 1
    secs = report.write_report_page(inputs, args.out, args.png_dir or None, args.title)
    for s in secs:
        if s.absent:
            _eprint(f"{s.id}: {s.absent}")
    print(f"report: {args.out}" + (f"\nplots:  {args.png_dir}" if args.png_dir else ""))
    return 0


# --------------------------------------------------------------------------- parser


def add_parser(subparsers: Any) -> None:
    from trainer.evolve import STAGES, EvolveConfig

    p = subparsers.add_parser("eval", help="accuracy on a dev set: greedy, majority vote, MCTS; JSON + PNG",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="JSONL with problem and answer fields")
    p.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all)")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded model's shipped evolved round, else its base), an embedded "
                        "model's name (its base), an HF directory, or NAME@VERSION / NAME@current from the registry")
    p.add_argument("--store", default=None, help="object store URL for NAME@VERSION (default $RSTAR_STORE_URL)")
    p.add_argument("--few-shot", choices=("auto", "yes", "no"), default="auto",
                   help="prepend the worked examples (auto: unless the model was fine-tuned by the trainer)")
    p.add_argument("--policy-address", default="", help="use the policy service instead of a local model")
    p.add_argument("--sandbox-address", default="", help="sandbox service ('' = in-process sandbox)")
    p.add_argument("--search-address", default="", help="search service for --mcts")
    p.add_argument("--call-timeout", type=float, default=3600.0,
                   help="deadline of one policy-service call in seconds (one call generates a step for every problem)")
    p.add_argument("--no-greedy", action="store_true", help="skip greedy decoding")
    p.add_argument("--samples", type=int, default=0, help="majority vote over N sampled trajectories")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --samples")
    p.add_argument("--mcts", default="", help="comma-separated trajectory counts for MCTS + PPM, e.g. 1,4,8")
    p.add_argument("--mcts-rollouts", type=int, default=0, help="rollouts per MCTS search (0 = service default)")
    p.add_argument("--mcts-max-tokens", type=int, default=0,
                   help="generated-token budget of one MCTS solve (0 = the service's)")
    p.add_argument("--mcts-candidates", type=int, default=0, help="k of the MCTS solves (0 = the service's)")
    p.add_argument("--mcts-concurrency", type=int, default=4, help="MCTS Solve calls in flight")
    p.add_argument("--ppm-address", default="",
                   help="PPM service: also report PPM best-of-N over the --samples trajectories")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per step")
    p.add_argument("--max-depth", type=int, default=16, help="steps per trajectory")
    p.add_argument("--batch", type=int, default=8, help="sequences per generate call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="JSON report path (default eval-<dataset>.json)")
    p.add_argument("--plot", default="", help="PNG path (default: the report path with .png)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("evolve", help="self-evolution rounds: synthesis, training, evaluation, promotion",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=0, help="run rounds in this process until round N has succeeded")
    p.add_argument("--stage", choices=STAGES, default=None, help="run one stage (with --round)")
    p.add_argument("--round", type=int, default=None, help="round of --stage")
    p.add_argument("--shard", type=int, default=0, help="synthesis shard index of --stage synthesis")
    p.add_argument("--config", default=None, help="YAML file with evolve settings")
    p.add_argument("--log-level", default="INFO")
    add_arguments(p, EvolveConfig)
    p.set_defaults(func=cmd_evolve)

    p = subparsers.add_parser("bootstrap", help="GSM8K reference solutions -> verified code-step trajectories")
    p.add_argument("--pool", required=True, help="GSM8K-style JSONL with a `solution` field")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--exclude", default="", help="JSONL whose ids are left out (e.g. the dev set)")
    p.add_argument("--sandbox-address", default="")
    p.add_argument("--out", default="", help="write the trajectories as SFT JSONL here")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_bootstrap)

    p = subparsers.add_parser("report", help="evolution rounds and eval reports -> one HTML page of plots",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="", help="object store with the rounds (default $RSTAR_STORE_URL, else "
                   "$RSTAR_HOME/store; read unless only --eval reports are given)")
    p.add_argument("--rounds", default="all", help="comma-separated round numbers, or 'all' (every round with a state)")
    p.add_argument("--eval", action="append", default=[], metavar="[LABEL=]FILE",
                   help="an `rstar eval` report (.json or .json.gz), repeatable; a LABEL of base or r<n> (or a "
                   "report of model policy@r<n>) also places it at that round")
    p.add_argument("--out", default="report.html", help="the HTML page")
    p.add_argument("--png-dir", default="", help="also write every plot as <section>.png here")
    p.add_argument("--title", default="", help="page title")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("ship", help="write a trained round into the repository as a shipped round")
    p.add_argument("--round", type=int, required=True, help="the round whose policy/r<N> and ppm/r<N> are shipped")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the embedded base model it was trained on")
    p.add_argument("--store", default="", help="object store with the registry (default $RSTAR_STORE_URL / $RSTAR_HOME)")
    p.add_argument("--eval", action="append", default=[], metavar="VERSION=REPORT",
                   help="an `rstar eval` report of a version (the base's too), repeatable; its headline numbers "
                        "go into the manifest and `rstar models list`")
    p.add_argument("--reproduce", default="", help="the command that reproduces the round (kept in the manifest)")
    p.add_argument("--out", default="", help="root folder (default: rstar/shipped in this checkout)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_ship)


# --------------------------------------------------------------------------- ship


def read_eval_report(path: str) -> dict[str, Any]:
    import gzip

    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)


def cmd_ship(args: argparse.Namespace) -> int:
    """Write a trained round into the repository as a shipped round (rstar.evolved)."""
    from rstar import evolved
    from rstar.registry import ModelRegistry, RegistryError
    from rstar.store import open_store
    from trainer.evaluate import summary

    _setup_logging(args.log_level)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.eval:
        version, sep, path = spec.partition("=")
        if not sep or not version or not path:
            _eprint(f"error: --eval takes VERSION=REPORT.json[.gz], got {spec!r}")
            return 2
        try:
            report = read_eval_report(path)
        except (OSError, ValueError) as e:
            _eprint(f"error: cannot read {path}: {e}")
            return 2
        dataset = Path(str(report.get("dataset") or path)).name.split(".")[0]
        numbers = {k: v for k, v in summary(report).items() if isinstance(v, float)}
        results.setdefault(version, {}).setdefault(dataset, {}).update(numbers)
    reg = ModelRegistry(open_store(args.store or None))
    try:
        shipped = evolved.export_round(reg, args.round, args.model, Path(args.out) if args.out else None,
                                       eval_results=results, reproduce=args.reproduce)
    except (evolved.ShippedError, RegistryError) as e:
        _eprint(f"error: {e}")
        return 1
    print(f"shipped round {shipped.round} of {shipped.model}: {shipped.path} "
          f"({shipped.manifest['bytes'] / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rstar")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
