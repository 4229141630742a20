"""A short load test of a local stack (issue 16): bench/bench_load.py, a few users for ~15 s.

The real sandbox and search services as processes (tokens on, loopback, a low admission
limit), policy and PPM fakes behind the real servers; Locust drives Solve over gRPC. Under
that saturation every call is served or refused with RESOURCE_EXHAUSTED, none fails
otherwise, and health answers SERVING within 1 s on the main port and the health port at
every poll. The bench runs as a subprocess: Locust's gevent monkey-patches the process
that imports it, which must not be pytest's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[1]


def test_a_saturated_stack_serves_or_refuses_and_health_answers():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_load.py"), "--json", "--users", "6", "--seconds", "15",
         "--max-requests", "2000", "--time-scale", "0.5", "--deadline-s", "60", "--start-timeout", "60"],
        capture_output=True, text=True, timeout=140, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["served"] > 0, r
    assert r["failed"] == 0, r["errors"]
    assert r["refused"] > 0, r          # the admission limit (2 + 2) was reached: the stack was saturated
    assert set(r["health_by_port"]) == {"main port", "health port"}
    assert all(h["polls"] >= 10 for h in r["health_by_port"].values()), r["health_by_port"]
    assert r["health_answered"] == r["health_polls"], r["health_by_port"]   # SERVING within 1 s, every poll
    assert r["health_max_ms"] < 1000
    assert set(r["rss_before_mb"]) == set(r["rss_after_mb"]) == {"sandbox", "search", "policy+ppm fakes"}
    assert all(v > 0 for v in r["rss_after_mb"].values()), r["rss_after_mb"]
