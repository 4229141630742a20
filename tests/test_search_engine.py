"""The batched engine, selection strategies and the core's solve/synthesize on protocol fakes."""

import threading
import time

import pytest

from rstar import trees as trajectories
from rstar.search import selection
from rstar.search.core import Admission, Busy, SearchCore, SearchOptions, SynthesisProblem
from rstar.search.engine import CallScope, Cancelled, DeadlineExceeded, Engine, Limits
from rstar_testing.fakes import HashScorer, InProcessExecutor, ScriptedPolicy, SimulatedLatency, WalkPolicy
from rstar.search.mcts import TERMINAL_GUIDED, Node, SamplingParams, Tree, TreeSettings
from rstar.store import LocalStore

SAMPLE = SamplingParams(temperature=0.7)


def first(expr):
    return f"<code>\n# Step 1: start.\n{expr}\n<end_of_step>"


PRINT = "\n# Now print the final answer\nprint(x)\n<end_of_code>"


def answer(v):
    return f"\n<answer>From the result, the answer is \\boxed{{{v}}}.<end_of_answer>"


# A problem where the most likely first step is wrong: x = 3 (p 0.6) vs x = 2 (p 0.4); gold 2.
TRAP = {
    (): [(first("x = 3"), 0.6), (first("x = 2"), 0.4)],
    (first("x = 3"),): [(PRINT, 1)], (first("x = 2"),): [(PRINT, 1)],
    (first("x = 3"), PRINT): [(answer(3), 1)], (first("x = 2"), PRINT): [(answer(2), 1)],
}


def walk_trees(n, rollouts=6, k=3, annotation=TERMINAL_GUIDED, gold="12"):
    return [Tree(f"problem {i}", TreeSettings(rollouts=rollouts, k=k, annotation=annotation), seed=1000 + i,
                 gold=gold, problem_id=str(i)) for i in range(n)]


def dump(trees):
    return [trajectories.tree_to_dict(t) for t in trees]


def test_search_finds_the_answer_greedy_decoding_misses():
    greedy = Tree("q", TreeSettings(rollouts=1, k=1, annotation=TERMINAL_GUIDED), seed=3, gold="2")
    Engine(ScriptedPolicy(TRAP), InProcessExecutor(), sampling=SamplingParams(temperature=0)).run([greedy])
    assert [n.answer for n in greedy.answer_nodes()] == ["3"]

    tree = Tree("q", TreeSettings(rollouts=4, k=4, annotation=TERMINAL_GUIDED), seed=3, gold="2")
    Engine(ScriptedPolicy(TRAP), InProcessExecutor(), sampling=SAMPLE).run([tree])
    assert any(n.correct for n in tree.answer_nodes())
    assert selection.select([tree]).answer == "2"


def test_concurrent_trees_equal_sequential_trees_with_fewer_policy_calls():
    together_policy = WalkPolicy()
    together = walk_trees(6)
    stats = Engine(together_policy, InProcessExecutor(), sampling=SAMPLE).run(together)
    one_by_one_policy = WalkPolicy()
    alone = walk_trees(6)
    for t in alone:
        Engine(one_by_one_policy, InProcessExecutor(), sampling=SAMPLE).run([t])
    assert dump(together) == dump(alone)
    assert stats.policy_calls == together_policy.calls
    assert together_policy.calls < one_by_one_policy.calls / 3
    assert together_policy.items == one_by_one_policy.items   # same leaves, fewer calls


def test_active_tree_limit_gives_the_same_trees():
    a, b = walk_trees(10), walk_trees(10)
    Engine(WalkPolicy(), InProcessExecutor(), sampling=SAMPLE).run(a, Limits(max_active_trees=3))
    Engine(WalkPolicy(), InProcessExecutor(), sampling=SAMPLE).run(b, Limits(max_active_trees=10))
    assert dump(a) == dump(b)


