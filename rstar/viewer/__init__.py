"""The search-tree viewer: one search (a stored tree, a solve result, a live solve) as a local web page.

`rstar.viewer.model` turns a `TreeRecord` or a `SolveResult` into the page's JSON
(`rstar.view/1`) and owns the saved last solve and stored-tree references;
`rstar.viewer.http` serves the page read-only (`rstar view`'s loopback server, the
search service's /view/ beside /metrics). The page (`page.html`, `viewer.js`,
`viewer.css`, package data) is plain HTML/JS/CSS/SVG written here: no library, no
CDN, no request off its own origin.

Not here: the `rstar view` command (`rstar_cli/view.py`), running searches, auth
itself (a hook: `rstar.viewer.http.bearer_authorizer`).
"""

from rstar.viewer.model import VIEW_SCHEMA, load_solve, save_solve, view_of_result, view_of_tree

__all__ = ["VIEW_SCHEMA", "view_of_tree", "view_of_result", "save_solve", "load_solve"]
