"""The viewer over HTTP: a read-only WSGI app serving the page, its script and style, and the view JSON.

    GET <prefix>/             the page (fetches view.json relative to itself)
    GET <prefix>/viewer.js    GET <prefix>/viewer.css
    GET <prefix>/view.json    the view (query string passed to the view source, e.g. ?ref=round-2/shard%23id)

Used by `rstar view` (its own loopback server, `serve_loopback`) and by the search
service beside `/metrics` (`mount_store_viewer`: stored trees of its object store).
Every response says `Content-Security-Policy: default-src 'none'` plus same-origin
script, style and fetch: the page cannot load anything from elsewhere, whatever a
stored step's text contains (the page also inserts all tree text as text, never as
HTML). Only GET and HEAD; nothing here writes.

Authorization: view.json (the only data) passes `authorize(Authorization header)`
first. The default, `bearer_authorizer(())`, allows everything (no tokens
configured); once the API's auth exists, give the same token set here and view.json
answers 401 without a valid `Bearer` token, like the API. The page sends the token
it was given in its URL fragment (`/view/#token=...`, which never reaches a server
log) and keeps it for the tab.

Not here: what a view contains (`rstar.viewer.model`), the metrics server
(`rstar.metrics`), TLS.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any, Callable, Collection, Mapping
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)

ViewSource = Callable[[Mapping[str, str]], dict]   # query parameters -> view JSON
Authorizer = Callable[["str | None"], bool]         # the Authorization header (None if absent) -> allowed

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_ASSETS = {"/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
           "/viewer.css": ("viewer.css", "text/css; charset=utf-8")}


def asset(name: str) -> str:
    """A file of the page (package data of `rstar.viewer`)."""
    return resources.files("rstar.viewer").joinpath(name).read_text(encoding="utf-8")


def _embed_json(view: dict) -> str:
    # inside <script type="application/json">: "</" would end the element early
    return json.dumps(view, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_page(view: dict | None = None) -> str:
    """The page. With `view`: one self-contained file (data, script and style inline; for `--out`).
    Without: the served page, which loads viewer.js/viewer.css and fetches view.json."""
    page = asset("page.html")
    if view is None:
        return (page.replace("{{STYLE}}", '<link rel="stylesheet" href="viewer.css">')
                .replace("{{DATA}}", "").replace("{{SCRIPT}}", '<script src="viewer.js"></script>'))
    return (page.replace("{{STYLE}}", "<style>\n" + asset("viewer.css") + "\n</style>")
            .replace("{{DATA}}", '<script type="application/json" id="rstar-view">' + _embed_json(view)
                     + "</script>")
            .replace("{{SCRIPT}}", "<script>\n" + asset("viewer.js").replace("</script", "<\\/script")
                     + "\n</script>"))


def bearer_authorizer(tokens: Collection[str]) -> Authorizer:
    """Allow everything while `tokens` is empty; else only `Authorization: Bearer <one of tokens>`."""
    wanted = [t.encode() for t in tokens if t]

    def authorize(header: str | None) -> bool:
        if not wanted:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip().encode(), w) for w in wanted)

    return authorize


class ViewerApp:
    """WSGI app of the viewer; `source(query)` gives the view (LookupError -> 404, ValueError -> 400)."""

    def __init__(self, source: ViewSource, authorize: Authorizer | None = None):
        self.source = source
        self.authorize = authorize or bearer_authorizer(())

    def __call__(self, environ, start_response):
        status, headers, body = self.respond(environ)
        head = [("Content-Length", str(len(body))), ("Content-Security-Policy", CSP),
                ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-store"), *headers]
        start_response(f"{status.value} {status.phrase}", head)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    def respond(self, environ) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD")], b"read-only\n"
        path = environ.get("PATH_INFO", "") or "/"
        # the page, script and style hold no data (and a browser cannot attach a bearer token to a
        # plain navigation): only the view itself is behind the token
        if path == "/view.json" and not self.authorize(environ.get("HTTP_AUTHORIZATION")):
            return HTTPStatus.UNAUTHORIZED, [("WWW-Authenticate", 'Bearer realm="rstar"'),
                                             ("Content-Type", "application/json")], b'{"error": "unauthorized"}'
        if path == "/":
            return HTTPStatus.OK, [("Content-Type", "text/html; charset=utf-8")], render_page().encode()
        if path in _ASSETS:
            name, ctype = _ASSETS[path]
            return HTTPStatus.OK, [("Content-Type", ctype)], asset(name).encode()
        if path == "/view.json":
            query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            try:
                view, status = self.source(query), HTTPStatus.OK
            except LookupError as e:
                view, status = {"error": str(e).strip("'\"")}, HTTPStatus.NOT_FOUND
            except ValueError as e:
                view, status = {"error": str(e)}, HTTPStatus.BAD_REQUEST
            return status, [("Content-Type", "application/json")], json.dumps(view, ensure_ascii=False).encode()
        return HTTPStatus.NOT_FOUND, [("Content-Type", "text/plain")], b"not found\n"


def prefixed(prefix: str, app) -> Callable:
    """`app` under `prefix` (e.g. "/view"): `/view` redirects to `/view/`, the page's relative links need it."""
    prefix = "/" + prefix.strip("/")

    def route(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == prefix:
            start_response("308 Permanent Redirect", [("Location", prefix + "/"), ("Content-Length", "0")])
            return [b""]
        environ = dict(environ, SCRIPT_NAME=environ.get("SCRIPT_NAME", "") + prefix,
                       PATH_INFO=path[len(prefix):])
        return app(environ, start_response)

    return route


# ---------------------------------------------------------------- sources


def store_source(store) -> ViewSource:
    """Views of an object store's trees: `?ref=round-<n>/<shard>#<problem id>` one tree,
    `?ref=round-<n>/<shard>` its problems, no ref: every complete shard."""
    from rstar.store import NotFound
    from rstar.trees import ShardError
    from rstar.viewer import model

    def source(query: Mapping[str, str]) -> dict:
        ref = query.get("ref", "")
        if not ref:
            return model.store_index(store)
        round_no, shard, pid = model.parse_tree_ref(ref)
        try:
            if pid is None:
                return model.store_index(store, round_no, shard)
            return model.view_of_tree(model.load_stored_tree(store, round_no, shard, pid),
                                      source=f"trajectories/round-{round_no}/{shard}#{pid}")
        except (ShardError, NotFound) as e:
            raise LookupError(str(e)) from e

    return source


def mount_store_viewer(store, authorize: Authorizer | None = None, prefix: str = "/view") -> None:
    """Serve the store's trees at `prefix` on this process's /metrics server (the search service).

    The metrics server binds `metrics_host` (loopback by default), so the page is exactly as
    reachable as /metrics."""
    from rstar import metrics

    metrics.add_http_app(prefix, prefixed(prefix, ViewerApp(store_source(store), authorize)))
    where = metrics.serving_address()
    if where:
        log.info("tree viewer on http://%s:%d%s/", where[0], where[1], prefix)


# ---------------------------------------------------------------- a loopback server (rstar view)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True   # a page's open request never keeps `rstar view` from exiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # noqa: A002 - the base class's name
        log.debug("viewer: " + format, *args)


def serve_loopback(app, port: int = 0, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Start `app` on loopback in a daemon thread; returns (server, thread); `server.shutdown()` stops it."""
    server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="rstar-viewer", daemon=True)
    thread.start()
    return server, thread


def url_of(server: WSGIServer, path: str = "/") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def view_json(view: dict[str, Any]) -> str:
    return json.dumps(view, ensure_ascii=False, indent=1)
