"""`rstar models ...`: inspect and move model versions in the registry.

    rstar models list [NAME]              every version (of NAME), * marks CURRENT, with its eval results
    rstar models show NAME [VERSION]      a version's manifest (default: CURRENT)
    rstar models history NAME             promotions and rollbacks, oldest first
    rstar models promote NAME VERSION     verify (sha256 of every file) and point CURRENT at it
    rstar models rollback NAME            back to the version promoted before CURRENT
    rstar models publish NAME DIR         upload a model directory as a new version
    rstar models verify NAME VERSION      re-hash a stored version against its manifest
    rstar models fetch NAME [VERSION]     download (verified) into the local cache; prints the path

Every command takes `--store URL` (default: $RSTAR_STORE_URL, else the local
store under $RSTAR_HOME) and `--json`. `add_parser(subparsers)` plugs this into
the `rstar` CLI; `python -m rstar_cli.models` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from rstar.registry import ModelRegistry, RegistryError
from rstar.store import NotFound, StoreError, open_store


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list, show, promote and roll back model versions",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None,
                        help="object store URL: s3://bucket/prefix, file:///path or a path "
                             "(default: $RSTAR_STORE_URL or $RSTAR_HOME/store)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="models_cmd", required=True)

    s = sub.add_parser("list", parents=[common], help="model names, or the versions of one")
    s.add_argument("name", nargs="?")
    s = sub.add_parser("show", parents=[common], help="a version's manifest (default: CURRENT)")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    s = sub.add_parser("history", parents=[common], help="promotions and rollbacks")
    s.add_argument("name")
    s = sub.add_parser("promote", parents=[common], help="point CURRENT at a verified version")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--reason", default="")
    s.add_argument("--size-only", action="store_true",
                   help="check file presence and sizes only, skip re-hashing (faster for huge versions)")
    s = sub.add_parser("rollback", parents=[common], help="back to the previously promoted version")
    s.add_argument("name")
    s.add_argument("--reason", default="")
    s.add_argument("--size-only", action="store_true")
    s = sub.add_parser("publish", parents=[common], help="upload a model directory as a new version")
    s.add_argument("name")
    s.add_argument("dir")
    s.add_argument("--version", default=None, help="version name (default: v<UTC time>-<random>)")
    s.add_argument("--parent", default=None)
    s.add_argument("--round", type=int, default=None)
    s.add_argument("--metadata", default=None, help="JSON object stored in the manifest")
    s.add_argument("--promote", action="store_true", help="promote it once published")
    s = sub.add_parser("verify", parents=[common], help="re-hash a stored version against its manifest")
    s.add_argument("name")
    s.add_argument("version")
    s = sub.add_parser("fetch", parents=[common], help="download a version into the local cache")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    s.add_argument("--cache-dir", default=None, help="default: $RSTAR_HOME/cache/models")
    p.set_defaults(func=run)
    return p


def format_eval(results: dict[str, Any] | None) -> str:
    """`{"gsm8k_dev100": {"greedy": 0.18, "maj@8": 0.25}}` -> `gsm8k_dev100: greedy 18% maj@8 25%`."""
    if not results:
        return "-"
    parts = []
    for dataset, methods in sorted(results.items()):
        if isinstance(methods, dict):
            cells = " ".join(f"{m} {v:.0%}" for m, v in methods.items() if isinstance(v, (int, float)))
            parts.append(f"{dataset}: {cells}" if cells else dataset)
    return "; ".join(parts) or "-"


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (RegistryError, StoreError, NotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    reg = ModelRegistry(open_store(args.store), cache_dir=getattr(args, "cache_dir", None))
    cmd = args.models_cmd
    if cmd == "list":
        names = [args.name] if args.name else reg.names()
        infos = [i for n in names for i in reg.versions(n)]
        lines = [f"{i.name}\t{'*' if i.current else ' '} {i.version}\t{'complete' if i.complete else 'INCOMPLETE'}\t"
                 f"{i.created_at or '-'}\t{_mb(i.total_bytes)}\tparent={i.parent or '-'}\t{format_eval(i.eval)}"
                 for i in infos]
        empty = f"no versions of {args.name!r}" if args.name else f"no models in {reg.store.url}"
        _out(args, [asdict(i) for i in infos], "\n".join(lines) or empty)
        return 0
    if cmd == "show":
        version = args.version or reg.current(args.name)
        if version is None:
            raise RegistryError(f"model {args.name!r} has no CURRENT version; name one")
        m = reg.manifest(args.name, version)
        d = json.loads(m.to_json())
        d["current"] = reg.current(args.name) == version
        _out(args, d, json.dumps(d, indent=2, sort_keys=True))
        return 0
    if cmd == "history":
        recs = reg.history(args.name)
        _out(args, recs, "\n".join(f"{r['at']}\t{r['action']}\t{r.get('previous') or '-'} -> {r['version']}"
                                   f"\t{r.get('actor', '')}\t{r.get('reason', '')}" for r in recs)
             or f"no promotions of {args.name!r}")
        return 0
    if cmd == "promote":
        rec = reg.promote(args.name, args.version, deep=not args.size_only, reason=args.reason)
        _out(args, rec, f"{args.name}: CURRENT {rec['previous'] or '-'} -> {rec['version']}")
        return 0
    if cmd == "rollback":
        rec = reg.rollback(args.name, deep=not args.size_only, reason=args.reason)
        _out(args, rec, f"{args.name}: rolled back {rec['previous']} -> {rec['version']}")
        return 0
    if cmd == "publish":
        meta = json.loads(args.metadata) if args.metadata else None
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("--metadata must be a JSON object")
        m = reg.publish(args.name, args.dir, args.version, parent=args.parent, round=args.round, metadata=meta)
        if args.promote:
            reg.promote(args.name, m.version, deep=False, reason="published with --promote")
        _out(args, json.loads(m.to_json()),
             f"published {args.name}/{m.version}: {len(m.files)} files, {_mb(m.total_bytes)}"
             + (" (promoted)" if args.promote else ""))
        return 0
    if cmd == "verify":
        m = reg.verify(args.name, args.version, deep=True)
        _out(args, {"name": args.name, "version": args.version, "ok": True, "files": len(m.files)},
             f"{args.name}/{args.version}: {len(m.files)} files match the manifest")
        return 0
    if cmd == "fetch":
        path = reg.fetch(args.name, args.version)
        _out(args, {"path": str(path)}, str(path))
        return 0
    raise ValueError(f"unknown command {cmd!r}")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rstar")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "models":
        argv.insert(0, "models")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
