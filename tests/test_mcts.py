"""MCTS phases on hand-built trees and deterministic fakes of the policy/PPM/executor protocols."""

import math

import pytest

from rstar import steps as stepfmt
from rstar.search import mcts
from rstar.search.engine import Engine
from rstar_testing.fakes import HashScorer, InProcessExecutor, ScriptedPolicy
from rstar.search.mcts import (PPM_AUGMENTED, TERMINAL_GUIDED, Candidate, ExecResult, Node, SamplingParams, Tree,
                             TreeSettings, backpropagate, select_child, uct_score)

SAMPLE = SamplingParams(temperature=0.7)


def code(n, expr):
    return f"\n# Step {n}: compute.\n{expr}\n<end_of_step>"


def first(expr):
    return f"<code>\n# Step 1: start.\n{expr}\n<end_of_step>"


PRINT = "\n# Now print the final answer\nprint(x)\n<end_of_code>"


def answer(v):
    return f"\n<answer>From the result, the answer is \\boxed{{{v}}}.<end_of_answer>"


def node(parent, n=0, w=0.0, terminal=False, nid=[100]):
    nid[0] += 1
    ch = Node(id=nid[0], parent=parent, depth=(parent.depth + 1) if parent else 0, N=n, W=w, terminal=terminal)
    if parent is not None:
        parent.children.append(ch)
        parent.expanded = True
    return ch


def run_tree(policy, settings, gold=None, scorer=None, seed=0):
    tree = Tree("q", settings, seed=seed, gold=gold)
    Engine(policy, InProcessExecutor(), scorer, sampling=SAMPLE).run([tree])
    return tree


# --- selection ---

def test_uct_formula_and_unvisited_child_scores_zero():
    root = node(None, n=10)
    a = node(root, n=5, w=1.0)
    b = node(root)
    assert uct_score(a, root.N, 2.0) == pytest.approx(0.2 + 2 * math.sqrt(math.log(10) / 5))
    assert uct_score(b, root.N, 2.0) == 0.0
    assert select_child(root, 2.0) is a


def test_unvisited_child_beats_a_negative_one_and_ties_go_to_the_first_child():
    root = node(None, n=1)
    bad = node(root, n=1, w=-1.0)        # ln(1) = 0: UCT = Q = -1
    u1 = node(root)
    u2 = node(root)
    assert select_child(root, 2.0) is u1
    del bad, u2
    root2 = node(None)
    kids = [node(root2) for _ in range(3)]
    assert select_child(root2, 2.0) is kids[0]


def test_terminal_children_are_never_selected_and_all_terminal_gives_none():
    root = node(None, n=4)
    node(root, n=1, w=1.0, terminal=True)
    live = node(root, n=3, w=-3.0)
    assert select_child(root, 2.0) is live
    live.terminal = True
    assert select_child(root, 2.0) is None


def test_exploration_constant_changes_the_choice():
    root = node(None, n=20)
    exploit = node(root, n=15, w=9.0)    # Q 0.6, many visits
    explore = node(root, n=2, w=0.0)     # Q 0, few visits
    assert select_child(root, 0.0) is exploit
    assert select_child(root, 2.0) is explore


# --- backpropagation ---

def test_backpropagate_adds_to_every_node_on_the_path():
    root = node(None)
    a = node(root)
    a1 = node(a)
    b = node(root)
    backpropagate(a1, 1.0)
    backpropagate(a1, -1.0)
    backpropagate(b, 1.0)
    assert (a1.N, a1.W, a1.Q) == (2, 0.0, 0.0)
    assert (a.N, a.W) == (2, 0.0)
    assert (b.N, b.Q) == (1, 1.0)
    assert (root.N, root.W, root.Q) == (3, 1.0, pytest.approx(1 / 3))


