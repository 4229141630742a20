"""Synthesis storage never loses finished work and never lies (issue 16 item 6).

One property per test, on both store backends where the property is the
store's: create-only writes (objects and shards), a synthesis killed mid-run
(finished trees readable, nothing listed as a complete shard, a rerun takes
them back), a limit stop (never-started problems neither stored nor counted),
store faults (a failed part write is retried; the RPC answers UNAVAILABLE),
client shard names kept apart from the evolution's, and the trainer skipping an
unreadable shard with a metric and a log line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
from prometheus_client import REGISTRY

from rstar import trees as tj
from rstar.search.core import SearchCore, SearchOptions, SynthesisProblem
from rstar.search.mcts import TERMINAL_GUIDED
from rstar.store import AlreadyExists, LocalStore, StoreError, StoreUnavailable
from rstar.v1 import search_pb2, search_pb2_grpc
from rstar_testing.fakes import InProcessExecutor, WalkPolicy
from s3_gateway import private_s3_gateway, s3_gateway  # noqa: F401  (fixtures)
from search_svc.config import SearchConfig
from search_svc.server import create_server

PROBLEMS = [SynthesisProblem(id=f"p{i}", problem=f"problem {i}", answer=str(10 + i % 5)) for i in range(8)]
OPTS = dict(rollouts=3, k=2, annotation=TERMINAL_GUIDED, seed=5, max_active_trees=2)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(store, env for a child process to open the same store by its URL)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store"), {}
    gw = request.getfixturevalue("s3_gateway")
    return gw.store(prefix="synth"), gw.env()


def faults(op: str) -> float:
    return REGISTRY.get_sample_value("rstar_trajectory_shard_faults_total", {"op": op}) or 0.0


def tree(pid: str, correct: bool = True) -> tj.TreeRecord:
    return tj.TreeRecord(question=f"q {pid}", problem_id=pid, gold="3", nodes=[
        tj.NodeRecord(id=0, parent=None, children=[1], visits=1),
        tj.NodeRecord(id=1, parent=0, depth=1, text="\\boxed{3}", answer="3", correct=correct, terminal=True,
                      visits=1, value_sum=1.0, q=1.0)])


def reference_run(tmp_path) -> tuple[list[dict], int]:
    """The trees of an uninterrupted run, and how many policy calls it took."""
    policy = WalkPolicy()
    out = SearchCore(policy, InProcessExecutor(), store=LocalStore(tmp_path / "reference")).synthesize(
        PROBLEMS, SearchOptions(**OPTS), round_no=1, shard="chunk")
    return out.tree_dicts, policy.calls


# --- create-only writes ---


def test_create_only_put_never_replaces_an_object(backend):
    store, _ = backend
    store.put("a/key", b"first", create_only=True)
    with pytest.raises(AlreadyExists):
        store.put("a/key", b"second", create_only=True)
    assert store.get("a/key") == b"first" and store.list("a/") == ["a/key"]   # nothing replaced, no temp left


def test_concurrent_local_creators_exactly_one_wins(tmp_path):
    """Local create-only is atomic (link(2)); S3 is only where the server honours If-None-Match."""
    store = LocalStore(tmp_path)
    won, lost = [], []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.put("k", f"writer {i}".encode(), create_only=True)
            won.append(i)
        except AlreadyExists:
            lost.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.get("k") == f"writer {won[0]}".encode() and store.list() == ["k"]


def test_a_second_shard_write_is_refused_and_the_first_kept(backend):
    store, _ = backend
    first = tj.write_shard(store, 1, "s", [tree("a"), tree("b")])
    with pytest.raises(tj.ShardExists):
        tj.write_shard(store, 1, "s", [tree("c")])
    assert [t.problem_id for t in tj.read_shard(store, 1, "s")] == ["a", "b"]
    assert tj.read_manifest(store, 1, "s")["sha256"] == first.manifest["sha256"]
    assert first.manifest["problem_ids"] == ["a", "b"]


def test_racing_shard_writers_leave_one_whole_shard(tmp_path):
    store = LocalStore(tmp_path)
    results: dict[int, object] = {}
    barrier = threading.Barrier(6)

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = tj.write_shard(store, 2, "race", [tree(f"w{i}-{j}") for j in range(3)])
        except tj.ShardExists as e:
            results[i] = e

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if isinstance(r, tj.ShardInfo)]
    assert len(winners) == 1
    w = winners[0]
    assert [t.problem_id for t in tj.read_shard(store, 2, "race")] == [f"w{w}-{j}" for j in range(3)]
    # the losers removed their data objects: only the winner's data and its manifest remain
    assert store.list("trajectories/") == sorted([results[w].key, tj.manifest_key(2, "race")])


# --- a synthesis killed mid-run ---


KILLED_RUN = textwrap.dedent("""
    import json, os, sys
    from rstar.search.core import SearchCore, SearchOptions, SynthesisProblem
    from rstar.store import open_store
    from rstar_testing.fakes import InProcessExecutor, WalkPolicy

    class DyingPolicy(WalkPolicy):
        def generate(self, items, params, scope=None):
            if self.calls >= int(sys.argv[2]):
                os._exit(9)          # killed mid-search: no cleanup, no final write
            return super().generate(items, params, scope)

    problems, opts = json.loads(sys.argv[3])
    SearchCore(DyingPolicy(), InProcessExecutor(), store=open_store(sys.argv[1])).synthesize(
        [SynthesisProblem(**p) for p in problems], SearchOptions(**opts), round_no=1, shard="chunk")
