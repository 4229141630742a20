"""The dependency rule, read from the source: every import of every module, including
imports inside functions (the kind no module header shows).

- `rstar` (the domain library) imports no app and no test support;
- an app (`policy_svc`, `ppm_svc`, `sandbox_svc`, `search_svc`, `trainer`, `rstar_cli`)
  imports `rstar` and itself, never another app and never test support;
- `rstar_testing` (test support) is imported by `tests/` and `bench/` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "rstar"
APPS = ("policy_svc", "ppm_svc", "sandbox_svc", "search_svc", "trainer", "rstar_cli")
TEST_SUPPORT = "rstar_testing"
PRODUCTION = (LIBRARY, *APPS)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from pkg import module` imports pkg.module too
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("__import__", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def top(module: str) -> str:
    return module.split(".", 1)[0]


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        if "v1" in path.relative_to(REPO).parts:  # generated stubs
            continue
        for line, mod in imported_modules(path):
            t = top(mod)
            where = f"{path.relative_to(REPO)}:{line} imports {mod}"
            if t == TEST_SUPPORT:
                found.append(f"{where} (test support in production code)")
            elif package == LIBRARY and t in APPS:
                found.append(f"{where} (the library imports an app)")
            elif package in APPS and t in APPS and t != package:
                found.append(f"{where} (an app imports another app)")
    return found


@pytest.mark.parametrize("package", PRODUCTION)
def test_dependencies_point_one_way(package):
    assert violations(package) == []


def test_the_rule_catches_imports_inside_functions(tmp_path, monkeypatch):
    # the checker itself: a function-level import of another app is found
    pkg = REPO / "trainer"
    probe = pkg / "_import_rule_probe.py"
    probe.write_text("def f():\n    from search_svc.server import main\n    import rstar_testing.fakes\n")
    try:
        found = violations("trainer")
    finally:
        probe.unlink()
    assert any("search_svc.server" in v and "another app" in v for v in found)
    assert any("rstar_testing" in v for v in found)


def test_every_top_level_package_is_classified():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= set(PRODUCTION) | {TEST_SUPPORT}, packages - set(PRODUCTION) - {TEST_SUPPORT}
