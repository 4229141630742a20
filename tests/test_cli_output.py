"""`rstar solve`'s output: the readable report of a hand-built SolveResponse (code and real
output in separate blocks, failure and answer marks, the tree summary, no colour off a
terminal) and, through the CLI against a scripted SearchService, `--json` byte for byte the
protobuf JSON of the response, progress on stderr, the request the flags make, and errors.
"""

from __future__ import annotations

import io
import json
from concurrent import futures

import grpc
import pytest
from google.protobuf import json_format

from rstar.client import SolveResult
from rstar.v1 import common_pb2, search_pb2, search_pb2_grpc
from rstar_cli import main as cli
from rstar_cli import solve
from tests.conftest import free_port

CODE_1 = "# Step 1: Multiply boxes by apples per box.\ntotal = 3 * 12"
CODE_2 = "# Now print the final answer\nprint(total)"


def _step(index, text, code="", output="", q=0.0, visits=1, ppm=0.0, terminal=False, failure=""):
    return search_pb2.Step(index=index, text=text, code=code, output=output, q=q, visits=visits, ppm_score=ppm,
                           terminal=terminal, failure=failure)


def solved_response() -> search_pb2.SolveResponse:
    s1 = _step(0, f"<code>\n{CODE_1}\n<end_of_step>", CODE_1, q=0.5, visits=3, ppm=0.41)
    s2 = _step(1, f"\n{CODE_2}\n<end_of_code>", CODE_2, output="36\n", q=0.7, visits=2, ppm=0.6)
    s3 = _step(2, "\n<answer>From the result, the answer is \\boxed{36}.<end_of_answer>", q=1.0, ppm=0.81,
               terminal=True)
    wrong2 = _step(1, "\n# Now print the final answer\nprint(total + 1)\n<end_of_code>",
                   "# Now print the final answer\nprint(total + 1)", output="37\n", q=-0.2, ppm=0.1)
    wrong3 = _step(2, "\n<answer>From the result, the answer is \\boxed{37}.<end_of_answer>", q=-1.0, ppm=0.1,
                   terminal=True)
    best = search_pb2.Trajectory(steps=[s1, s2, s3], answer="36", final_score=0.81, mean_q=0.73, seed=0)
    other = search_pb2.Trajectory(steps=[s1, wrong2, wrong3], answer="37", final_score=0.1, mean_q=-0.23, seed=0)
    return search_pb2.SolveResponse(
        answer="36", trajectory=best, trajectories=[best, other], strategy="top_ppm",
        alternatives=[search_pb2.Alternative(answer="36", votes=1, best_score=0.81, weighted_score=0.905),
                      search_pb2.Alternative(answer="37", votes=1, best_score=0.1, weighted_score=0.55)],
        stats=search_pb2.SearchStats(
            rollouts=4, nodes=11, generated_tokens=420, prompt_tokens=900, executions=5, policy_calls=4,
            ppm_calls=4, sandbox_calls=3, trees=1, stop_reason="budget",
            times=search_pb2.StageTimes(generate_seconds=2.6, ppm_seconds=0.4, sandbox_seconds=0.3,
                                        other_seconds=0.2, total_seconds=3.5)),
        model_versions=[common_pb2.ModelVersion(name="policy", version="tiny"),
                        common_pb2.ModelVersion(name="ppm", version="tiny-ppm")])


def failed_response() -> search_pb2.SolveResponse:
    """No answer reached: the chosen path is partial and ends in a failed step."""
    s1 = _step(0, "<code>\n# Step 1\nv = 7\n<end_of_step>", "# Step 1\nv = 7", q=-0.4, visits=2, ppm=0.2)
    s2 = _step(1, "\n# Step 2: divide by the number of boxes.\nv = v // 0\n<end_of_step>",
               "# Step 2: divide by the number of boxes.\nv = v // 0", q=-1.0, failure="error", terminal=True)
    return search_pb2.SolveResponse(
        answer="", strategy="top_ppm",
        trajectory=search_pb2.Trajectory(steps=[s1, s2], final_score=-1.0, mean_q=-0.7, seed=3),
        stats=search_pb2.SearchStats(rollouts=2, nodes=3, trees=1, stop_reason="exhausted",
                                     times=search_pb2.StageTimes()),
        model_versions=[common_pb2.ModelVersion(name="policy", version="tiny")])


