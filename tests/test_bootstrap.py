"""GSM8K reference conversion (verified in the real sandbox) and the teacher endpoint client."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rstar import steps as stepfmt
from rstar.search.mcts import GenerationItem, SamplingParams
from trainer import bootstrap, data

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
NATALIA_SOL = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_convert_solution_exact_steps():
    c = bootstrap.convert_solution("g/0", NATALIA, NATALIA_SOL, "72")
    assert c.steps == (
        "<code>\n# Step 1: Natalia sold 48/2 = 24 clips in May.\nv1 = 48/2\n<end_of_step>",
        "\n# Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\nv2 = 48+v1\n<end_of_step>",
        "\n# Now print the final answer\nprint(v2)\n<end_of_code>",
    )
    assert c.program == stepfmt.assemble_program(list(c.steps[:-1]), c.steps[-1])
    assert [ln for ln in c.program.splitlines() if not ln.startswith("#")] == ["v1 = 48/2", "v2 = 48+v1", "print(v2)"]
    full = c.trajectory("72.0")
    assert full[-2:] == ("\n<output>72.0<end_of_output>",
                         "\n<answer>From the result, the answer is \\boxed{72}.<end_of_answer>")
    # every step parses as the search would parse it
    parsed = [stepfmt.parse_step(s) for s in full if "<output>" not in s]
    assert [p.complete for p in parsed] == [True] * 4 and parsed[-1].answer == "72"


def test_convert_folds_note_free_lines_and_rejects_unusable_solutions():
    sol = "First think.\nShe has 3*4 = <<3*4=12>>12 eggs.\n#### 12"
    c = bootstrap.convert_solution("x", "q", sol, "12")
    assert c.steps[0] == "<code>\n# Step 1: First think. She has 3*4 = 12 eggs.\nv1 = 3*4\n<end_of_step>"
    assert bootstrap.convert_solution("x", "q", "No notes at all.\n#### 5", "5") is None
    assert bootstrap.convert_solution("x", "q", "It is 2+2 = <<2+2=4>>4.\n#### 5", "5") is None   # gold not computed
    assert bootstrap.convert_solution("x", "q", "Bad <<__import__('os')=1>>\n#### 1", "1") is None


def test_converted_steps_mean_the_same_to_the_search_and_marker_quoting_lines_are_rejected():
    c = bootstrap.convert_solution("g/0", NATALIA, NATALIA_SOL, "72")
    kinds = [stepfmt.classify_candidate(s, "stop", is_first=i == 0).kind for i, s in enumerate(c.steps)]
    assert kinds == [stepfmt.CODE, stepfmt.CODE, stepfmt.ENDS_CODE]
    ans = stepfmt.classify_candidate(c.trajectory("72")[-1], "stop")
    assert ans.is_answer and ans.answer == "72" and ans.well_formed
    # a comment quoting a system marker would be cut by the search: not a usable conversion
    assert bootstrap.convert_solution("x", "q", "So <output> is 2+2 = <<2+2=4>>4.\n#### 4", "4") is None
    assert bootstrap.convert_solution("x", "q", "So \\boxed{4} is 2+2 = <<2+2=4>>4.\n#### 4", "4") is None


class _Exec:
    """A stand-in executor for a wrong-output case (the sandbox itself is used below)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def execute(self, programs, scope=None):
        from rstar.search.mcts import ExecResult

        return [ExecResult(stdout=o, failure=f) for o, f in self.outputs[:len(programs)]]


def test_verify_rejects_failures_and_wrong_outputs():
    c = bootstrap.convert_solution("g/0", NATALIA, NATALIA_SOL, "72")
    ok, stats = bootstrap.verify_conversions([c, c, c], _Exec([("72.0\n", "ok"), ("", "error"), ("71\n", "ok")]))
    assert len(ok) == 1 and stats.verified == 1 and stats.failed_execution == 1 and stats.wrong_output == 1


@pytest.mark.timeout(120)
def test_gsm8k_rows_verified_in_the_sandbox_become_sft_trees():
    from trainer.execution import LocalSandbox

    rows = data.load_problems("/work/shared/data/gsm8k_train.jsonl", limit=12) if _has_data() else [
        {"id": "g/0", "problem": NATALIA, "solution": NATALIA_SOL, "answer": "72"}]
    rows.append({"id": "bad", "problem": "q", "solution": "2+2 = <<2+2=4>>4\n#### 4", "answer": "5"})
    convs, n = bootstrap.convert_pool(rows)
    with LocalSandbox() as ex:
        ok, stats = bootstrap.verify_conversions(convs, ex)
    assert n == len(rows) and stats.verified >= 0.7 * (len(rows) - 1)
    assert all(c.problem_id != "bad" for c, _ in ok)
    trees = [bootstrap.chain_tree(c, out, 1) for c, out in ok]
    examples, sstats = data.build_sft([("r1", t) for t in trees])
    assert sstats.kept == len(ok)
    c, out = ok[0]
    assert examples[0].steps == c.trajectory(out)
    # the stored tree is in the trajectory-store schema
    from rstar import trees as traj

    record = traj.TreeRecord.from_dict(trees[0].to_dict())   # survives the round trip through the schema
    assert record.prefix_steps(len(record.nodes) - 1) == list(c.trajectory(out))


