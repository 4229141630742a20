"""Answer equivalence ("grading"), spec section 1.

Exact match after normalisation, else numeric equality (relative tolerance
1e-4, percentages), else symbolic equality via `math-verify` (sympy inside,
with its own timeout). Never raises on odd input: unparsable means "not equal".
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

log = logging.getLogger(__name__)

_REL_TOL = 1e-4


def normalize(ans: str) -> str:
    s = str(ans).strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", s)
    if boxed:
        s = boxed.group(1)
    s = s.replace("\\$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    return s.lower()


def _to_number(s: str) -> float | None:
    t = s.replace(",", "")
    pct = t.endswith("%") or t.endswith("\\%")
    t = t.rstrip("%").rstrip("\\")
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", t) or re.fullmatch(r"(-?\d+)/(-?\d+)", t)
    try:
        if m:
            val = float(Fraction(int(m.group(1)), int(m.group(2))))
        else:
            val = float(t)
    except (ValueError, ZeroDivisionError):
        return None
    return val / 100.0 if pct else val


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(1.0, abs(a), abs(b))


def answers_equal(predicted: str | None, gold: str | None) -> bool:
    if predicted is None or gold is None:
        return False
    p, g = normalize(predicted), normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    pn, gn = _to_number(p), _to_number(g)
    if pn is not None and gn is not None:
        # a percentage may be written with or without the sign
        return _close(pn, gn) or _close(pn * 100, gn) or _close(pn, gn * 100)
    return _symbolic_equal(predicted, gold)


def _symbolic_equal(predicted: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a pinned dependency
        return False
    try:
        g = parse(_wrap(gold))
        p = parse(_wrap(predicted))
        if not g or not p:
            return False
        return bool(verify(g, p))
    except Exception as e:  # noqa: BLE001 - grading must never crash a search
        log.debug("symbolic grading failed for %r vs %r: %s", predicted, gold, e)
        return False


def _wrap(ans: str) -> str:
    ans = ans.strip()
    return ans if "$" in ans or "\\boxed" in ans else f"${ans}$"
