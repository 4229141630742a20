"""The policy service's continuous batching, against a real vLLM engine on the tiny random model:
a short call is not held back by a long one, and a request vLLM refuses fails alone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def policy_address(tmp_path_factory, tiny_model_dir):
    from rstar_cli.stack import health

    home = tmp_path_factory.mktemp("policy-batching")
    port = free_port()
    with open(home / "policy.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "policy_svc", "--port", str(port), "--metrics-port", "-1",
             "--model", str(tiny_model_dir), "--few-shot", "false", "--max-model-len", "512",
             "--kv-cache-gib", "1", "--reload-interval", "0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, RSTAR_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while health(address, 1.0) != "SERVING":
            if proc.poll() is not None:
                raise RuntimeError("policy service exited:\n" + (home / "policy.log").read_text()[-4000:])
            assert time.monotonic() < deadline, "policy service not SERVING after 600 s"
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _generate(address, question, max_tokens, n=1, timeout=120):
    from rstar.clients import PolicyClient
    from rstar.protocols import GenerationItem, SamplingParams

    client = PolicyClient(address, timeout=timeout, retries=1)
    try:
        return client.generate([GenerationItem(question, (), n, 7)],
                               SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens))
    finally:
        client.close()


@pytest.mark.timeout(900)
def test_a_short_call_returns_while_a_long_one_is_still_generating(policy_address):
    done: dict[str, float] = {}

    def long_call():
        out = _generate(policy_address, "Tell a long story.", max_tokens=400, n=8)
        done["long"] = time.monotonic()
        done["long_tokens"] = max(c.num_tokens for c in out[0])

    t = threading.Thread(target=long_call)
    t.start()
    time.sleep(1.0)   # the long call is running in the engine
    _generate(policy_address, "Say one word.", max_tokens=2)
    done["short"] = time.monotonic()
    t.join(300)
    assert done["long_tokens"] > 100, "the long call must really be long for this test to mean anything"
    assert done["short"] < done["long"], "the short call waited for the long one (lock-step batching)"


@pytest.mark.timeout(900)
def test_a_prompt_past_the_context_fails_alone(policy_address):
    from rstar.clients import DownstreamError

    results: dict[str, object] = {}

    def normal():
        results["ok"] = _generate(policy_address, "What is 2 + 2?", max_tokens=16, n=2)

    t = threading.Thread(target=normal)
    t.start()
    with pytest.raises(DownstreamError) as e:
        _generate(policy_address, "x " * 3000, max_tokens=4)   # ~3,000 tokens against a 512 context
    t.join(300)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(results["ok"][0]) == 2
    again = _generate(policy_address, "What is 3 + 3?", max_tokens=4)   # the engine is fine
    assert len(again[0]) == 1


@pytest.mark.timeout(900)
def test_a_refused_item_fails_alone_inside_its_call(policy_address):
    """One call, two items: the one past the context comes back failed, the other is served."""
    from rstar.clients import PolicyClient
    from rstar.protocols import GenerationItem, SamplingParams

    client = PolicyClient(policy_address, timeout=120, retries=1)
    try:
        out = client.generate([GenerationItem("x " * 3000, (), 2, 1), GenerationItem("What is 2 + 2?", (), 2, 2)],
                              SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8))
    finally:
        client.close()
    refused, served = out
    assert [(c.text, c.finish_reason) for c in refused] == [("", "length"), ("", "length")]
    assert len(served) == 2 and all(c.num_tokens > 0 for c in served)
