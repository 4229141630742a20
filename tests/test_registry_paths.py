"""Hostile file paths in model manifests (issue 16, item 9): `/abs/x`, `../x`, `a/../../x`, empty,
NUL and friends are refused before any filesystem or store effect, by fetch, verify, promote and
publish alike, and the hot-reload watcher refuses such a version once, for good (counted, logged,
not fetched again on every poll)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from rstar import registry as registry_mod
from rstar.registry import (CACHE_MANIFEST, CACHE_MARKER, MANIFEST, ModelRegistry, RegistryError, UnsafePath,
                            check_file_path)
from rstar.reload import ModelSlot, ModelWatcher
from rstar.store import LocalStore

SHA = "0" * 64


def hostile(tmp_path: Path) -> list[str]:
    """Manifest paths that must never reach the filesystem (absolute ones point into tmp_path, so a
    directory created by a regression would be seen, and not land in /)."""
    return [
        str(tmp_path / "outside-abs" / "x"),  # absolute: `tmp / "/abs/x"` is "/abs/x"
        "/abs-rstar-test/x",
        "../outside-rel/x",
        "a/../../outside-up/x",
        "../../outside-up2/x",
        "",
        "a\x00b",
        "sub/\x00/x",
        "./x",
        "a//b",
        "trailing/",
        "line\nbreak",
        "back\\slash",
        MANIFEST,
        CACHE_MARKER,
        CACHE_MANIFEST,
    ]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def put_manifest(reg: ModelRegistry, name: str, version: str, paths: list[str]) -> None:
    """Write a manifest listing `paths` straight into the store (publish would refuse it)."""
    manifest = {
        "name": name, "version": version, "schema_version": 1, "created_at": "2025-01-01T00:00:00+00:00",
        "created_unix": 1.0, "files": [{"path": p, "size": 1, "sha256": SHA} for p in paths],
    }
    reg.store.put(f"models/{name}/{version}/{MANIFEST}", json.dumps(manifest).encode())


@pytest.fixture
def reg(tmp_path) -> ModelRegistry:
    return ModelRegistry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "cache" / "models")


def test_check_file_path_accepts_plain_relative_paths():
    for ok in ("config.json", "sub/extra.txt", "a/b/c.safetensors", ".gitattributes", "with space.txt",
               "ünïcode/f.bin", "a..b", "..a", "a/..b"):
        assert check_file_path(ok) == ok


def test_check_file_path_refuses_hostile_paths(tmp_path):
    for bad in hostile(tmp_path) + [None, 7, "x" * 256]:
        with pytest.raises(UnsafePath):
            check_file_path(bad)
    assert issubclass(UnsafePath, RegistryError)


@pytest.mark.parametrize("index", range(16))
def test_fetch_refuses_hostile_paths_without_creating_anything(reg, tmp_path, index):
    bad = hostile(tmp_path)[index]
    put_manifest(reg, "policy", "v1", ["config.json", bad])
    before = tree(tmp_path)
    with pytest.raises(UnsafePath):
        reg.fetch("policy", "v1")
    # nothing created anywhere: not outside the cache, not even the cache's own directories
    assert tree(tmp_path) == before
    assert not Path("/abs-rstar-test").exists()
    # the other readers refuse it too, still without an effect
    for call in (lambda: reg.manifest("policy", "v1"), lambda: reg.verify("policy", "v1"),
                 lambda: reg.promote("policy", "v1")):
        with pytest.raises(UnsafePath):
            call()
    assert reg.current("policy") is None
    assert tree(tmp_path) == before
    # listed, as not loadable
    (info,) = reg.versions("policy")
    assert info.version == "v1" and not info.complete


def test_fetch_refuses_a_file_used_as_a_directory_and_duplicates(reg, tmp_path):
    for i, paths in enumerate((["a", "a/b"], ["a/b", "a"], ["x", "x"])):
        put_manifest(reg, "policy", f"v{i}", paths)
        before = tree(tmp_path)
        with pytest.raises(UnsafePath):
            reg.fetch("policy", f"v{i}")
        assert tree(tmp_path) == before


def test_download_checks_paths_of_a_manifest_built_in_code(reg, tmp_path):
    """Defence in depth: `_download` re-checks before its first mkdir."""
    m = registry_mod.Manifest("policy", "v1", [registry_mod.FileEntry("../evil", 1, SHA)], "t", 1.0)
    before = tree(tmp_path)
    with pytest.raises(UnsafePath):
        reg._download(m, m.to_json(), SHA, reg.cached_path("policy", "v1"))
    assert tree(tmp_path) == before


def test_publish_refuses_hostile_paths_before_any_store_effect(reg, tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    # a stale object of an earlier unfinished upload: publish would delete it first
    reg.store.put("models/policy/v1/stale.bin", b"old")
    real_local_files = registry_mod.local_files
    for bad in ("../evil", "sub/../../evil", "line\nbreak"):
        monkeypatch.setattr(registry_mod, "local_files", lambda d, bad=bad: [*real_local_files(d), d / bad])
        with pytest.raises(UnsafePath):
            reg.publish("policy", src, "v1")
        assert reg.store.list("models/") == ["models/policy/v1/stale.bin"]
    monkeypatch.setattr(registry_mod, "local_files", real_local_files)
    # a real file with a control character in its name
    (src / "bad\x01name").write_text("x")
    with pytest.raises(UnsafePath):
        reg.publish("policy", src, "v1")
    assert reg.store.list("models/") == ["models/policy/v1/stale.bin"]
    os.unlink(src / "bad\x01name")
    m = reg.publish("policy", src, "v1")
    assert [f.path for f in m.files] == ["config.json"]


def test_publish_still_refuses_a_manifest_file(reg, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / MANIFEST).write_text("{}")
    with pytest.raises(RegistryError, match="reserves"):
        reg.publish("policy", src, "v1")
    assert reg.store.list("models/") == []


def reloads(service: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("rstar_model_reloads_total",
                                     {"service": service, "model": "policy", "outcome": outcome}) or 0.0


def test_watcher_refuses_a_hostile_version_for_good(reg, tmp_path, caplog):
    svc = "t-paths"
    slot: ModelSlot = ModelSlot(svc, "policy")
    loads: list[str] = []
    load = slot.loader(lambda v, p: v)
    watcher = ModelWatcher(reg, "policy", lambda v, p: (loads.append(v), load(v, p)), service=svc)
    src = tmp_path / "m1"
    src.mkdir()
    (src / "config.json").write_text("{}")
    reg.publish("policy", src, "v1")
    reg.promote("policy", "v1")
    assert watcher.check_once() == "ok" and slot.version == "v1"

    # CURRENT moved (by hand: promote refuses it) to a version whose manifest escapes the cache
    put_manifest(reg, "policy", "v2", ["config.json", "../../outside-watch/x"])
    reg.store.put("models/policy/CURRENT", b"v2")
    fetches: list[str] = []
    real_fetch = reg.fetch
    reg.fetch = lambda name, version=None: (fetches.append(version), real_fetch(name, version))[1]  # type: ignore
    failed0 = reloads(svc, "failed")
    before = tree(tmp_path)
    with caplog.at_level(logging.ERROR, logger="rstar.reload"):
        assert watcher.check_once() == "failed"
    assert "file path '../../outside-watch/x'" in watcher.last_error
    assert any("refused for good" in r.getMessage() and "outside-watch" in r.getMessage() for r in caplog.records)
    # not retried on later polls: no fetch, no new failure counted, the old model keeps serving
    for _ in range(3):
        assert watcher.check_once() == "skipped"
    assert fetches == ["v2"] and loads == ["v1"] and slot.version == "v1"
    assert reloads(svc, "failed") == failed0 + 1
    assert tree(tmp_path) == before

    # a new promotion is picked up again
    src3 = tmp_path / "m3"
    src3.mkdir()
    (src3 / "config.json").write_text('{"v": 3}')
    reg.publish("policy", src3, "v3")
    reg.promote("policy", "v3")
    assert watcher.check_once() == "ok" and slot.version == "v3"


def test_watcher_refuses_an_unreadable_manifest_for_good(reg, tmp_path):
    """A manifest from a newer schema (RegistryError) is the version's own fault too: not retried."""
    svc = "t-paths-schema"
    watcher = ModelWatcher(reg, "policy", lambda v, p: None, service=svc)
    reg.store.put(f"models/policy/v9/{MANIFEST}", json.dumps({"schema_version": 99, "files": []}).encode())
    reg.store.put("models/policy/CURRENT", b"v9")
    failed0 = reloads(svc, "failed")
    assert watcher.check_once() == "failed"
    assert watcher.check_once() == "skipped"
    assert reloads(svc, "failed") == failed0 + 1
