"""`rstar view`: one search as a local web page (the tree viewer of `rstar.viewer`).

    rstar view                                         the last `rstar solve` ($RSTAR_HOME/last-solve.json)
    rstar view trajectories/round-2/<shard>#<id>       a stored tree (whole tree) from the object store
    rstar view FILE.json                               a saved solve or one tree record (JSON)
    rstar view --live "PROBLEM" [solve flags]          a SolveStream, the page following it

The page is served on loopback only (a free port unless `--port`) until Ctrl-C and
opened in the default browser; `--no-browser` only prints its URL (first line of
stdout). `--out FILE.html` writes the page as one self-contained file instead
(data, script and style inline) and `--json` prints the view JSON; neither serves.
Nothing is fetched from the network at view time: the page ships with the package.

Not here: what the page shows (`rstar.viewer.model`), the HTTP app
(`rstar.viewer.http`), the flags shared with `rstar solve` (`rstar_cli/main.py`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from rstar.trees import ShardError
from rstar.viewer import http as vhttp
from rstar.viewer import model

LAST = "last"


def add_arguments(p) -> None:
    p.add_argument("ref", nargs="?", default=LAST,
                   help="what to show: 'last' (default: the last `rstar solve`), a stored tree "
                        "trajectories/round-<n>/<shard>#<problem id>, or a JSON file (saved solve or tree record)")
    p.add_argument("--live", default="", metavar="PROBLEM",
                   help="solve PROBLEM through the search service (SolveStream) and follow it on the page")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser; print the URL and serve")
    p.add_argument("--port", type=int, default=0, help="loopback port of the page (0 = a free one)")
    p.add_argument("--store-url", default="",
                   help="object store of stored trees (default $RSTAR_STORE_URL, else $RSTAR_HOME/store)")
    p.add_argument("--out", default="", metavar="FILE.html", help="write the page as one self-contained file")


def _eprint(*a, **kw):
    print(*a, file=sys.stderr, **kw)


# ---------------------------------------------------------------- what to show


def static_view(ref: str, store_url: str = "") -> dict:
    """The view of a finished search: the last solve, a stored tree, or a JSON file."""
    if ref == LAST:
        path = model.last_solve_path()
        if not path.exists():
            raise FileNotFoundError(f"no saved solve at {path}: run `rstar solve \"...\"` first, or name a "
                                    "stored tree (trajectories/round-<n>/<shard>#<problem id>)")
        result, problem = model.load_solve(path)
        return model.view_of_result(result, problem=problem, source=f"last rstar solve ({path})")
    if ref.startswith(("trajectories/", "round-")) and not Path(ref).exists():
        from rstar.store import open_store

        round_no, shard, pid = model.parse_tree_ref(ref)
        tree = model.load_stored_tree(open_store(store_url or None), round_no, shard, pid)
        return model.view_of_tree(tree, source=f"trajectories/round-{round_no}/{shard}#{tree.problem_id}")
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"{ref}: neither a file nor a stored-tree reference "
                                "(trajectories/round-<n>/<shard>#<problem id>)")
    doc = json.loads(path.read_text())
    if str(doc.get("schema", "")).startswith("rstar.saved-solve/"):
        result, problem = model.load_solve(path)
        return model.view_of_result(result, problem=problem, source=str(path))
    return model.view_of_tree(doc, source=str(path))


class LiveSolve:
    """A SolveStream followed by the page: progress while it runs, the result's tree at the end."""

    def __init__(self, problem: str):
        self.problem = problem
        self._lock = threading.Lock()
        self.progress: dict = {}
        self.result = None
        self.error = ""
        self.running = True

    def view(self, _query=None) -> dict:
        with self._lock:
            live = {"running": self.running, "progress": dict(self.progress), "error": self.error}
            return model.view_of_result(self.result, problem=self.problem, source="live SolveStream", live=live)

    def follow(self, stream) -> None:
        from rstar.client import SearchError, SolveDone, SolveProgress

        try:
            for event in stream:
                with self._lock:
                    if isinstance(event, SolveProgress):
                        self.progress = event.to_dict()
                    elif isinstance(event, SolveDone):
                        self.result = event.result
        except SearchError as e:
            with self._lock:
                self.error = str(e)
        finally:
            with self._lock:
                self.running = False


def _start_live(args, address: str, default_rollouts: int) -> LiveSolve | None:
    from rstar.client import SearchClient
    from rstar_cli import solve

    live = LiveSolve(args.live)
    try:
        client = SearchClient(address, timeout=args.timeout, wait_for_ready=args.wait)
        stream = client.solve_stream(args.live, **solve.solve_kwargs(args, default_rollouts))
    except ValueError as e:
        _eprint(f"error: {e}")
        return None

    def run() -> None:
        with client:
            live.follow(stream)
        if live.result is not None:
            solve.save_last_result(live.result, args.live, address)
        _eprint(f"search finished: {live.error or ('answer ' + (live.result.answer or '(none)'))}")

    threading.Thread(target=run, name="rstar-view-live", daemon=True).start()
    return live


# ---------------------------------------------------------------- the command


def cmd_view(args, address: str, *, default_rollouts: int = 8) -> int:
    live = None
    if args.live:
        live = _start_live(args, address, default_rollouts)
        if live is None:
            return 2
        source = live.view
    else:
        try:
            view = static_view(args.ref, args.store_url)
        except (OSError, LookupError, ValueError, ShardError) as e:
            _eprint(f"error: {e}")
            return 1
        source = lambda _query: view  # noqa: E731 - a finished search's view never changes
    if args.json:
        print(vhttp.view_json(source({})))
        return 0
    if args.out:
        Path(args.out).write_text(vhttp.render_page(source({})), encoding="utf-8")
        print(args.out)
        return 0
    try:
        server, thread = vhttp.serve_loopback(vhttp.ViewerApp(source), port=args.port)
    except OSError as e:
        _eprint(f"error: cannot serve on 127.0.0.1:{args.port}: {e}")
        return 1
    url = vhttp.url_of(server)
    print(url, flush=True)
    _eprint("serving the viewer on loopback; Ctrl-C stops")
    if not args.no_browser:
        import webbrowser

        if not webbrowser.open(url):
            _eprint("(no browser found: open the URL above)")
    try:
        while thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