def test_one_call_per_stage_per_iteration_and_stats_add_up():
    policy, scorer, executor = WalkPolicy(), HashScorer(), InProcessExecutor()
    trees = walk_trees(5, annotation="ppm_augmented", gold=None)
    stats = Engine(policy, executor, scorer, sampling=SAMPLE).run(trees)
    assert stats.policy_calls == stats.iterations == policy.calls
    assert stats.sandbox_calls == executor.calls <= stats.iterations
    assert stats.ppm_calls == scorer.calls <= stats.iterations
    assert stats.executions == executor.items
    assert stats.nodes == sum(len(t.nodes) - 1 for t in trees)
    assert stats.rollouts == sum(t.rollouts_done for t in trees)
    assert all(t.rollouts_done == 6 or t.root.terminal for t in trees)     # budget spent or tree exhausted
    assert stats.generated_tokens >= sum(n.num_tokens for t in trees for n in t.nodes)  # duplicates dropped
    assert stats.generate_seconds + stats.ppm_seconds + stats.sandbox_seconds + stats.other_seconds == \
        pytest.approx(stats.total_seconds)
    assert stats.stop_reason == "budget"
    assert stats.model_versions == {"policy": "walk-1", "ppm": "hash-ppm-1"}
    kinds = {n.failure for t in trees for n in t.nodes}
    assert {"", "error", "length"} <= kinds          # the fake produces every node kind


def test_same_seed_same_trees_other_seed_other_trees():
    def run(seed):
        trees = [Tree("p", TreeSettings(rollouts=6, k=3), seed=seed)]
        Engine(WalkPolicy(), InProcessExecutor(), HashScorer(), sampling=SAMPLE).run(trees)
        return dump(trees)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_token_and_wall_limits_stop_the_run():
    trees = walk_trees(4, rollouts=50)
    stats = Engine(WalkPolicy(), InProcessExecutor(), sampling=SAMPLE).run(trees, Limits(max_tokens=300))
    assert stats.stop_reason == "tokens" and 300 <= stats.generated_tokens < 300 + 4 * 3 * 256
    assert all(t.finished for t in trees)

    slow = SimulatedLatency(WalkPolicy(), "policy", base=0.05, step_base=0, step_per_seq=0)
    t0 = time.perf_counter()
    stats = Engine(slow, InProcessExecutor(), sampling=SAMPLE).run(walk_trees(2, rollouts=500),
                                                                 Limits(max_wall_seconds=0.3))
    assert stats.stop_reason == "wall_time" and time.perf_counter() - t0 < 1.5