def _has_data() -> bool:
    import os

    return os.path.exists("/work/shared/data/gsm8k_train.jsonl")


# --------------------------------------------------------------------------- teacher endpoint


class _Teacher(BaseHTTPRequestHandler):
    requests: list = []
    fail_first = 0
    delay = 0.0

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append((self.path, body, self.headers.get("Authorization")))
        if cls.fail_first > 0:
            cls.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        if cls.delay:
            time.sleep(cls.delay)
        if body["model"] == "missing":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        choices = [{"index": 1, "text": "\n# Step 2: second\ny = 2\n", "finish_reason": "stop",
                    "stop_reason": "<end_of_step>"},
                   {"index": 0, "text": "\n<answer>\\boxed{3}<end_of_answer>", "finish_reason": "stop"},
                   {"index": 2, "text": "\n# Step 2: long", "finish_reason": "length"}][:body["n"]]
        out = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def teacher_server():
    _Teacher.requests, _Teacher.fail_first, _Teacher.delay = [], 0, 0.0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    # a handler still sleeping when its client gave up (the timeout test) must not print its broken
    # pipe into a later test's captured stderr
    srv.handle_error = lambda request, client_address: None
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_teacher_policy_speaks_openai_completions(teacher_server):
    t = bootstrap.TeacherPolicy(teacher_server, "big-model", api_key="k", few_shot=False)
    item = GenerationItem("What is 1+2?", ("<code>\n# Step 1: one\nx = 1\n<end_of_step>",), 3, 42)
    out = t.generate([item], SamplingParams(temperature=0.5, top_p=0.9, max_tokens=64))
    path, body, auth = _Teacher.requests[0]
    assert path == "/v1/completions" and auth == "Bearer k"
    assert body["prompt"] == stepfmt.render_prompt("What is 1+2?", list(item.steps), few_shot=False)
    assert body["n"] == 3 and body["stop"] == list(stepfmt.GENERATION_STOPS) and body["seed"] == 42
    assert body["max_tokens"] == 64 and body["temperature"] == 0.5
    texts = [c.text for c in out[0]]
    assert texts[0] == "\n<answer>\\boxed{3}<end_of_answer>"              # ordered by index
    assert texts[1].endswith("<end_of_step>")                               # dropped stop string restored
    assert out[0][2].finish_reason == "length"
    assert out.model_version == "teacher:big-model"


def test_teacher_retries_on_5xx_then_fails_clearly(teacher_server):
    _Teacher.fail_first = 2
    t = bootstrap.TeacherPolicy(teacher_server, "m", retries=3, backoff=0.01)
    out = t.generate([GenerationItem("q", (), 1, 0)], SamplingParams())
    assert len(out[0]) == 1 and len(_Teacher.requests) == 3
    _Teacher.fail_first = 5
    with pytest.raises(bootstrap.TeacherError, match="after 2 attempts"):
        bootstrap.TeacherPolicy(teacher_server, "m", retries=2, backoff=0.01).generate(
            [GenerationItem("q", (), 1, 0)], SamplingParams())
    _Teacher.fail_first = 0
    with pytest.raises(bootstrap.TeacherError, match="HTTP 404"):   # client errors are not retried
        bootstrap.TeacherPolicy(teacher_server, "missing", retries=3, backoff=0.01).generate(
            [GenerationItem("q", (), 1, 0)], SamplingParams())


def test_teacher_timeout(teacher_server):
    _Teacher.delay = 1.0
    t = bootstrap.TeacherPolicy(teacher_server, "m", timeout=0.2, retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(bootstrap.TeacherError):
        t.generate([GenerationItem("q", (), 1, 0)], SamplingParams())
    assert time.monotonic() - start < 1.5


def test_teacher_unreachable():
    t = bootstrap.TeacherPolicy("http://127.0.0.1:9", "m", timeout=0.5, retries=2, backoff=0.01)
    with pytest.raises(bootstrap.TeacherError, match="failed after 2 attempts"):
        t.generate([GenerationItem("q", (), 1, 0)], SamplingParams())
