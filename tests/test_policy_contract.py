"""The `Policy` contract, run against every implementation of `rstar.protocols.Policy`:

- the fakes (`WalkPolicy`, `ScriptedPolicy`);
- the teacher client (`trainer.bootstrap.TeacherPolicy`) against a fake OpenAI-compatible
  `/v1/completions` server started here on 127.0.0.1, once keeping stop strings
  (`include_stop_str_in_output`, as vLLM does) and once dropping them (reporting `stop_reason`);
- the local transformers policy (`rstar.local_policy.HFPolicy`) on the tiny format model;
- the gRPC `PolicyClient` against a real policy service (vLLM) on the tiny format model
  (marked `integration`: it starts `python -m policy_svc` in a subprocess).

Properties: n candidates per item, each a `Candidate` with finish reason "stop" or "length";
the model version is set; a stop string is kept at the end of the text (nothing follows the
first one, from `rstar.steps.GENERATION_STOPS`); and an item's candidates do not depend on
what else is in the batch (same seed: same candidates alone, first, last or among others).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rstar import steps
from rstar.protocols import Candidate, GenerationItem, SamplingParams
from rstar_testing.fakes import ScriptedPolicy, WalkPolicy
from tests.conftest import TINY_SOLUTIONS, free_port

pytestmark = pytest.mark.timeout(900)

Q1, S1 = TINY_SOLUTIONS[0]
Q2, _ = TINY_SOLUTIONS[1]
A = GenerationItem(Q1, (), 3, 11)
B = GenerationItem(Q2, (), 2, 5)
C = GenerationItem(Q1, (S1[0],), 2, 6)
SAMPLED = SamplingParams(temperature=1.2, top_p=0.95, max_tokens=32)  # hot enough that seeds matter
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


# --------------------------------------------------------------------------- a fake OpenAI-compatible server

# What the fake "model" writes after a prompt: well-formed steps, steps with text after the
# marker, a step that writes its own output, an answer that starts a new turn, an endless thought.
MENU = [
    "\n# Step 2: Add one.\nv = v + 1\n<end_of_step>\n# Step 3: it keeps going\nv = v * 2\n<end_of_step>",
    "\n# Now print the final answer\nprint(v)\n<end_of_code>\n<output>5<end_of_output>",
    "\nprint(v)\n<output>42<end_of_output>\n<answer>The answer is \\boxed{42}.<end_of_answer>",
    "\n<answer>From the result, the answer is \\boxed{5}.<end_of_answer><|user|>: another question",
    "\n# an endless thought " + "and so on " * 40,
]


class _Completions(BaseHTTPRequestHandler):
    def log_message(self, *_args):  # quiet
        pass

    def do_POST(self):  # noqa: N802 - http.server's name
        if self.path != "/v1/completions":
            self.send_error(404)
            return
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(payload)
        keep = payload.get("include_stop_str_in_output", False) and not self.server.drop_stops
        choices = []
        for i in range(int(payload.get("n", 1))):
            # like a seeded server: the text depends on prompt, seed and index only (greedy: prompt only)
            key = payload["prompt"] + (f"|{payload.get('seed')}|{i}" if payload.get("temperature", 1.0) > 0 else "")
            raw = random.Random(key).choice(MENU)
            hits = [(raw.find(s), s) for s in payload.get("stop", []) if s in raw]
            stop_reason = None
            if hits:
                pos, stop_reason = min(hits)
                text, reason = raw[:pos + (len(stop_reason) if keep else 0)], "stop"
            else:
                text, reason = raw, "stop"  # end of sequence
            if len(text) > 4 * int(payload["max_tokens"]):  # ~4 characters a token
                text, reason, stop_reason = text[:4 * int(payload["max_tokens"])], "length", None
            choices.append({"index": i, "text": text, "finish_reason": reason, "stop_reason": stop_reason})
        body = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": payload["model"],
                           "choices": list(reversed(choices))}).encode()  # order by index is the client's job
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def completions_server():
    servers = {}

    def start(drop_stops: bool) -> str:
        if drop_stops not in servers:
            srv = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
            srv.handle_error = lambda request, client_address: None   # no late tracebacks in other tests' stderr
            srv.requests, srv.drop_stops = [], drop_stops
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            servers[drop_stops] = srv
        return f"http://127.0.0.1:{servers[drop_stops].server_address[1]}"

    yield start
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- a real policy service (vLLM)


@pytest.fixture(scope="module")
def policy_service(tmp_path_factory, tiny_format_model_dir):
    """`python -m policy_svc` on the tiny format model; yields its address."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    home = tmp_path_factory.mktemp("policy-home")
    port = free_port()
    log = open(home / "policy.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "policy_svc", "--port", str(port), "--metrics-port", "-1",
         "--model", str(tiny_format_model_dir), "--few-shot", "false", "--max-model-len", "2048",
         "--kv-cache-gib", "1", "--reload-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, RSTAR_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    log.close()
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("policy service exited:\n" + (home / "policy.log").read_text()[-4000:])
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("policy service not SERVING after 600 s")
                time.sleep(0.5)
        yield address
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


# --------------------------------------------------------------------------- the implementations


def _scripted() -> ScriptedPolicy:
    step1 = [(S1[0], 2.0), ("<code>\n# Step 1: Add instead.\ntotal = 3 + 12\n<end_of_step>", 1.0),
             ("<code>\n# Step 1: a thought cut by the token limit...", 0.5)]
    return ScriptedPolicy({(): step1, (S1[0],): [(S1[1], 1.0), ("\nprint(total * 1)\n<end_of_code>", 1.0)]})


@pytest.fixture(scope="module", params=[
    "walk", "scripted", "teacher", "teacher-dropping-stops", "hf",
    pytest.param("grpc-vllm", marks=pytest.mark.integration),
])
def policy(request):
    from trainer.bootstrap import TeacherPolicy

    name = request.param
    if name == "walk":
        yield WalkPolicy()
    elif name == "scripted":
        yield _scripted()
    elif name.startswith("teacher"):
        url = request.getfixturevalue("completions_server")(name == "teacher-dropping-stops")
        yield TeacherPolicy(url, "fake-model", retries=1, few_shot=False)
    elif name == "hf":
        from rstar.local_policy import HFPolicy

        yield HFPolicy(request.getfixturevalue("tiny_format_model_dir"), few_shot=False, version="tiny")
    else:
        from rstar.clients import PolicyClient

        client = PolicyClient(request.getfixturevalue("policy_service"), timeout=300, retries=2)
        yield client
        client.close()


# --------------------------------------------------------------------------- the properties


def _check_shape(res, items) -> None:
    assert isinstance(res.model_version, str) and res.model_version, "model_version not set"
    assert len(res) == len(items)
    assert [len(cands) for cands in res] == [it.n for it in items]
    for cands in res:
        for c in cands:
            assert isinstance(c, Candidate) and isinstance(c.text, str)
            assert c.finish_reason in ("stop", "length"), c


@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_n_candidates_with_finish_reasons_and_model_version(policy, params):
    items = [A, B, C]
    _check_shape(policy.generate(items, params), items)


def test_candidates_do_not_depend_on_the_batch(policy):
    alone = policy.generate([A], SAMPLED)
    first = policy.generate([A, B], SAMPLED)
    among = policy.generate([B, C, A], SAMPLED)
    assert list(alone[0]) == list(first[0]) == list(among[2])
    assert list(first[1]) == list(among[0])           # B, first or last
    assert list(among[1]) == list(policy.generate([C], SAMPLED)[0])


def _first_stop(text: str) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in steps.GENERATION_STOPS if s in text]
    return min(hits) if hits else None


def test_stop_strings_are_kept_at_the_end(policy):
    res = policy.generate([A, B, C], SAMPLED)
    ended = 0
    for cands in res:
        for c in cands:
            hit = _first_stop(c.text)
            if hit is None:
                continue
            pos, stop = hit
            assert c.text[:pos + len(stop)] == c.text, f"text after the stop string {stop!r}: {c.text!r}"
            assert c.finish_reason == "stop", c
            ended += 1
    assert ended > 0, "no candidate ended with a stop string (are they stripped?)"
