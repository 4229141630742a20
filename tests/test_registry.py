"""Model registry on both backends: publish (manifest last), list/show, promote/rollback,
verified fetch into the cache, and the faults issue 5 names (killed uploads, a server stopped
mid-upload, corrupted files, a full cache disk, concurrent promotions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rstar_cli import models as cli_models
from rstar import store as store_mod
from rstar.registry import (CACHE_MARKER, IncompleteVersion, IntegrityError, ModelRegistry, RegistryError,
                            VersionNotFound, register_base_version, sha256_file)
from rstar.store import LocalStore, StoreFull, StoreUnavailable
from s3_gateway import mount_tmpfs, private_s3_gateway, s3_gateway  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def make_model(path: Path, tag: str, weights: int = 20_000) -> Path:
    """A tiny fake HF directory: config, tokenizer, weights (a few small files)."""
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    (path / "tokenizer.json").write_text(json.dumps({"vocab": [tag]}))
    (path / "model.safetensors").write_bytes((tag.encode() * weights)[:weights])
    (path / "sub" / "extra.txt").write_text(tag)
    (path / ".rstar-complete").write_text("hidden files are not published")
    return path


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path) -> ModelRegistry:
    if request.param == "local":
        st = LocalStore(tmp_path / "store")
    else:
        st = request.getfixturevalue("s3_gateway").store(prefix="reg")
    return ModelRegistry(st, cache_dir=tmp_path / "cache")


def test_publish_writes_files_then_manifest(registry, tmp_path):
    order: list[str] = []
    real_put, real_put_file = registry.store.put, registry.store.put_file
    registry.store.put = lambda k, d: (order.append(k), real_put(k, d))[1]  # type: ignore[method-assign]
    registry.store.put_file = lambda k, p: (order.append(k), real_put_file(k, p))[1]  # type: ignore[method-assign]
    src = make_model(tmp_path / "m1", "one")
    m = registry.publish("policy", src, "v1", parent="base", round=2, data={"shards": ["a"]},
                         eval={"gsm8k": 0.1}, metadata={"note": "x"})
    assert order[-1] == "models/policy/v1/manifest.json"
    assert sorted(order[:-1]) == ["models/policy/v1/config.json", "models/policy/v1/model.safetensors",
                                  "models/policy/v1/sub/extra.txt", "models/policy/v1/tokenizer.json"]
    assert {f.path for f in m.files} == {"config.json", "model.safetensors", "sub/extra.txt", "tokenizer.json"}
    weights = next(f for f in m.files if f.path == "model.safetensors")
    assert (weights.sha256, weights.size) == sha256_file(src / "model.safetensors")
    stored = json.loads(registry.store.get("models/policy/v1/manifest.json"))
    assert stored["parent"] == "base" and stored["round"] == 2 and stored["eval"] == {"gsm8k": 0.1}
    assert stored["data"] == {"shards": ["a"]} and stored["metadata"] == {"note": "x"}
    assert stored["schema_version"] == 1 and stored["created_at"] and stored["total_bytes"] == m.total_bytes
    assert registry.manifest("policy", "v1").files == m.files


def test_versions_are_immutable_and_names_checked(registry, tmp_path):
    src = make_model(tmp_path / "m", "a")
    registry.publish("policy", src, "v1")
    with pytest.raises(RegistryError, match="immutable"):
        registry.publish("policy", src, "v1")
    for bad in ["CURRENT", "history", "../x", "a/b", "-lead"]:
        with pytest.raises(ValueError):
            registry.publish("policy", src, bad)
    auto = registry.publish("policy", src)
    assert auto.version.startswith("v")


def test_list_show_and_incomplete_versions(registry, tmp_path):
    registry.publish("policy", make_model(tmp_path / "a", "a"), "v1")
    registry.publish("ppm", make_model(tmp_path / "b", "b"), "p1")
    registry.store.put("models/policy/v2/config.json", b"{}")  # an upload that never finished
    assert registry.names() == ["policy", "ppm"]
    infos = {i.version: i for i in registry.versions("policy")}
    assert infos["v1"].complete and not infos["v2"].complete
    with pytest.raises(IncompleteVersion, match="no manifest.json"):
        registry.manifest("policy", "v2")
    with pytest.raises(IncompleteVersion):
        registry.promote("policy", "v2")
    with pytest.raises(IncompleteVersion):
        registry.fetch("policy", "v2")
    with pytest.raises(VersionNotFound):
        registry.manifest("policy", "v9")
    assert registry.current("policy") is None
    assert not (registry.cache_dir / "policy" / "v2").exists()


def test_republishing_an_incomplete_version_replaces_its_leftovers(registry, tmp_path):
    registry.store.put("models/policy/v1/stale.bin", b"junk")
    m = registry.publish("policy", make_model(tmp_path / "a", "a"), "v1")
    assert "models/policy/v1/stale.bin" not in registry.store.list("models/policy/v1/")
    assert registry.verify("policy", "v1").files == m.files


def test_promote_rollback_history(registry, tmp_path):
    for v in ["a", "b", "c"]:
        registry.publish("policy", make_model(tmp_path / v, v), v)
    with pytest.raises(RegistryError, match="no CURRENT"):
        registry.rollback("policy")
    registry.promote("policy", "a")
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback("policy")
    registry.promote("policy", "b", reason="better eval")
    registry.promote("policy", "c")
    assert registry.current("policy") == "c"
    assert registry.rollback("policy")["version"] == "b"
    assert registry.rollback("policy")["version"] == "a"
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback("policy")
    registry.promote("policy", "c")
    assert registry.rollback("policy")["version"] == "a"
    hist = registry.history("policy")
    assert [(h["action"], h["previous"], h["version"]) for h in hist] == [
        ("promote", None, "a"), ("promote", "a", "b"), ("promote", "b", "c"),
        ("rollback", "c", "b"), ("rollback", "b", "a"), ("promote", "a", "c"), ("rollback", "c", "a")]
    assert hist[1]["reason"] == "better eval" and "@" in hist[1]["actor"]
    pointer = registry.current_pointer("policy")
    assert pointer["version"] == "a" and pointer["promotion_id"] == hist[-1]["id"]


def test_rollback_ignores_a_record_whose_pointer_was_never_written(registry, tmp_path):
    for v in ["a", "b", "c"]:
        registry.publish("policy", make_model(tmp_path / v, v), v)
    registry.promote("policy", "a")
    registry.promote("policy", "b")
    # a promoter of c that died between its history record and the CURRENT write
    real_put = registry.store.put

    def die_on_pointer(key, data):
        if key.endswith("/CURRENT"):
            raise RuntimeError("killed")
        real_put(key, data)

    registry.store.put = die_on_pointer  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        registry.promote("policy", "c")
    registry.store.put = real_put  # type: ignore[method-assign]
    assert registry.current("policy") == "b"
    assert registry.rollback("policy")["version"] == "a"


def test_hand_written_pointer_is_accepted(registry, tmp_path):
    registry.publish("policy", make_model(tmp_path / "a", "a"), "a")
    registry.store.put("models/policy/CURRENT", b"a\n")
    assert registry.current("policy") == "a"


def test_corrupted_file_is_refused_at_promote_and_fetch(registry, tmp_path):
    registry.publish("policy", make_model(tmp_path / "a", "a"), "a")
    registry.publish("policy", make_model(tmp_path / "b", "b"), "b")
    registry.promote("policy", "a")
    good = registry.store.get("models/policy/b/model.safetensors")
    registry.store.put("models/policy/b/model.safetensors", bytes([good[0] ^ 1]) + good[1:])  # same size
    with pytest.raises(IntegrityError, match="sha256"):
        registry.promote("policy", "b")
    registry.promote("policy", "b", deep=False)  # size-only check cannot see it...
    with pytest.raises(IntegrityError, match="refusing"):
        registry.fetch("policy", "b")  # ...but the download hashes every byte
    cache = registry.cache_dir / "policy"
    assert not (cache / "b").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    registry.store.put("models/policy/b/model.safetensors", good[:-1])  # truncated
    with pytest.raises(IntegrityError, match="bytes"):
        registry.verify("policy", "b", deep=False)
    registry.store.put("models/policy/b/model.safetensors", good)
    registry.store.delete("models/policy/b/tokenizer.json")
    with pytest.raises(IncompleteVersion, match="missing"):
        registry.verify("policy", "b", deep=False)


def test_fetch_verifies_caches_and_reuses_across_restarts(registry, tmp_path):
    src = make_model(tmp_path / "a", "a")
    registry.publish("policy", src, "a")
    registry.promote("policy", "a")
    path = registry.fetch("policy")
    assert path == registry.cache_dir / "policy" / "a"
    assert (path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (path / "sub" / "extra.txt").read_text() == "a"
    assert (path / CACHE_MARKER).exists()
    # a new registry object (a restarted service) reuses the cache without downloading
    again = ModelRegistry(registry.store, cache_dir=registry.cache_dir)
    calls = []
    real_open = again.store.open_read
    # (the manifest itself is read, on S3 through open_read: only model files count)
    again.store.open_read = lambda k: (k.endswith("manifest.json") or calls.append(k), real_open(k))[1]  # type: ignore
    assert again.fetch("policy", "a") == path
    assert calls == []
    # a damaged cache copy is downloaded again
    (path / "model.safetensors").write_bytes(b"short")
    assert again.fetch("policy", "a") == path
    assert (path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert calls


def test_concurrent_fetches_agree(registry, tmp_path):
    registry.publish("policy", make_model(tmp_path / "a", "a", weights=400_000), "a")
    results, errors = [], []

    def fetch():
        try:
            results.append(ModelRegistry(registry.store, cache_dir=registry.cache_dir).fetch("policy", "a"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in (registry.cache_dir / "policy").iterdir()] == ["a"]


def test_concurrent_promotions_last_writer_wins_never_torn(registry, tmp_path):
    versions = [f"v{i}" for i in range(6)]
    for v in versions:
        registry.publish("policy", make_model(tmp_path / v, v, weights=100), v)
    registry.promote("policy", "v0")
    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(registry.current("policy"))
            except Exception as e:
                bad.append(repr(e))

    def promoter(v):
        for _ in range(3):
            registry.promote("policy", v, deep=False)

    rthreads = [threading.Thread(target=reader) for _ in range(2)]
    pthreads = [threading.Thread(target=promoter, args=(v,)) for v in versions[1:]]
    for t in rthreads + pthreads:
        t.start()
    for t in pthreads:
        t.join()
    stop.set()
    for t in rthreads:
        t.join()
    assert bad == []
    assert seen <= set(versions)
    final = registry.current("policy")
    assert final in versions[1:]
    assert len(registry.history("policy")) == 1 + 3 * 5  # every promotion recorded, none overwritten
    assert registry.rollback("policy", deep=False)["version"] in versions and registry.current("policy") != final


def test_killed_publisher_leaves_an_incomplete_version(registry, tmp_path):
    """SIGKILL the publishing process mid-upload: the version is never visible as complete."""
    src = make_model(tmp_path / "a", "a")
    (src / "z-later.bin").write_bytes(b"z" * 1000)
    started = tmp_path / "started"
    if isinstance(registry.store, LocalStore):
        store_expr = f"LocalStore({str(registry.store.root)!r})"
    else:
        cfg = registry.store.config
        store_expr = (f"S3Store({registry.store.bucket!r}, {registry.store.prefix!r}, S3Config("
                      f"endpoint={cfg.endpoint!r}, access_key={cfg.access_key!r}, secret_key={cfg.secret_key!r}))")
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        sys.path.insert(0, {str(ROOT)!r})
        from rstar import store as s
        from rstar.store import LocalStore, S3Store, S3Config
        from rstar.registry import ModelRegistry
        real = s._open_for_upload
        def slow(path):
            if path.name == "z-later.bin":  # files are uploaded in sorted order: the others are up
                pathlib.Path({str(started)!r}).write_text("1")
                time.sleep(60)
            return real(path)
        s._open_for_upload = slow
        ModelRegistry({store_expr}).publish("policy", {str(src)!r}, "v1")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, "publisher exited early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert registry.store.list("models/policy/v1/")  # some files made it...
    info = {i.version: i for i in registry.versions("policy")}
    assert not info["v1"].complete  # ...but the version is not complete
    with pytest.raises(IncompleteVersion):
        registry.promote("policy", "v1")
    with pytest.raises(IncompleteVersion):
        registry.fetch("policy", "v1")
    registry.publish("policy", src, "v1")  # a retry completes it
    registry.promote("policy", "v1")


def test_s3_server_stopped_mid_upload(private_s3_gateway, tmp_path, monkeypatch):
    gw = private_s3_gateway
    reg = ModelRegistry(gw.store(prefix="reg", part_size_mb=5, parallel_uploads=1), cache_dir=tmp_path / "cache")
    src = make_model(tmp_path / "a", "a")
    (src / "model.safetensors").write_bytes(os.urandom(12 << 20))
    real = store_mod._open_for_upload

    def stop_server_midway(path):
        f = real(path)
        if path.name != "model.safetensors":
            return f
        inner_read = f.read
        state = {"n": 0}

        def read(n=-1):
            if state["n"] > (6 << 20) and gw.proc is not None:
                gw.stop()
            data = inner_read(n)
            state["n"] += len(data)
            return data

        f.read = read
        return f

    monkeypatch.setattr(store_mod, "_open_for_upload", stop_server_midway)
    with pytest.raises(StoreUnavailable, match="unavailable"):
        reg.publish("policy", src, "v1")  # the writer reports the error
    monkeypatch.setattr(store_mod, "_open_for_upload", real)
    gw.start()  # the server comes back: the same client recovers
    assert not reg.store.exists("models/policy/v1/manifest.json")
    with pytest.raises((IncompleteVersion, VersionNotFound)):
        reg.promote("policy", "v1")
    reg.publish("policy", src, "v1")
    reg.promote("policy", "v1")
    assert reg.fetch("policy").joinpath("model.safetensors").stat().st_size == 12 << 20


def test_fetch_with_the_store_down_uses_the_verified_cache(private_s3_gateway, tmp_path):
    gw = private_s3_gateway
    reg = ModelRegistry(gw.store(prefix="reg"), cache_dir=tmp_path / "cache")
    reg.publish("policy", make_model(tmp_path / "a", "a"), "a")
    reg.publish("policy", make_model(tmp_path / "b", "b"), "b")
    path = reg.fetch("policy", "a")
    gw.stop()
    assert reg.fetch("policy", "a") == path
    with pytest.raises(StoreUnavailable):
        reg.fetch("policy", "b")  # never cached: a clear error
    gw.start()


def test_full_cache_disk_never_leaves_a_loadable_model(registry, tmp_path, monkeypatch):
    registry.publish("policy", make_model(tmp_path / "a", "a", weights=2 << 20), "a")
    small = tmp_path / "small"
    small.mkdir()
    mounted = mount_tmpfs(small)
    try:
        reg = ModelRegistry(registry.store, cache_dir=small)
        import shutil as shutil_mod
        if not mounted:
            monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(1 << 20, 0, 1 << 20))
        with pytest.raises(StoreFull, match="MB"):  # refused up front: not enough free space
            reg.fetch("policy", "a")
        # the space check passes but the disk fills while writing (another writer took the space)
        monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(1 << 40, 0, 1 << 40))
        if not mounted:
            real_open = open

            def enospc_open(path, mode="r", *a, **kw):
                if "w" in mode and str(small) in str(path) and str(path).endswith("model.safetensors"):
                    raise OSError(28, "No space left on device")
                return real_open(path, mode, *a, **kw)

            monkeypatch.setattr("builtins.open", enospc_open)
        with pytest.raises(StoreFull, match="no space left"):
            reg.fetch("policy", "a")
        assert [p.name for p in (small / "policy").iterdir()] == []  # no partial dir, no temp dir
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=True)


def test_register_base_version_is_idempotent(registry, tmp_path):
    src = make_model(tmp_path / "base", "base")
    m1 = register_base_version(registry, "policy", src, "base-smollm2-135m", {"source": "gguf"})
    assert registry.current("policy") == "base-smollm2-135m"
    assert m1.metadata == {"source": "gguf"}
    uploads = []
    real = registry.store.put_file
    registry.store.put_file = lambda k, p: (uploads.append(k), real(k, p))[1]  # type: ignore[method-assign]
    m2 = register_base_version(registry, "policy", src, "base-smollm2-135m", {"source": "gguf"})
    assert uploads == [] and m2.files == m1.files
    assert len(registry.history("policy")) == 1
    # a promoted newer version is left alone
    registry.publish("policy", make_model(tmp_path / "n", "new"), "v2")
    registry.promote("policy", "v2")
    register_base_version(registry, "policy", src, "base-smollm2-135m")
    assert registry.current("policy") == "v2"
    (src / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="different files"):
        register_base_version(registry, "policy", src, "base-smollm2-135m")


def test_register_base_version_without_promotion(registry, tmp_path):
    register_base_version(registry, "ppm", make_model(tmp_path / "b", "b"), "base", promote_if_unset=False)
    assert registry.current("ppm") is None and registry.versions("ppm")[0].complete


# --------------------------------------------------------------------------- CLI


def test_cli_models_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    url = f"file://{tmp_path}/store"
    run = lambda *a: cli_models.main(["models", *a, "--store", url])  # noqa: E731
    a, b = make_model(tmp_path / "a", "a"), make_model(tmp_path / "b", "b")
    assert run("publish", "policy", str(a), "--version", "v1", "--round", "0", "--metadata", '{"k": 1}') == 0
    assert run("publish", "policy", str(b), "--version", "v2", "--parent", "v1",
               "--metadata", '{"eval": {"gsm8k_dev100": {"greedy": 0.18, "maj@8": 0.25}}}') == 0
    assert run("promote", "policy", "v1") == 0
    assert run("promote", "policy", "v2", "--reason", "eval up") == 0
    capsys.readouterr()
    assert run("list") == 0   # every version of every name, with its eval results
    out = capsys.readouterr().out
    assert "policy\t* v2\tcomplete" in out and "gsm8k_dev100: greedy 18% maj@8 25%" in out
    assert run("list", "policy") == 0
    out = capsys.readouterr().out
    assert "* v2\tcomplete" in out and "  v1\tcomplete" in out
    assert run("show", "policy", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v2" and shown["parent"] == "v1" and shown["current"] is True
    assert run("verify", "policy", "v1") == 0
    assert run("rollback", "policy") == 0
    assert "v2 -> v1" in capsys.readouterr().out
    assert run("history", "policy", "--json") == 0
    assert [h["action"] for h in json.loads(capsys.readouterr().out)] == ["promote", "promote", "rollback"]
    assert run("fetch", "policy") == 0
    fetched = Path(capsys.readouterr().out.strip())
    assert fetched == tmp_path / "home" / "cache" / "models" / "policy" / "v1" and fetched.is_dir()
    # errors are one clear line and exit status 1
    assert run("promote", "policy", "nope") == 1
    assert "error: no version 'nope'" in capsys.readouterr().err
    assert run("rollback", "policy") == 1
    assert "no earlier promoted version" in capsys.readouterr().err


def test_cli_store_url_from_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RSTAR_STORE_URL", str(tmp_path / "envstore"))
    reg = ModelRegistry(LocalStore(tmp_path / "envstore"))
    reg.publish("ppm", make_model(tmp_path / "a", "a"), "p1")
    assert cli_models.main(["list"]) == 0
    assert "ppm\t  p1\tcomplete" in capsys.readouterr().out


def test_cli_add_parser_plugs_into_a_parent_cli(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="rstar")
    cli_models.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "list", "--store", str(tmp_path)])
    assert args.func(args) == 0


def test_delete_version_refuses_current_and_removes_manifest_first(registry, tmp_path):
    registry.publish("policy", make_model(tmp_path / "a", "a"), "a")
    registry.publish("policy", make_model(tmp_path / "b", "b"), "b")
    registry.promote("policy", "a")
    with pytest.raises(RegistryError, match="CURRENT"):
        registry.delete_version("policy", "a")
    deleted: list[str] = []
    real = registry.store.delete
    registry.store.delete = lambda k: (deleted.append(k), real(k))[1]  # type: ignore[method-assign]
    assert registry.delete_version("policy", "b") == 5
    assert deleted[0] == "models/policy/b/manifest.json"
    assert [i.version for i in registry.versions("policy")] == ["a"]
