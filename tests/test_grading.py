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
