"""The object-store interface, run against both backends: a local directory and a real
S3 server (the JuiceFS gateway, started by the test), plus the S3 fault cases."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rstar import store as store_mod
from rstar.store import (LocalStore, NotFound, ObjectStore, S3Config, S3Store, StoreError, StoreFull,
                         StoreUnavailable, copy_object, open_store)
from s3_gateway import mount_tmpfs, private_s3_gateway, s3_gateway  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_gateway").store(prefix="pre/fix", part_size_mb=5)


def test_put_get_roundtrip_and_overwrite(store):
    store.put("a/b.txt", b"hello")
    assert store.get("a/b.txt") == b"hello"
    store.put("a/b.txt", b"bye")
    assert store.get("a/b.txt") == b"bye"
    store.put("empty", b"")
    assert store.get("empty") == b""
    blob = bytes(range(256)) * 100
    store.put("bin/blob", blob)
    assert store.get("bin/blob") == blob


def test_missing_key_raises_notfound(store):
    with pytest.raises(NotFound):
        store.get("nope/x")
    with pytest.raises(NotFound):
        store.stat("nope/x")
    with pytest.raises(NotFound):
        with store.open_read("nope/x"):
            pass
    assert not store.exists("nope/x")
    assert isinstance(NotFound("k"), KeyError)


def test_exists_stat_delete(store):
    store.put("d/obj", b"12345")
    assert store.exists("d/obj")
    info = store.stat("d/obj")
    assert info.key == "d/obj" and info.size == 5 and info.mtime > 0
    store.delete("d/obj")
    assert not store.exists("d/obj")
    store.delete("d/obj")  # deleting a missing key is not an error
    assert store.list("d/") == []


def test_list_is_a_sorted_string_prefix_match(store):
    for k in ["r/b/2", "r/a/1", "r/ab", "q/x", "r/a/3"]:
        store.put(k, k.encode())
    assert store.list("r/") == ["r/a/1", "r/a/3", "r/ab", "r/b/2"]
    assert store.list("r/a") == ["r/a/1", "r/a/3", "r/ab"]
    assert store.list("r/a/") == ["r/a/1", "r/a/3"]
    assert store.list("zzz/") == []
    assert store.list("") == ["q/x", "r/a/1", "r/a/3", "r/ab", "r/b/2"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/."])
def test_invalid_keys_are_rejected(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_put_file_get_file_stream_a_multipart_object(store, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(11 * (1 << 20) + 123)  # > 2 parts of 5 MiB on S3: a multipart upload
    src.write_bytes(data)
    store.put_file("ckpt/model.safetensors", src)
    assert store.stat("ckpt/model.safetensors").size == len(data)
    dest = tmp_path / "out" / "model.safetensors"
    assert store.get_file("ckpt/model.safetensors", dest) == len(data)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    with store.open_read("ckpt/model.safetensors") as f:  # streaming, in pieces
        assert f.read(10) == data[:10]
        assert f.read(5) == data[10:15]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


def test_get_file_of_missing_key_creates_nothing(store, tmp_path):
    dest = tmp_path / "dl" / "x"
    with pytest.raises(NotFound):
        store.get_file("missing", dest)
    assert not dest.exists()


def test_readers_see_whole_objects_while_a_writer_overwrites(store):
    versions = [bytes([i]) * 300_000 for i in range(4)]
    store.put("hot", versions[0])
    stop = threading.Event()
    bad: list[str] = []

    def reader():
        while not stop.is_set():
            data = store.get("hot")
            if data not in versions:
                bad.append(f"torn object of {len(data)} bytes")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(12):
        store.put("hot", versions[i % 4])
    stop.set()
    for t in threads:
        t.join()
    assert bad == []


def test_copy_between_backends(s3_gateway, tmp_path):
    local = LocalStore(tmp_path / "l")
    s3 = s3_gateway.store()
    local.put("p/x.jsonl", b'{"a": 1}\n')
    copy_object(local, s3, "p/x.jsonl")
    assert s3.get("p/x.jsonl") == b'{"a": 1}\n'


# --------------------------------------------------------------------------- URLs


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RSTAR_STORE_URL", raising=False)
    assert open_store().root == tmp_path / "home" / "store"
    assert open_store(f"file://{tmp_path}/x").root == tmp_path / "x"
    assert open_store(str(tmp_path / "y")).root == tmp_path / "y"
    monkeypatch.setenv("RSTAR_STORE_URL", f"file://{tmp_path}/z")
    assert open_store().root == tmp_path / "z"
    monkeypatch.setenv("RSTAR_S3_ENDPOINT", "https://minio.example:9000")
    monkeypatch.setenv("RSTAR_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("RSTAR_S3_SECRET_KEY", "sk")
    s3 = open_store("s3://rstar/dev/run1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint, s3.secure) == ("rstar", "dev/run1", "minio.example:9000", True)
    assert s3.url == "s3://rstar/dev/run1"
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3://")
    with pytest.raises(ValueError, match="unsupported"):
        open_store("gs://b/p")


def test_s3_config_validation():
    with pytest.raises(ValueError, match="at least 5"):
        S3Config(part_size_mb=1).validate()


def test_prefixes_isolate_stores_in_one_bucket(s3_gateway):
    a = s3_gateway.store(prefix="team-a")
    b = s3_gateway.store(prefix="team-b", bucket=a.bucket)
    a.put("k", b"A")
    b.put("k", b"B")
    assert a.get("k") == b"A" and b.get("k") == b"B"
    assert a.list() == ["k"] and b.list() == ["k"]


def test_missing_bucket_reads_as_empty_and_is_created_on_write(s3_gateway):
    s = s3_gateway.store()
    assert s.list() == []
    assert not s.exists("x")
    s.put("x", b"1")
    assert s.get("x") == b"1"


def test_missing_bucket_without_create_is_a_clear_error(s3_gateway):
    s = s3_gateway.store(create_bucket=False)
    with pytest.raises(StoreError, match="does not exist"):
        s.put("x", b"1")


def test_wrong_credentials_are_a_clear_error_not_a_retry_loop(s3_gateway):
    s = s3_gateway.store(secret_key="wrong-secret-key")
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        s.put("x", b"1")
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- S3 faults


def test_server_down_is_a_clear_error(tmp_path):
    from s3_gateway import free_port

    s = S3Store("bkt", "", S3Config(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                                    retries=3, backoff_s=0.05, connect_timeout_s=1))
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"S3 server at http://127\.0\.0\.1:\d+ unavailable .*3 attempts"):
        s.get("x")
    with pytest.raises(StoreUnavailable):
        s.put("x", b"1")
    with pytest.raises(StoreUnavailable):
        s.list("")
    assert time.monotonic() - t0 < 10


def test_client_recovers_after_server_restart(private_s3_gateway):
    gw = private_s3_gateway
    s = gw.store()
    s.put("k", b"before")
    gw.stop()
    with pytest.raises(StoreUnavailable):
        s.get("k")
    gw.start()
    assert s.get("k") == b"before"  # same client object, data survived the restart
    s.put("k2", b"after")
    assert s.list() == ["k", "k2"]


def test_retries_ride_out_a_short_outage(private_s3_gateway):
    gw = private_s3_gateway
    s = gw.store(retries=8, backoff_s=0.2)
    s.put("k", b"v")
    gw.stop()
    restarter = threading.Timer(0.5, gw.start)
    restarter.start()
    try:
        assert s.get("k") == b"v"  # retried with backoff until the server was back
    finally:
        restarter.join()


class _KillAfter:
    """A file reader that stops the S3 server after `limit` bytes have been read."""

    def __init__(self, path: Path, gw, limit: int):
        self.f, self.gw, self.limit, self.read_bytes = open(path, "rb"), gw, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.read_bytes >= self.limit and self.gw.proc is not None:
            self.gw.stop()
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def test_server_stopped_mid_upload_leaves_no_object(private_s3_gateway, tmp_path, monkeypatch):
    gw = private_s3_gateway
    s = gw.store(part_size_mb=5, parallel_uploads=1)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(16 << 20))
    monkeypatch.setattr(store_mod, "_open_for_upload", lambda p: _KillAfter(p, gw, 6 << 20))
    with pytest.raises(StoreUnavailable):
        s.put_file("ckpt/big.bin", src)
    gw.start()
    assert not s.exists("ckpt/big.bin")
    assert s.list("ckpt/") == []


def test_local_put_leaves_nothing_when_the_disk_fills(tmp_path, monkeypatch):
    """Real ENOSPC on a 1 MiB tmpfs when we may mount one; otherwise a simulated one."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = mount_tmpfs(root)
    try:
        s = LocalStore(root)
        s.put("small", b"ok")
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(2 << 20))
        if not mounted:  # simulate: the kernel reports ENOSPC when the data is flushed
            def full(fd):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(store_mod.os, "fsync", full)
        with pytest.raises(StoreFull, match="no space"):
            s.put_file("big", big)
        with pytest.raises(StoreFull):
            s.put("big2", big.read_bytes())
        assert s.list() == ["small"]
        assert [p.name for p in root.iterdir()] == ["small"]  # no temp files left behind
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)
