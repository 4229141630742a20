"""The tree viewer (`rstar.viewer`, `rstar view`, the search service's /view/).

The page is checked in a real headless browser: Debian's chromium, driven over the
DevTools protocol on a pipe (`--remote-debugging-pipe`: no websocket library, no
browser download). scripts/test.sh installs chromium; the browser tests skip only
when no chromium binary exists. The screenshot is kept at
$RSTAR_TEST_HOME/artifacts/viewer.png (docs/img/viewer.png is one of them).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

import pytest

from rstar import trees as tj
from rstar.client import SolveDone, SolveProgress, SolveResult
from rstar.store import LocalStore
from rstar.v1 import common_pb2, search_pb2
from rstar.viewer import http as vhttp
from rstar.viewer import model

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
# a program output that would load a remote image if the page inserted it as HTML
HOSTILE_OUTPUT = '<img src="http://192.0.2.1/x.png"></script><script>window.pwned=1</script>'


# ---------------------------------------------------------------- a tree of known shape


def _n(id_, parent, depth, text="", *, code="", output="", ends_code=False, failure="", visits=1, q=0.0,
       ppm=None, answer=None, correct=None, terminal=False, tokens=0):
    return tj.NodeRecord(id=id_, parent=parent, depth=depth, text=text, code=code, output=output,
                         ends_code=ends_code, failure=failure, num_tokens=tokens, visits=visits,
                         value_sum=q * visits, q=q, ppm_score=ppm, terminal=terminal or bool(failure or answer),
                         answer=answer, correct=correct)


def code_step(line: str, end: bool = False) -> str:
    return f"\n{line}\n" + ("<end_of_code>" if end else "<end_of_step>")


def answer_step(value: str) -> str:
    return f"\n<answer>From the result, the answer is \\boxed{{{value}}}.<end_of_answer>"


def known_tree(fan_out: int = 4) -> tj.TreeRecord:
    """A Natalia tree: two first steps, answers 72 (three times) and 144, failures, plus `fan_out` open
    branches of three steps each under node 2 (so the shape is known: 12 + 3 * fan_out nodes)."""
    nodes = [
        _n(0, None, 0, visits=8),
        _n(1, 0, 1, "<code>" + code_step("april = 48"), code="april = 48\n", visits=5, q=0.4, ppm=0.61, tokens=9),
        _n(2, 0, 1, "<code>" + code_step("total = 48 + 48 / 2"), code="total = 48 + 48 / 2\n", visits=3, q=0.33,
           ppm=0.55, tokens=12),
        _n(3, 1, 2, code_step("may = april / 2\nprint(april + may)", True), code="may = april / 2\nprint(april + may)\n",
           output="72.0\n", ends_code=True, visits=3, q=0.9, ppm=0.83, tokens=14),
        _n(4, 1, 2, code_step("may = april * 2\nprint(april + may)", True), code="may = april * 2\nprint(april + may)\n",
           output="144\n", ends_code=True, visits=1, q=-1.0, ppm=0.12, tokens=14),
        _n(5, 1, 2, code_step("print(clips_june)", True), code="print(clips_june)\n",
           output="NameError: name 'clips_june' is not defined\n", ends_code=True, failure="error", q=-1.0,
           tokens=6),
        _n(6, 3, 3, answer_step("72"), answer="72", correct=True, q=1.0, ppm=0.94, tokens=13),
        _n(7, 3, 3, answer_step("72.0"), answer="72.0", correct=True, q=1.0, ppm=0.88, tokens=13),
        _n(8, 4, 3, answer_step("144"), answer="144", correct=False, q=-1.0, ppm=0.21, tokens=13),
        _n(9, 2, 2, code_step("print(total)", True), code="print(total)\n", output="72.0\n", ends_code=True,
           visits=2, q=1.0, ppm=0.8, tokens=5),
        _n(10, 9, 3, answer_step("72"), answer="72", correct=True, q=1.0, ppm=0.86, tokens=13),
        _n(11, 9, 3, code_step("import os\nprint(os.listdir())", True), code="import os\nprint(os.listdir())\n",
           output=HOSTILE_OUTPUT, ends_code=True, failure="error_output", q=-1.0, tokens=9),
    ]
    for b in range(fan_out):
        parent = 2
        for depth in (2, 3, 4):
            nid = len(nodes)
            nodes.append(_n(nid, parent, depth, code_step(f"branch_{b}_{depth} = {b * depth}"),
                            code=f"branch_{b}_{depth} = {b * depth}\n", visits=0, q=0.0, ppm=0.3, tokens=8))
            parent = nid
    for n in nodes:
        if n.parent is not None:
            nodes[n.parent].children.append(n.id)
    return tj.TreeRecord(question=QUESTION, nodes=nodes, problem_id="gsm8k-0042", gold="72", seed=7,
                         settings={"rollouts": 8, "k": 4, "max_depth": 16}, rollouts_done=8, solved=True,
                         model_versions={"policy": "round-2-7f3a", "ppm": "round-2-c41d"},
                         extra={"round": 2, "stop_reason": "budget"})


CHOSEN = [0, 1, 3, 6]          # the answer with the highest PPM score (0.94) and its path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RSTAR_STORE_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def stored(home):
    """The known tree (and a second one) in round 2, shard `s-0001`, of $RSTAR_HOME/store."""
    store = LocalStore(home / "store")
    tj.write_shard(store, 2, "s-0001", [known_tree(), known_tree(1)])
    return store


# ---------------------------------------------------------------- the view JSON


def test_a_stored_tree_view_has_every_node_and_the_top_ppm_path():
    tree = known_tree()
    v = model.view_of_tree(tree)
    assert v["schema"] == model.VIEW_SCHEMA and v["complete"] is True
    assert [n["id"] for n in v["nodes"]] == list(range(len(tree.nodes))) and len(tree.nodes) == 24
    assert v["chosen"] == CHOSEN and v["answer"] == "72"
    by = {n["id"]: n for n in v["nodes"]}
    assert by[3]["code"] == "may = april / 2\nprint(april + may)\n" and by[3]["output"] == "72.0\n"
    assert (by[3]["q"], by[3]["n"], by[3]["ppm"]) == (0.9, 3, 0.83)
    assert by[5]["terminal"] == "failure" and by[5]["why"] == "the program raised an error"
    assert by[6]["terminal"] == "answer" and by[6]["correct"] is True
    assert by[12]["terminal"] == "" and by[0]["text"] == QUESTION


def test_answers_are_grouped_as_the_search_groups_them():
    alts = model.view_of_tree(known_tree())["alternatives"]
    # "72" and "72.0" vote together (rstar.grading.answers_equal); the chosen group comes first
    assert [(a["answer"], a["votes"], a["chosen"], a["correct"]) for a in alts] == \
        [("72", 3, True, True), ("144", 1, False, False)]
    assert alts[0]["best_score"] == 0.94 and alts[0]["weighted_score"] == pytest.approx((1.94 + 1.88 + 1.86) / 2)


def test_terminal_kinds_of_a_stored_tree():
    nodes = [_n(0, None, 0), _n(1, 0, 1, "a", terminal=True), _n(2, 1, 2, "b", failure="error"),
             _n(3, 0, 1, "c", terminal=True), _n(4, 3, 2, answer_step("1"), answer="1"), _n(5, 3, 2, "d", failure="depth")]
    for n in nodes[1:]:
        nodes[n.parent].children.append(n.id)
    v = model.view_of_tree(tj.TreeRecord(question="q", nodes=nodes))
    assert [n["terminal"] for n in v["nodes"]] == ["", "dead_end", "failure", "exhausted", "answer", "failure"]
    assert v["nodes"][5]["why"] == "depth limit reached without an answer"


def test_without_an_answer_the_chosen_path_is_the_best_partial_one():
    tree = known_tree()
    for n in tree.nodes:
        n.answer = None
    tree.nodes[2].q = 0.5
    v = model.view_of_tree(tree)
    # the highest-Q non-failed child at each level (node 11 beside 10 failed), down to a leaf
    assert v["chosen"] == [0, 2, 9, 10] and v["answer"] == "" and v["alternatives"] == []


def solve_response() -> search_pb2.SolveResponse:
    s = search_pb2.Step
    win = search_pb2.Trajectory(steps=[
        s(index=0, text="<code>" + code_step("x = 12 * 3"), code="x = 12 * 3\n", q=0.5, visits=3, ppm_score=0.6),
        s(index=1, text=code_step("print(x)", True), code="print(x)\n", output="36\n", q=0.9, visits=2, ppm_score=0.8),
        s(index=2, text=answer_step("36"), q=1.0, visits=1, ppm_score=0.9, terminal=True)],
        answer="36", final_score=0.9, seed=5)
    other = search_pb2.Trajectory(steps=[win.steps[0], s(index=1, text=answer_step("37"), q=0.1, visits=1,
                                                         ppm_score=0.2, terminal=True)],
                                  answer="37", final_score=0.2, seed=5)
    return search_pb2.SolveResponse(
        answer="36", trajectory=win, trajectories=[win, other], strategy="top_ppm",
        alternatives=[search_pb2.Alternative(answer="36", votes=1, best_score=0.9, weighted_score=0.95),
                      search_pb2.Alternative(answer="37", votes=1, best_score=0.2, weighted_score=0.6)],
        stats=search_pb2.SearchStats(rollouts=4, nodes=17, generated_tokens=420, trees=1, stop_reason="budget",
                                     times=search_pb2.StageTimes(generate_seconds=3.0, ppm_seconds=0.5,
                                                                 sandbox_seconds=0.4, other_seconds=0.1,
                                                                 total_seconds=4.0)),
        model_versions=[common_pb2.ModelVersion(name="policy", version="v3"),
                        common_pb2.ModelVersion(name="ppm", version="v2")])


def test_a_solve_result_view_merges_its_trajectories_by_shared_prefix():
    v = model.view_of_result(SolveResult.from_proto(solve_response()), problem="What is 12*3?")
    # root, the shared first step, then "print(x)" -> answer 36 and the answer 37 beside it
    assert len(v["nodes"]) == 5 and v["complete"] is False and v["stats"]["nodes"] == 17
    assert v["chosen"] == [0, 1, 2, 3] and v["nodes"][1]["children"] == [2, 4]
    assert v["nodes"][2]["output"] == "36\n" and v["nodes"][3]["terminal"] == "answer"
    assert [(a["answer"], a["chosen"]) for a in v["alternatives"]] == [("36", True), ("37", False)]
    assert v["times"]["generate_seconds"] == 3.0 and v["model_versions"] == {"policy": "v3", "ppm": "v2"}


def test_the_saved_solve_round_trips(tmp_path):
    result = SolveResult.from_proto(solve_response())
    path = model.save_solve(tmp_path / "last-solve.json", result, "What is 12*3?", "127.0.0.1:1")
    again, problem = model.load_solve(path)
    assert problem == "What is 12*3?" and again.to_dict() == result.to_dict()
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "schema": "rstar.saved-solve/9"}))
    with pytest.raises(ValueError, match="newer"):
        model.load_solve(path)


@pytest.mark.parametrize("ref, want", [
    ("trajectories/round-2/s-0001#gsm8k-0042", (2, "s-0001", "gsm8k-0042")),
    ("round-2/s-0001.jsonl.gz#a#b", (2, "s-0001", "a#b")),
    ("trajectories/round-10/s", (10, "s", None)),
])
def test_stored_tree_references(ref, want):
    assert model.parse_tree_ref(ref) == want


@pytest.mark.parametrize("ref", ["round-x/s#1", "trajectories/round-2/../x#1", "round-2/#1"])
def test_bad_references_are_refused(ref):
    with pytest.raises(ValueError):
        model.parse_tree_ref(ref)


def test_a_live_solve_shows_progress_then_the_result():
    from rstar_cli.view import LiveSolve

    live = LiveSolve("What is 12*3?")
    assert live.view()["live"]["running"] is True and len(live.view()["nodes"]) == 1
    result = SolveResult.from_proto(solve_response())
    events = iter([SolveProgress(1, 4, "36", 0.9, 100, 1, 0.5), SolveDone(result)])
    seen = []

    def stream():
        for e in events:
            yield e
            seen.append(live.view())

    live.follow(stream())
    assert seen[0]["live"]["progress"]["rollouts_done"] == 1 and len(seen[0]["nodes"]) == 1
    final = live.view()
    assert final["live"]["running"] is False and final["answer"] == "36" and len(final["nodes"]) == 5


# ---------------------------------------------------------------- the CLI


class ScriptedSearch:
    """A SearchService that answers every SolveStream with one progress event and `response`."""

    def __init__(self, response):
        self.response = response

    def SolveStream(self, request, context):
        yield search_pb2.SolveEvent(progress=search_pb2.SolveProgress(rollouts_done=1, rollouts_total=4))
        yield search_pb2.SolveEvent(result=self.response)


def test_rstar_solve_saves_the_result_and_rstar_view_shows_it(home, capsys):
    from concurrent import futures

    import grpc

    from rstar.v1 import search_pb2_grpc
    from rstar_cli import main as cli

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = ScriptedSearch(solve_response())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("rstar.v1.SearchService", {
        "SolveStream": grpc.unary_stream_rpc_method_handler(
            servicer.SolveStream, request_deserializer=search_pb2.SolveRequest.FromString,
            response_serializer=search_pb2.SolveEvent.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert cli.main(["solve", "What is 12*3?", "--quiet", "--search-address", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(0)
    assert (home / model.LAST_SOLVE_FILE).exists()
    capsys.readouterr()
    assert cli.main(["view", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["question"] == "What is 12*3?" and v["answer"] == "36" and len(v["nodes"]) == 5


def test_rstar_view_of_a_stored_tree_and_its_errors(stored, capsys, tmp_path):
    from rstar_cli import main as cli

    assert cli.main(["view", "trajectories/round-2/s-0001#gsm8k-0042", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 24
    assert cli.main(["view", "trajectories/round-2/s-0001#nope", "--json"]) == 1
    assert "no problem 'nope' in round-2/s-0001 (it has: gsm8k-0042, gsm8k-0042)" in capsys.readouterr().err
    assert cli.main(["view", "trajectories/round-3/s-0001#x", "--json"]) == 1
    assert "no manifest" in capsys.readouterr().err
    assert cli.main(["view", "--json"]) == 1
    assert "no saved solve" in capsys.readouterr().err
    out = tmp_path / "tree.html"
    assert cli.main(["view", "trajectories/round-2/s-0001#gsm8k-0042", "--out", str(out)]) == 0
    page = out.read_text()
    # self-contained, and the hostile output stays inside the JSON data block
    assert '<script type="application/json" id="rstar-view">' in page and "viewer.js" not in page
    assert page.count("</script>") == 2 and "<\\/script><script>window.pwned" in page


# ---------------------------------------------------------------- HTTP: the app and the search service


def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_search_service_serves_its_trees_beside_metrics(stored):
    from rstar import metrics
    from rstar.server import mount_tree_viewer

    port = metrics.start_metrics_server(0, host="127.0.0.1")
    service = SimpleNamespace(core=SimpleNamespace(store=stored))
    assert mount_tree_viewer(service) is True
    base = f"http://127.0.0.1:{port}"
    status, _, body = _get(base + "/metrics")
    assert status == 200 and b"rstar_rpc_requests_total" in body
    status, headers, body = _get(base + "/view/")
    assert status == 200 and b'<script src="viewer.js">' in body
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert _get(base + "/view")[0] == 200    # redirected to /view/
    index = json.loads(_get(base + "/view/view.json")[2])
    assert [e["ref"] for e in index["entries"]] == ["round-2/s-0001"]
    shard = json.loads(_get(base + "/view/view.json?ref=" + quote("round-2/s-0001"))[2])
    assert [e["label"] for e in shard["entries"]] == ["gsm8k-0042", "gsm8k-0042"]
    tree = json.loads(_get(base + "/view/view.json?ref=" + quote("round-2/s-0001#gsm8k-0042"))[2])
    assert len(tree["nodes"]) == 24 and tree["chosen"] == CHOSEN
    status, _, body = _get(base + "/view/view.json?ref=" + quote("round-2/s-0001#missing"))
    assert status == 404 and "missing" in json.loads(body)["error"]
    assert _get(base + "/view/view.json?ref=round-x")[0] == 400
    req = urllib.request.Request(base + "/view/view.json", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_the_auth_hook_guards_the_view_once_tokens_are_configured(stored):
    app = vhttp.ViewerApp(vhttp.store_source(stored), vhttp.bearer_authorizer(("s3cret",)))
    server, _ = vhttp.serve_loopback(app)
    try:
        url = vhttp.url_of(server)
        assert _get(url + "view.json")[0] == 401
        assert _get(url + "view.json", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(url + "view.json", {"Authorization": "Bearer s3cret"})[0] == 200
        assert _get(url)[0] == 200            # the page shell holds no data
    finally:
        server.shutdown()
        server.server_close()
    assert vhttp.bearer_authorizer(())(None) is True       # no tokens configured: open, as the API is


def test_the_search_services_viewer_takes_an_authorization_check(stored):
    from rstar import metrics
    from rstar.server import mount_tree_viewer

    port = metrics.start_metrics_server(0, host="127.0.0.1")
    service = SimpleNamespace(core=SimpleNamespace(store=stored))
    try:
        assert mount_tree_viewer(service, vhttp.bearer_authorizer(("s3cret",))) is True
        url = f"http://127.0.0.1:{port}/view/view.json"
        assert _get(url)[0] == 401 and _get(url, {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        assert mount_tree_viewer(service) is True            # later tests in this process see an open viewer


# ---------------------------------------------------------------- the page in a real browser


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium headless, the DevTools protocol over `--remote-debugging-pipe` (fds 3 and 4, NUL-framed JSON)."""

    def __init__(self, binary: str, profile: Path, width: int = 1500, height: int = 900):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:   # the protocol's fixed descriptors: 3 = commands in, 4 = replies out
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--no-pings", "--hide-scrollbars", f"--window-size={width},{height}",
                # anything but loopback fails to resolve; requests are still seen (and counted) below
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")   # chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args + ["about:blank"], pass_fds=(3, 4), preexec_fn=fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.append(msg)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params):
        with self._lock:
            self._next += 1
            mid = self._next
            self._replies[mid] = q = queue.Queue()
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        reply = q.get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            # while a navigation is under way the document may not have a body yet
            value = self.js(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def mouse(self, x: float, y: float, clicks: int = 1) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                      clickCount=clicks)

    def click_node(self, node_id: int, clicks: int = 1) -> None:
        box = self.js(f"""(() => {{ const c = document.querySelector('#graph .node[data-id="{node_id}"] circle');
            c.scrollIntoView({{block: 'center', inline: 'center'}}); const r = c.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for i in range(1, clicks + 1):
            self.mouse(*box, clicks=i)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in list(self.events) if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)


@pytest.fixture
def browser(tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (scripts/test.sh installs Debian's chromium with apt-get; "
                    "it could not here)")
    b = DevTools(binary, tmp_path / "chromium-profile")
    yield b
    b.close()


@pytest.fixture
def rstar_view(stored, home):
    """`rstar view trajectories/round-2/s-0001#gsm8k-0042 --no-browser` as a process; yields its URL."""
    env = dict(os.environ, RSTAR_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "rstar_cli", "view", "trajectories/round-2/s-0001#gsm8k-0042",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def artifact_path() -> Path:
    return Path(os.environ.get("RSTAR_TEST_HOME", ROOT / ".rstar-test")) / "artifacts" / "viewer.png"


def test_the_page_in_a_real_browser(browser, rstar_view):
    tree = known_tree()
    browser.call("Page.navigate", session=True, url=rstar_view)
    browser.wait_for("document.body.dataset.ready === '1'")
    # the page's node count is the tree's
    assert browser.js("document.querySelectorAll('#graph .node').length") == len(tree.nodes)
    assert browser.js("document.body.dataset.nodes") == str(len(tree.nodes))
    assert browser.js("document.getElementById('node-count').textContent") == f"{len(tree.nodes)} nodes"
    # the chosen path is highlighted: its nodes and the edges between them
    chosen = browser.js("[...document.querySelectorAll('#graph .node.chosen')].map(e => +e.dataset.id)")
    assert sorted(chosen) == CHOSEN
    assert browser.js("document.querySelectorAll('#graph .edge.chosen').length") == len(CHOSEN) - 1
    assert browser.js("document.querySelector('#alternatives tr.chosen td').textContent") == "72"
    # clicking a node shows its code and its real output
    browser.click_node(3)
    browser.wait_for("document.body.dataset.selected === '3'")
    assert browser.js("document.getElementById('node-code').textContent") == tree.nodes[3].code
    assert browser.js("document.getElementById('node-output').textContent") == "72.0\n"
    details = browser.js("document.getElementById('details').textContent")
    assert "+0.900" in details and "+0.830" in details and "chosen path" in details
    # a failed step: its reason, and a hostile output shown as text (nothing loaded, nothing run)
    browser.click_node(11)
    browser.wait_for("document.body.dataset.selected === '11'")
    assert browser.js("document.getElementById('node-output').textContent") == HOSTILE_OUTPUT
    assert "error_output" in browser.js("document.getElementById('details').textContent")
    assert browser.js("window.pwned === undefined && document.querySelectorAll('#details img').length === 0")
    # collapse (double-click) hides the subtree; search reveals and marks what matches
    browser.click_node(2, clicks=2)
    browser.wait_for(f"document.querySelectorAll('#graph .node').length === {len(tree.nodes) - 15}")
    browser.js("document.getElementById('search').focus()")
    browser.call("Input.insertText", session=True, text="branch_3_4")
    browser.wait_for("document.getElementById('match-count').textContent === '1 match'")
    assert browser.js("[...document.querySelectorAll('#graph .node.match')].map(e => +e.dataset.id)") == [23]
    assert browser.js("document.querySelectorAll('#graph .node').length") == len(tree.nodes)   # 2 re-expanded
    browser.js("document.getElementById('search').value = ''; "
               "document.getElementById('search').dispatchEvent(new Event('input'))")
    browser.js("document.getElementById('expand-all').click()")
    browser.click_node(3)
    browser.wait_for("document.getElementById('match-count').textContent === '' "
                     f"&& document.querySelectorAll('#graph .node').length === {len(tree.nodes)}")
    browser.js("window.scrollTo(0, 0); document.getElementById('graph-pane').scrollTo(0, 0)")
    shot = artifact_path()
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # nothing off loopback: every request the page made went to the viewer's own origin
    origin = urlsplit(rstar_view).netloc
    urls = browser.requested_urls()
    assert urls and {urlsplit(u).netloc for u in urls} == {origin}, urls
    assert {urlsplit(u).path for u in urls} == {"/", "/viewer.js", "/viewer.css", "/view.json"}


def test_the_search_services_listing_in_a_real_browser(browser, stored):
    app = vhttp.prefixed("/view", vhttp.ViewerApp(vhttp.store_source(stored)))
    server, _ = vhttp.serve_loopback(app)
    try:
        browser.call("Page.navigate", session=True, url=vhttp.url_of(server, "/view/"))
        browser.wait_for("document.body.dataset.ready === '1'")
        browser.js("document.querySelector('#index a').click()")         # the shard
        browser.wait_for("location.search.length > 0 && document.body.dataset.ready === '1' "
                         "&& document.querySelectorAll('#index a').length === 2")
        browser.js("document.querySelector('#index a').click()")         # its first tree
        browser.wait_for("document.querySelectorAll('#graph .node').length === 24")
        assert browser.js("document.body.dataset.nodes") == "24"
    finally:
        server.shutdown()
        server.server_close()