def test_known_rollouts_terminal_guided():
    # root -> [x=3 (wrong), x=2 (right)]; each -> print -> answer
    script = {
        (): [(first("x = 3"), 1), (first("x = 2"), 1)],
        (first("x = 3"),): [(PRINT, 1)],
        (first("x = 2"),): [(PRINT, 1)],
        (first("x = 3"), PRINT): [(answer(3), 1)],
        (first("x = 2"), PRINT): [(answer(2), 1)],
    }
    tree = run_tree(ScriptedPolicy(script, ordered=True),
                    TreeSettings(rollouts=5, k=2, annotation=TERMINAL_GUIDED), gold="2")
    w1, c1 = tree.root.children
    # rollout 1: first child (unvisited tie) down to the wrong answer; rollout 2: the other one
    assert tree.rollouts_done == 2 and tree.root.terminal      # everything explored: exhausted early
    assert (w1.N, w1.Q) == (1, -1.0) and (c1.N, c1.Q) == (1, 1.0)
    assert (tree.root.N, tree.root.W) == (2, 0.0)
    ans_w = w1.children[0].children[0]
    ans_c = c1.children[0].children[0]
    assert (ans_w.answer, ans_w.correct, ans_w.terminal) == ("3", False, True)
    assert (ans_c.answer, ans_c.correct) == ("2", True)
    # the print step carries the executed output and its children see it as a system step
    p = c1.children[0]
    assert p.output.strip() == "2" and p.ends_code
    assert ans_c.prefix_steps()[-2:] == (stepfmt.output_step("2"), ans_c.text)


# --- expansion ---

def test_duplicates_removed_and_first_step_normalised():
    leaf = Tree("q", TreeSettings(k=3), seed=0).root
    cands = [Candidate("# Step 1: start.\nx = 1\n<end_of_step>"), Candidate("# Step 1: start.\nx = 1\n<end_of_step>\n"),
             Candidate("# Step 1: other.\nx = 2\n<end_of_step>")]
    children = mcts.expand_leaf(leaf, cands, TreeSettings(k=3), 1)
    assert len(children) == 2
    assert all(c.text.startswith("<code>\n") for c in children)
    assert children[0].program == "# Step 1: start.\nx = 1\n"


def test_one_answer_kept_among_answer_candidates():
    leaf = Tree("q", TreeSettings(), seed=0).root
    cands = [Candidate(answer(1)), Candidate(first("x = 1")), Candidate(answer(2)), Candidate(answer(1) + " ")]
    kept = mcts.expand_leaf(leaf, cands, TreeSettings(k=4), 1)
    assert [c.answer for c in kept] == ["1", None]
    every = mcts.expand_leaf(leaf, cands, TreeSettings(k=4, keep_one_answer=False), 1)
    assert [c.answer for c in every] == ["1", None, "2"]


def test_cut_empty_and_unterminated_candidates_fail_without_execution():
    leaf = Tree("q", TreeSettings(), seed=0).root
    cands = [Candidate("<code>\n# Step 1: long ...", "length", 256), Candidate("   "),
             Candidate("<code>\n# Step 1: no stop string\nx = 1", "stop")]
    kids = mcts.expand_leaf(leaf, cands, TreeSettings(), 1)
    assert [k.failure for k in kids] == ["length", "empty", "incomplete"]
    assert all(k.terminal and k.program is None for k in kids)


def test_failed_execution_and_error_output():
    root = Node(id=0, parent=None, depth=0)
    a = Node(id=1, parent=root, depth=1)
    mcts.apply_execution(a, ExecResult("", "ZeroDivisionError", "error"))
    assert a.terminal and a.failure == "error"
    b = Node(id=2, parent=root, depth=1)
    mcts.apply_execution(b, ExecResult("Error: bad input\n", "", "ok"))
    assert b.terminal and b.failure == "error_output"
    c = Node(id=3, parent=root, depth=1)
    mcts.apply_execution(c, ExecResult("5\n", "", "timeout"))
    assert c.failure == "timeout"


def test_program_reruns_the_whole_code_block():
    script = {
        (): [(first("x = 2"), 1)],
        (first("x = 2"),): [(code(2, "x = x * 5"), 1)],
        (first("x = 2"), code(2, "x = x * 5")): [(PRINT, 1)],
        (first("x = 2"), code(2, "x = x * 5"), PRINT): [(answer(10), 1)],
    }
    seen = []

    class Spy(InProcessExecutor):
        def execute(self, programs, scope=None):
            seen.extend(programs)
            return super().execute(programs, scope)

    tree = Tree("q", TreeSettings(rollouts=1, k=1, annotation=TERMINAL_GUIDED), seed=0, gold="10")
    Engine(ScriptedPolicy(script), Spy(), sampling=SAMPLE).run([tree])
    assert seen[-1] == "# Step 1: start.\nx = 2\n# Step 2: compute.\nx = x * 5\n# Now print the final answer\nprint(x)\n"
    assert tree.answer_nodes()[0].correct