class BlockingPolicy(WalkPolicy):
    """A policy call that takes `delay` seconds unless the request is stopped first (like a cancelled RPC)."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def generate(self, items, params, scope=None):
        if scope.wait(self.delay):
            scope.check()
        return super().generate(items, params, scope)


def test_cancellation_stops_promptly_and_drops_pending_work():
    scope = CallScope()
    executor = InProcessExecutor()
    threading.Timer(0.2, scope.stop).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        Engine(BlockingPolicy(30), executor, sampling=SAMPLE).run(walk_trees(3), scope=scope)
    assert time.perf_counter() - t0 < 2
    assert executor.calls == 0


def test_deadline_raises_deadline_exceeded():
    scope = CallScope(deadline=time.monotonic() + 0.3)
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        Engine(BlockingPolicy(0.1), InProcessExecutor(), sampling=SAMPLE).run(walk_trees(2, rollouts=500),
                                                                           scope=scope)
    assert time.perf_counter() - t0 < 1.5


def test_progress_reports_rollouts_and_finished_trees():
    seen = []
    trees = walk_trees(4)
    Engine(WalkPolicy(), InProcessExecutor(), sampling=SAMPLE).run(trees, Limits(max_active_trees=2),
                                                                    on_progress=seen.append)
    done = [p.rollouts_done for p in seen]
    assert done == sorted(done) and done[-1] == sum(t.rollouts_done for t in trees)
    assert sorted(t.problem_id for p in seen for t in p.finished) == ["0", "1", "2", "3"]


# --- selection strategies ---

def tree_with_answers(scored):
    tree = Tree("q", TreeSettings(), seed=1)
    for i, (ans, score) in enumerate(scored, start=1):
        n = Node(id=i, parent=tree.root, depth=1, text=answer(ans), answer=ans, ppm_score=score, terminal=True,
                 N=1, W=score)
        tree.root.children.append(n)
        tree.nodes.append(n)
    return tree


def test_strategies_pick_different_answers():
    trees = [tree_with_answers([("5", 0.9), ("7", -0.9), ("5", 0.8), ("7", -0.8), ("7.0", -0.9)])]
    assert selection.select(trees, selection.TOP_PPM).answer == "5"
    assert selection.select(trees, selection.MAJORITY_VOTE).answer == "7"     # 7 and 7.0 vote together
    assert selection.select(trees, selection.PPM_WEIGHTED_VOTE).answer == "5"
    trees = [tree_with_answers([("5", 0.95), ("\\frac{1}{2}", 0.9)]), tree_with_answers([("0.5", 0.9)])]
    sel = selection.select(trees, selection.PPM_WEIGHTED_VOTE)
    assert sel.answer == "\\frac{1}{2}" and selection.select(trees, selection.TOP_PPM).answer == "5"
    g = sel.groups[0]
    assert (g.votes, g.best_score, g.weighted_score) == (2, 0.9, pytest.approx(1.9))
    assert [t.final_score for t in sel.trajectories] == [0.95, 0.9, 0.9]
    assert sel.trajectory.answer == "\\frac{1}{2}" and sel.trajectory.final_score == 0.9


def test_no_answer_gives_the_best_partial_trajectory():
    trees = [Tree("q", TreeSettings(rollouts=2, k=2), seed=1)]
    script = {(): [(first("x = 1"), 1), (first("x = 2"), 1)]}   # nothing after the first step
    Engine(ScriptedPolicy(script, ordered=True), InProcessExecutor(),
           HashScorer(table={first("x = 1"): 0.1, first("x = 2"): 0.5}), sampling=SAMPLE).run(trees)
    sel = selection.select(trees)
    assert sel.answer == "" and sel.groups == []
    # the best non-failed path, ending with the failed step tried after it
    assert len(sel.trajectory.steps) == 2 and sel.trajectory.steps[-1].failure
    assert not sel.trajectory.steps[0].failure


# --- core ---

def make_core(tmp_path=None, **kw):
    return SearchCore(WalkPolicy(), InProcessExecutor(), HashScorer(),
                      LocalStore(tmp_path) if tmp_path else None, **kw)


def test_solve_runs_independent_trajectories_with_derived_seeds():
    core = make_core()
    out = core.solve("problem", SearchOptions(rollouts=4, k=3, trajectories=3, seed=11))
    assert len({t.seed for t in out.trees}) == 3 and out.stats.trees == 3
    again = core.solve("problem", SearchOptions(rollouts=4, k=3, trajectories=3, seed=11))
    assert dump(out.trees) == dump(again.trees) and out.selection.answer == again.selection.answer
    assert out.selection.answer and out.stats.policy_calls < sum(1 for t in out.trees for n in t.nodes if n.expanded)


def test_synthesize_writes_a_complete_shard(tmp_path):
    core = make_core(tmp_path)
    problems = [SynthesisProblem(id=f"p{i}", problem=f"problem {i}", answer=str(10 + i % 5)) for i in range(12)]
    seen = []
    out = core.synthesize(problems, SearchOptions(rollouts=4, k=3, annotation=TERMINAL_GUIDED, seed=5,
                                                  max_active_trees=4),
                          round_no=2, shard="unit", on_tree=lambda t, d: seen.append(t.problem_id))
    assert sorted(seen) == sorted(p.id for p in problems)
    assert out.shard_key == "trajectories/round-2/unit.jsonl.gz"
    store = LocalStore(tmp_path)
    [info] = trajectories.list_complete_shards(store, 2)
    assert info.manifest["trees"] == 12 and info.manifest["solved"] == out.solved
    back = list(trajectories.read_shard(store, 2, "unit"))
    assert [t.problem_id for t in back] == [p.id for p in problems]
    assert back[0].gold == "10" and back[0].settings["annotation"] == TERMINAL_GUIDED
    assert all(n.ppm_score is None for t in back for n in t.nodes)   # terminal-guided: no PPM calls


def test_admission_rejects_beyond_the_queue():
    adm = Admission(slots=1, queue=1)
    adm.acquire(CallScope())
    waiter_scope = CallScope()
    started = threading.Event()

    def wait():
        started.set()
        try:
            adm.acquire(waiter_scope)
        except Cancelled:
            pass

    th = threading.Thread(target=wait)
    th.start()
    started.wait()
    deadline = time.time() + 2
    while adm.waiting == 0 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(Busy):
        adm.acquire(CallScope())
    waiter_scope.stop()               # a cancelled waiter leaves the queue at once
    th.join(2)
    assert not th.is_alive() and adm.waiting == 0
    adm.release()
    adm.acquire(CallScope())
    adm.release()