def _after(lines: list[str], header_start: str) -> list[str]:
    """The lines of one step: from its header to the next step header (or the summary)."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    out = [lines[i]]
    for ln in lines[i + 1:]:
        if ln.startswith("  -- step") or not ln.startswith("    "):
            break
        out.append(ln)
    return out


# ---------------------------------------------------------------- the readable report


def test_each_steps_code_and_its_output_are_separate_blocks():
    lines = solve.format_response(solved_response()).splitlines()
    assert lines[0] == "answer: 36"
    assert lines[1] == "trajectory (3 steps, final PPM score +0.810, strategy top_ppm):"
    assert _after(lines, "  -- step 1") == [
        "  -- step 1  Q=+0.500  N=3  ppm=+0.410",
        "    code:",
        "      | # Step 1: Multiply boxes by apples per box.",
        "      | total = 3 * 12",
    ]
    assert _after(lines, "  -- step 2") == [
        "  -- step 2  Q=+0.700  N=2  ppm=+0.600",
        "    code:",
        "      | # Now print the final answer",
        "      | print(total)",
        "    output:",
        "      > 36",
    ]


def test_answer_steps_are_marked_and_shown_without_step_markers():
    lines = solve.format_response(solved_response()).splitlines()
    assert _after(lines, "  -- step 3") == [
        "  -- step 3  Q=+1.000  N=1  ppm=+0.810  [ANSWER: 36]",
        "    From the result, the answer is \\boxed{36}.",
    ]
    assert not any(m in "\n".join(lines) for m in ("<answer>", "<end_of_step>", "<code>", "<end_of_code>"))


def test_failed_steps_are_marked_with_their_reason():
    text = solve.format_response(failed_response())
    lines = text.splitlines()
    assert lines[0] == "answer: (none found)"
    assert _after(lines, "  -- step 2") == [
        "  -- step 2  Q=-1.000  N=1  ppm=+0.000  [FAILED: error - the program raised an error]",
        "    code:",
        "      | # Step 2: divide by the number of boxes.",
        "      | v = v // 0",
        "    output: (nothing printed)",
    ]
    assert "[FAILED" not in "\n".join(_after(lines, "  -- step 1"))
    assert "  answers found: none" in lines
    assert "  nodes per depth on the chosen path: d1=1  d2=1" in lines
    for kind, why in solve.FAILURE_REASONS.items():        # every failure kind the search has reads as words
        step = failed_response()
        step.trajectory.steps[1].failure = kind
        assert f"[FAILED: {kind} - {why}]" in solve.format_response(step)


def test_the_tree_summary():
    lines = solve.format_response(solved_response()).splitlines()
    summary = lines[lines.index("search tree:"):]
    assert summary == [
        "search tree:",
        "  nodes: 11 in 1 tree(s) after 4 rollouts; stop: budget",
        "  nodes per depth on the 2 finished trajectories: d1=1  d2=2  d3=2",
        "  answers found: 2",
        "    36  votes=1  best=+0.810  weighted=+0.905  <- chosen",
        "    37  votes=1  best=+0.100  weighted=+0.550",
        "  stats: 420 generated tokens (900 prompt), 5 executions; calls: policy 4, ppm 4, sandbox 3",
        "  time: total 3.5 s = generate 2.6 + ppm 0.4 + sandbox 0.3 + other 0.2",
        "  models: policy=tiny, ppm=tiny-ppm",
    ]
    assert lines[lines.index("search tree:") - 1] == ""


def test_many_answers_are_cut_to_the_best_few():
    resp = solved_response()
    del resp.alternatives[:]
    resp.alternatives.extend(search_pb2.Alternative(answer=str(i), votes=2, best_score=0.5 - i / 10)
                             for i in range(8))
    text = solve.format_response(resp)
    assert "  answers found: 8" in text and "    ... 3 more with 6 vote(s) (--json lists all)" in text
    assert "    7  votes" not in text


def test_plain_text_without_a_terminal_and_colour_only_on_one(monkeypatch):
    resp = solved_response()
    plain = solve.format_response(resp)
    coloured = solve.format_response(resp, color=True)
    assert "\x1b" not in plain and "\x1b[" in coloured
    assert _strip_ansi(coloured) == plain

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert not solve.use_color(io.StringIO()) and solve.use_color(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not solve.use_color(Tty())


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_format_response_takes_the_typed_result_too():
    resp = solved_response()
    assert solve.format_response(SolveResult.from_proto(resp)) == solve.format_response(resp)


# ---------------------------------------------------------------- through the CLI


class ScriptedSearch(search_pb2_grpc.SearchServiceServicer):
    """Answers SolveStream with two progress events and a fixed response; records the requests."""

    def __init__(self, response: search_pb2.SolveResponse, error: tuple | None = None):
        self.response = response
        self.error = error
        self.requests: list[search_pb2.SolveRequest] = []

    def SolveStream(self, request, context):
        self.requests.append(request)
        if self.error:
            context.abort(*self.error)
        for i in (1, 2):
            yield search_pb2.SolveEvent(progress=search_pb2.SolveProgress(
                rollouts_done=i, rollouts_total=4, best_answer="36", best_score=0.81, generated_tokens=100 * i,
                executions=i, elapsed_seconds=0.1 * i))
        yield search_pb2.SolveEvent(result=self.response)


@pytest.fixture
def scripted():
    servers = []

    def start(response=None, error=None):
        servicer = ScriptedSearch(response or solved_response(), error)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_json_output_is_the_protobuf_json_of_the_response(scripted, capsys):
    resp = solved_response()
    _, address = scripted(resp)
    assert cli.main(["solve", "Tom has 3 boxes.", "--json", "--search-address", address]) == 0
    out = capsys.readouterr()
    assert out.out == json_format.MessageToJson(resp, preserving_proto_field_name=True) + "\n"
    data = json.loads(out.out)
    assert set(data) == {"answer", "trajectory", "alternatives", "trajectories", "stats", "model_versions",
                         "strategy"}
    assert data["trajectory"]["steps"][1]["output"] == "36\n"
    assert "rollout 1/4  best 36 (+0.81)  tokens 100  exec 1" in out.err     # progress stays on stderr


def test_readable_output_and_progress_through_the_cli(scripted, capsys):
    resp = solved_response()
    _, address = scripted(resp)
    assert cli.main(["solve", "Tom has 3 boxes.", "--search-address", address]) == 0
    out = capsys.readouterr()
    report, wall = out.out.rstrip("\n").rsplit("\n", 1)
    assert report == solve.format_response(resp) and wall.startswith("wall time: ")
    assert "\x1b" not in out.out and "\x1b" not in out.err              # captured: not a terminal
    assert [ln.split("  ")[0] for ln in out.err.splitlines()] == ["rollout 1/4", "rollout 2/4"]
    assert cli.main(["solve", "Tom has 3 boxes.", "--quiet", "--search-address", address]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, budget, extra", [
    ([], None, {}),
    (["--rollouts", "3", "-k", "2", "--max-depth", "4"],
     search_pb2.Budget(rollouts=3, candidates_per_expansion=2, max_depth=4), {}),
    (["-k", "2"], search_pb2.Budget(rollouts=cli.DEFAULT_ROLLOUTS, candidates_per_expansion=2), {}),
    (["--max-seconds", "30", "--max-tokens", "500", "--trajectories", "2"],
     search_pb2.Budget(rollouts=cli.DEFAULT_ROLLOUTS, max_wall_seconds=30, max_tokens=500, trajectories=2), {}),
    (["--rollouts", "2", "--strategy", "majority", "--seed", "7", "--temperature", "0.5"],
     search_pb2.Budget(rollouts=2), dict(strategy=search_pb2.MAJORITY_VOTE, seed=7, temperature=0.5)),
])
def test_the_flags_make_the_same_request_as_before(scripted, capsys, flags, budget, extra):
    servicer, address = scripted()
    assert cli.main(["solve", "Tom has 3 boxes.", "--quiet", "--search-address", address, *flags]) == 0
    capsys.readouterr()
    want = search_pb2.SolveRequest(problem="Tom has 3 boxes.", budget=budget,
                                   **{"strategy": search_pb2.TOP_PPM, **extra})
    (got,) = servicer.requests
    assert got == want and got.HasField("budget") == (budget is not None)


def test_a_server_error_is_one_line_on_stderr(scripted, capsys):
    _, address = scripted(error=(grpc.StatusCode.RESOURCE_EXHAUSTED, "search queue full: 4 running, 16 waiting"))
    assert cli.main(["solve", "Tom has 3 boxes.", "--search-address", address]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "error: RESOURCE_EXHAUSTED: search queue full: 4 running, 16 waiting\n"


def test_no_service_says_where_it_looked(capsys, monkeypatch):
    monkeypatch.setattr(solve, "_CLI_RETRY_BUDGET_S", 0.3)
    address = f"127.0.0.1:{free_port()}"
    assert cli.main(["solve", "Tom has 3 boxes.", "--search-address", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE") and f"is the search service running at {address}?" in err
    assert cli.main(["solve", "   ", "--search-address", address]) == 2
    assert "the problem is empty" in capsys.readouterr().err


def test_a_bad_timeout_is_a_usage_error(capsys):
    assert cli.main(["solve", "Tom has 3 boxes.", "--timeout", "0", "--search-address", "127.0.0.1:1"]) == 2
    assert "timeout must be > 0" in capsys.readouterr().err