def test_failed_candidates_are_terminal_minus_one_and_do_not_move_the_parent():
    script = {(): [(first("x = 1 / 0"), 1), (first("x = 1"), 1)],
              (first("x = 1"),): [(PRINT, 1)], (first("x = 1"), PRINT): [(answer(1), 1)]}
    tree = run_tree(ScriptedPolicy(script, ordered=True), TreeSettings(rollouts=1, k=2, annotation=TERMINAL_GUIDED),
                    gold="1")
    bad, good = tree.root.children
    assert bad.failure == "error" and bad.terminal and (bad.N, bad.Q) == (1, -1.0)
    assert good.correct is None and (good.N, good.Q) == (1, 1.0)     # only the answer's +1 went up
    assert tree.root.N == 1 and tree.root.W == 1.0


def test_all_children_failed_makes_the_parent_terminal_and_backs_up_minus_one():
    script = {(): [(first("x = 1"), 1)],
              (first("x = 1"),): [(code(2, "y = x / 0"), 1), (code(2, "z = undefined_name"), 1)]}
    tree = run_tree(ScriptedPolicy(script, ordered=True), TreeSettings(rollouts=3, k=2, annotation=TERMINAL_GUIDED),
                    gold="1")
    a = tree.root.children[0]
    assert [c.failure for c in a.children] == ["error", "error"]
    assert a.terminal and (a.N, a.Q) == (1, -1.0)
    assert tree.root.terminal and (tree.root.N, tree.root.W) == (1, -1.0)
    assert tree.rollouts_done == 1     # exhausted: nothing left to explore


def test_depth_limit():
    script = {(): [(first("x = 1"), 1)], (first("x = 1"),): [(code(2, "x = x + 1"), 1)],
              (first("x = 1"), code(2, "x = x + 1")): [(code(3, "x = x + 1"), 1)]}
    tree = run_tree(ScriptedPolicy(script), TreeSettings(rollouts=2, k=1, max_depth=2, annotation=TERMINAL_GUIDED),
                    gold="3")
    deep = tree.root.children[0].children[0]
    assert deep.depth == 2 and deep.failure == "depth" and deep.terminal and deep.Q == -1.0
    assert deep.program is None          # never executed
    assert max(n.depth for n in tree.nodes) == 2 and tree.root.terminal


def test_answer_on_the_first_step():
    script = {(): [(answer(7), 1)]}
    tree = run_tree(ScriptedPolicy(script), TreeSettings(rollouts=4, k=2, annotation=TERMINAL_GUIDED), gold="7")
    assert len(tree.root.children) == 1
    ans = tree.root.children[0]
    assert ans.text == answer(7)          # an answer step is not forced into a <code> block
    assert ans.correct and ans.terminal and tree.root.terminal and tree.root.Q == 1.0


def test_ppm_priors_change_the_selection():
    script = {
        (): [(first("x = 3"), 1), (first("x = 2"), 1)],
        (first("x = 3"),): [(PRINT, 1)], (first("x = 2"),): [(PRINT, 1)],
        (first("x = 3"), PRINT): [(answer(3), 1)], (first("x = 2"), PRINT): [(answer(2), 1)],
    }
    settings = TreeSettings(rollouts=1, k=2, annotation=PPM_AUGMENTED)
    scorer = HashScorer(table={first("x = 3"): -0.5, first("x = 2"): 0.8, PRINT: 0.1, answer(2): 0.9, answer(3): 0.2})
    tree = run_tree(ScriptedPolicy(script, ordered=True), settings, gold="2", scorer=scorer)
    w, c = tree.root.children
    assert (w.N, w.Q, w.ppm_score) == (1, -0.5, -0.5)   # prior: one visit, Q = PPM score
    assert w.children == [] and len(c.children) == 1     # greedy on the PPM: the 0.8 child was expanded
    assert c.N == 2 and c.Q == pytest.approx((0.8 + 1.0) / 2)
    # without priors the first (tied, unvisited) child is taken
    plain = run_tree(ScriptedPolicy(script, ordered=True), TreeSettings(rollouts=1, k=2, annotation=TERMINAL_GUIDED),
                     gold="2")
    assert plain.root.children[0].children and not plain.root.children[1].children


def test_inference_terminal_value_is_the_ppm_score():
    script = {(): [(answer(5), 1)]}
    tree = run_tree(ScriptedPolicy(script), TreeSettings(rollouts=1, k=1), gold=None,
                    scorer=HashScorer(table={answer(5): 0.25}))
    ans = tree.root.children[0]
    assert ans.correct is None and ans.ppm_score == 0.25 and ans.Q == 0.25 and tree.root.Q == 0.25