""")


def test_a_killed_synthesis_keeps_finished_trees_lists_nothing_and_resumes(backend, tmp_path):
    store, env = backend
    reference, calls = reference_run(tmp_path)
    args = json.dumps([[p.__dict__ for p in PROBLEMS], OPTS])
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, store.url, str(calls // 2), args],
                          capture_output=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]

    # nothing is listed as a shard, complete or partial
    assert tj.list_complete_shards(store, 1) == [] and tj.list_shards(store, 1) == []
    # the finished trees are readable, each exactly what an uninterrupted run made of that problem
    kept = tj.read_parts(store, 1, "chunk")
    by_id = {d["problem_id"]: d for d in reference}
    assert 0 < len(kept) < len(PROBLEMS)
    assert all(t.to_dict() == by_id[t.problem_id] for t in kept)
    assert all(t.rollouts_done == OPTS["rollouts"] or t.nodes[0].terminal for t in kept)

    # a rerun searches only the rest and stores the whole shard, identical to the uninterrupted run
    policy = WalkPolicy()
    out = SearchCore(policy, InProcessExecutor(), store=store).synthesize(
        PROBLEMS, SearchOptions(**OPTS), round_no=1, shard="chunk")
    assert out.resumed == len(kept) and out.complete and policy.calls < calls
    [info] = tj.list_complete_shards(store, 1)
    assert info.shard == "chunk" and info.manifest["resumed"] == len(kept)
    assert [t.to_dict() for t in tj.read_shard(store, 1, "chunk")] == reference
    assert store.list(tj.parts_prefix(1, "chunk")) == []        # the parts are gone once the shard is stored


def test_a_rerun_of_a_stored_shard_is_refused_before_searching(tmp_path):
    store = LocalStore(tmp_path)
    SearchCore(WalkPolicy(), InProcessExecutor(), store=store).synthesize(PROBLEMS, SearchOptions(**OPTS), 1,
                                                                        shard="chunk")
    policy = WalkPolicy()
    with pytest.raises(tj.ShardExists):
        SearchCore(policy, InProcessExecutor(), store=store).synthesize(PROBLEMS, SearchOptions(**OPTS), 1,
                                                                         shard="chunk")
    assert policy.calls == 0


# --- limit stops ---


def test_a_limit_stop_stores_no_unstarted_problem_and_is_not_complete(tmp_path):
    store = LocalStore(tmp_path)
    out = SearchCore(WalkPolicy(), InProcessExecutor(), store=store).synthesize(
        PROBLEMS, SearchOptions(**{**OPTS, "max_tokens": 300}), round_no=1, shard="short")
    assert out.stats.stop_reason == "tokens" and not out.complete and out.not_started
    m = tj.read_manifest(store, 1, "short")
    stored = [t.problem_id for t in tj.read_shard(store, 1, "short")]
    assert m["complete"] is False and m["not_started"] == out.not_started and m["requested"] == len(PROBLEMS)
    assert m["problems"] == m["trees"] == len(stored) == len(out.tree_dicts) == len(PROBLEMS) - len(out.not_started)
    assert not set(stored) & set(out.not_started) and m["problem_ids"] == stored
    assert m["solved"] == out.solved == sum(t.solved for t in tj.read_shard(store, 1, "short"))
    assert tj.list_complete_shards(store, 1) == [] and [i.shard for i in tj.list_shards(store, 1)] == ["short"]
    for t in tj.read_shard(store, 1, "short"):   # `interrupted` names exactly the trees cut short
        assert (t.problem_id in m["interrupted"]) == (t.rollouts_done < OPTS["rollouts"] and not t.nodes[0].terminal)


# --- store faults ---


class FlakyParts(LocalStore):
    """A local store whose first `n` part writes fail as an unreachable server would."""

    def __init__(self, root, n: int):
        super().__init__(root)
        self.n = n

    def put(self, key, data, **kw):
        if ".parts/" in key and self.n > 0:
            self.n -= 1
            raise StoreUnavailable("S3 server unavailable (test)")
        super().put(key, data, **kw)


def test_a_failed_part_write_is_kept_and_retried_with_the_next_part(tmp_path, caplog):
    store = FlakyParts(tmp_path, n=1)
    before = faults("write_part")
    builder = tj.ShardBuilder(store, 1, "flaky")
    with caplog.at_level(logging.WARNING, logger="rstar.trees"):
        assert builder.add([tree("a")]) is False
    assert faults("write_part") == before + 1 and "not stored yet" in caplog.text
    assert tj.read_parts(store, 1, "flaky") == []
    assert builder.add([tree("b")]) is True
    assert [t.problem_id for t in tj.read_parts(store, 1, "flaky")] == ["a", "b"]   # one part holds both


def test_a_synthesis_riding_out_part_failures_stores_every_tree(tmp_path):
    store = FlakyParts(tmp_path, n=2)
    out = SearchCore(WalkPolicy(), InProcessExecutor(), store=store).synthesize(
        PROBLEMS, SearchOptions(**OPTS), round_no=1, shard="chunk")
    assert out.complete and [t.problem_id for t in tj.read_shard(store, 1, "chunk")] == [p.id for p in PROBLEMS]


def test_local_write_errors_are_store_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        LocalStore(tmp_path / "file").put("a/b", b"1")


# --- the Synthesize RPC ---


def serve(store):
    cfg = SearchConfig(port=0, metrics_port=-1, rollouts=3, candidates=2, max_problem_chars=4096)
    service = create_server(cfg, policy=WalkPolicy(), executor=InProcessExecutor(), scorer=None, store=store).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    return service, channel, search_pb2_grpc.SearchServiceStub(channel)


def synth_request(shard: str, n: int = 3) -> search_pb2.SynthesizeRequest:
    return search_pb2.SynthesizeRequest(
        problems=[search_pb2.Problem(id=f"q{i}", problem=f"sum problem {i}", answer=str(8 + i)) for i in range(n)],
        budget=search_pb2.Budget(rollouts=2, candidates_per_expansion=2), seed=3, round=1, shard=shard, store=True)


@pytest.fixture
def rpc_local(tmp_path):
    store = LocalStore(tmp_path / "store")
    service, channel, stub = serve(store)
    yield store, stub
    channel.close()
    service.close()


def test_client_shards_cannot_take_an_evolution_chunk_name(rpc_local):
    store, stub = rpc_local
    done = list(stub.Synthesize(synth_request("shard-000-0000"), timeout=60))[-1].done
    assert done.shard_key == "trajectories/round-1/api-shard-000-0000.jsonl.gz" and done.problems == 3
    assert [i.shard for i in tj.list_complete_shards(store, 1)] == ["api-shard-000-0000"]
    unnamed = list(stub.Synthesize(synth_request(""), timeout=60))[-1].done
    assert unnamed.shard_key.startswith("trajectories/round-1/api-s3-")


def test_a_second_synthesize_to_a_shard_is_already_exists(rpc_local):
    store, stub = rpc_local
    list(stub.Synthesize(synth_request("mine"), timeout=60))
    sha = tj.read_manifest(store, 1, "api-mine")["sha256"]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Synthesize(synth_request("mine", n=2), timeout=60))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert tj.read_manifest(store, 1, "api-mine")["sha256"] == sha


def test_a_broken_local_store_is_unavailable(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    service, channel, stub = serve(LocalStore(tmp_path / "not-a-dir"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Synthesize(synth_request("x"), timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "trajectory store" in e.value.details()
    finally:
        channel.close()
        service.close()


def test_an_unreachable_s3_store_is_unavailable(private_s3_gateway):
    store = private_s3_gateway.store(retries=1, connect_timeout_s=0.5)
    private_s3_gateway.stop()
    service, channel, stub = serve(store)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Synthesize(synth_request("x"), timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "unavailable" in e.value.details()
    finally:
        channel.close()
        service.close()


# --- the trainer ---


def corrupt_shards(store) -> None:
    """Round 1: `good`, `bad-hash` (data replaced), `bad-gzip` (garbage whose hash the manifest records)."""
    tj.write_shard(store, 1, "good", [tree("g1"), tree("g2")])
    tj.write_shard(store, 1, "bad-hash", [tree("h1")])
    store.put(tj.shard_key(1, "bad-hash"), gzip.compress(b'{"schema": "rstar.tree/1"}\n'))
    tj.write_shard(store, 1, "bad-gzip", [tree("z1")])
    garbage = b"\x1f\x8b not gzip at all"
    store.put(tj.shard_key(1, "bad-gzip"), garbage)
    m = tj.read_manifest(store, 1, "bad-gzip")
    m.update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    store.put(tj.manifest_key(1, "bad-gzip"), json.dumps(m).encode())


def test_the_trainer_skips_unreadable_shards_with_a_metric_and_a_log_line(tmp_path, caplog):
    from trainer import data

    store = LocalStore(tmp_path)
    corrupt_shards(store)
    before = faults("read")
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        got = [(src, t.problem_id) for src, t in data.iter_round_trees(store, 1, skipped)]
    assert got == [("round-1/good", "g1"), ("round-1/good", "g2")]
    assert sorted(skipped) == ["round-1/bad-gzip", "round-1/bad-hash"] and faults("read") == before + 2
    assert caplog.text.count("skipping unreadable trajectory shard") == 2


def test_an_unreachable_store_still_fails_the_trainer(tmp_path):
    from trainer import data

    class Down(LocalStore):
        def get(self, key):
            raise StoreUnavailable("S3 server unavailable (test)")

    store = Down(tmp_path)
    tj.write_shard(LocalStore(tmp_path), 1, "good", [tree("g1")])
    with pytest.raises(StoreUnavailable):   # transient: the stage is retried, never trained on less data
        list(data.iter_round_trees(store, 1))


def test_the_ppm_stage_survives_an_unreadable_shard_and_reports_it(tmp_path):
    from trainer import evolve
    from trainer.stages.train import stage_train_ppm

    ctx = evolve.Context(evolve.EvolveConfig(store_url=str(tmp_path / "store"), work_dir=str(tmp_path / "work")))
    corrupt_shards(ctx.store)       # `good` has only correct answers: no pairs, so nothing is trained
    summary = stage_train_ppm(ctx, 1)
    assert summary["skipped"] and sorted(summary["skipped_shards"]) == ["round-1/bad-gzip", "round-1/bad-hash"]
