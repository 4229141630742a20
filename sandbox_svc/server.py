"""`python -m sandbox_svc`: the SandboxService process."""

from __future__ import annotations

import logging
import sys

from rstar import metrics
from rstar.config import parse
from rstar.server import ServerHandle, create_grpc_server, serve, setup_logging
from rstar.v1 import sandbox_pb2, sandbox_pb2_grpc

from rstar.sandbox.config import SandboxConfig
from rstar.sandbox.pool import Sandbox, SandboxError
from sandbox_svc.servicer import SandboxServicer

log = logging.getLogger("sandbox_svc")

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name


def create_server(config: SandboxConfig) -> tuple[ServerHandle, Sandbox]:
    """Build the gRPC server and its (not yet started) sandbox; health follows the pool's readiness."""
    holder: list[ServerHandle] = []
    sandbox = Sandbox(config, on_ready_change=lambda ready: holder and holder[0].set_serving(ready))

    def register(server):
        sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(SandboxServicer(sandbox), server)
        return [SERVICE_NAME]

    # each Execute thread mostly waits; allow the queue to be reached by many callers
    handle = create_grpc_server("sandbox", register, config.host, config.port,
                                max_workers=max(16, 4 * config.max_concurrent))
    holder.append(handle)
    return handle, sandbox


def main(argv=None) -> int:
    config = parse(SandboxConfig, "SANDBOX", argv, prog="python -m sandbox_svc",
                   description="SandboxService: runs untrusted Python programs, isolated and limited")
    setup_logging(config.log_level)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port)
    handle, sandbox = create_server(config)
    try:
        serve(handle, load=sandbox.start, on_stop=sandbox.close)
    except SandboxError as e:
        log.error("sandbox service cannot start: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
