import pytest

from rstar.grading import answers_equal


@pytest.mark.parametrize("pred,gold", [
    ("\\frac{1}{2}", "0.5"), ("72", "72.0"), ("72.0", "72"), ("1,000", "1000"), ("\\$18", "18"),
    ("50\\%", "50"), ("0.5", "50%"), ("\\dfrac{3}{4}", "\\frac34"), ("x+1", "1+x"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("\\text{(B)}", "(B)"), ("\\boxed{7}", "7"),
])
def test_equivalent(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("72", "73"), ("0.5", "0.51"), ("x+1", "x-1"), ("", "1"), (None, "1"), ("1", None), ("blah{", "1"),
])
def test_not_equivalent(pred, gold):
    assert not answers_equal(pred, gold)


# --- which path decided, and the symbolic path's worker processes ---

from rstar import grading  # noqa: E402


@pytest.mark.parametrize("pred,gold,verdict", [
    ("72", "72", grading.Verdict(True, grading.EXACT)),
    ("\\boxed{7}", "7", grading.Verdict(True, grading.EXACT)),
    ("72.0", "72", grading.Verdict(True, grading.NUMERIC)),
    ("72", "73", grading.Verdict(False, grading.NUMERIC)),
    ("\\frac{1}{2}", "0.5", grading.Verdict(True, grading.NUMERIC)),
    ("x+1", "1+x", grading.Verdict(True, grading.SYMBOLIC)),
    ("x+1", "x-1", grading.Verdict(False, grading.SYMBOLIC)),
    (None, "1", grading.Verdict(False, grading.NONE)),
    ("  ", "1", grading.Verdict(False, grading.NONE)),
])
def test_grade_says_which_path_decided(pred, gold, verdict):
    assert grading.grade(pred, gold) == verdict
    assert answers_equal(pred, gold) is verdict.equal


def test_symbolic_grading_from_a_thread_is_right():
    import threading

    got = {}

    def work():
        grading._CACHE.clear()
        got["v"] = [grading.answers_equal(p, g) for p, g in
                    [("\\sqrt{2}", "2^{1/2}"), ("x+1", "1+x"), ("\\frac{\\pi}{2}", "\\pi/2")]]

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert got["v"] == [True, True, True]


def test_a_worker_that_died_is_replaced():
    grading.warm_up(wait=True)
    for w in list(grading._get_pool()._idle):
        w.proc.kill()
        w.proc.wait()
    grading._CACHE.clear()
    assert grading.grade("x+1", "1+x") == grading.Verdict(True, grading.SYMBOLIC)


def test_no_workers_means_not_equal_and_nothing_cached(monkeypatch):
    grading.shutdown()

    def no_processes():
        raise OSError("cannot start processes here")

    monkeypatch.setattr(grading, "_Worker", no_processes)
    grading._CACHE.clear()
    assert grading.grade("\\sqrt{2}", "2^{1/2}") == grading.Verdict(False, grading.SYMBOLIC_UNAVAILABLE)
    assert not grading._CACHE
    assert grading.grade("0.5", "50%").equal          # the in-process paths do not need a worker
    monkeypatch.undo()
    grading.shutdown()                                 # drop the pool that remembers the failed start
    assert grading.grade("\\sqrt{2}", "2^{1/2}").equal


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(grading, "CACHE_SIZE", 3)
    grading._CACHE.clear()
    for i in range(5):
        grading.grade(f"x+{i}", f"{i}+x")
    assert len(grading._CACHE) == 3 and ("x+4", "4+x") in grading._CACHE
