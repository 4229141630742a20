"""End to end with the real default model (SmolLM2-135M-Instruct via vLLM on the CPU):
`rstar demo` starts the four services, solves a problem through them and stops them.
Checks that the whole path runs, not that the untrained model is right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


def test_demo_solves_through_the_four_services(tmp_path, default_model_dir):
    home = tmp_path / "home"
    # reuse the converted checkpoint instead of converting again
    (home / "cache" / "base").mkdir(parents=True)
    os.symlink(default_model_dir, home / "cache" / "base" / "smollm2-135m-instruct")
    base = free_port()
    while any(_busy(base + d) for d in (1, 2, 3, 100, 101, 102, 103)):
        base = free_port()
    env = dict(os.environ, RSTAR_HOME=str(home))
    out = subprocess.run(
        [sys.executable, "-m", "rstar_cli.main", "demo", "What is 12 times 3?", "--base-port", str(base),
         "--rollouts", "2", "-k", "2", "--max-depth", "4", "--seed", "1", "--json",
         "--model", "smollm2-135m-instruct"],   # the fast embedded model (the default is Qwen2.5-Coder-0.5B)
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    logs = "".join((home / "logs" / f"{n}.log").read_text()[-3000:] for n in ("policy", "search")
                   if (home / "logs" / f"{n}.log").exists())
    assert out.returncode == 0, out.stderr[-3000:] + logs
    data, _ = json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])
    assert data["trajectory"]["steps"], data
    assert int(data["stats"]["generated_tokens"]) > 0
    versions = {m["name"]: m["version"] for m in data["model_versions"]}
    assert versions["policy"] == "base-smollm2-135m" and versions["ppm"] == "base-smollm2-135m"
    assert "SERVING" in out.stdout  # the status table printed after the solve


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
