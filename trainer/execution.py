"""Program execution for the trainer: the sandbox in-process, or the sandbox service.

Both implement the search engine's `Executor` protocol (`execute(programs) ->
[ExecResult]`), so bootstrap verification, evaluation and in-process synthesis
run step programs exactly as the search service does.
"""

from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)


class LocalSandbox:
    """`rstar.sandbox.pool.Sandbox` (fork-server warm pool, rlimits, seccomp...) started in this process."""

    def __init__(self, wall_seconds: float = 5.0, workers: int = 2):
        from rstar.sandbox.config import SandboxConfig
        from rstar.sandbox.pool import Sandbox

        self._sb = Sandbox(SandboxConfig(pool_size=workers, max_concurrent=workers, max_queue=4096,
                                         max_programs=4096, wall_seconds=wall_seconds))
        self._sb.start(timeout=120)

    def execute(self, programs: Sequence[str], scope=None):
        from rstar.protocols import ExecResult

        out = []
        for b in range(0, len(programs), 1024):
            for r in self._sb.execute(list(programs[b:b + 1024])):
                out.append(ExecResult(stdout=r.stdout, stderr=r.stderr, failure=r.failure,
                                      duration=r.duration_seconds))
        return out

    def close(self) -> None:
        self._sb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteSandbox:
    """The sandbox service over gRPC (search_svc's client: deadlines, retries)."""

    def __init__(self, address: str, timeout: float = 120.0):
        from rstar.clients import SandboxClient

        self._client = SandboxClient(address, timeout=timeout)

    def execute(self, programs: Sequence[str], scope=None):
        return self._client.execute(programs, scope)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(address: str = "", wall_seconds: float = 5.0):
    """The sandbox service at `address`, or (empty) an in-process sandbox."""
    return RemoteSandbox(address) if address else LocalSandbox(wall_seconds=wall_seconds)
