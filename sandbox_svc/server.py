"""`python -m sandbox_svc`: the SandboxService process.

`create_server(config, core=None)` returns the `rstar.server.Service` every
service returns; the core is the warm worker pool (`rstar.sandbox.pool.Sandbox`).
Without `core` the service builds its own pool and starts it in the load step
(and closes it on shutdown); a given pool is served as it is (its owner starts
and closes it). Health follows the pool's readiness.
"""

from __future__ import annotations

import logging
import sys

from rstar import metrics
from rstar.config import parse
from rstar.sandbox.config import SandboxConfig
from rstar.sandbox.pool import Sandbox, SandboxError
from rstar.server import ServerSecurity, Service, create_grpc_server, serve, setup_logging
from rstar.v1 import sandbox_pb2, sandbox_pb2_grpc

from sandbox_svc.servicer import SandboxServicer

log = logging.getLogger("sandbox_svc")

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name


def create_server(config: SandboxConfig, core: Sandbox | None = None) -> Service:
    """Build the service (not started). `core`: a pool to serve instead of building one."""
    sandbox = core if core is not None else Sandbox(config)
    servicer = SandboxServicer(sandbox)

    def register(server):
        sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    # each Execute thread mostly waits; allow the queue to be reached by many callers
    handle = create_grpc_server("sandbox", register, config.host, config.port,
                                max_workers=max(16, 4 * config.max_concurrent),
                                reflection=config.reflection, security=ServerSecurity.from_config(config))
    previous = sandbox.on_ready_change

    def on_ready_change(ready: bool) -> None:
        if previous is not None:
            previous(ready)
        handle.set_serving(ready)

    sandbox.on_ready_change = on_ready_change
    handle.set_serving(sandbox.state.ready)
    owned = core is None
    return Service(handle, servicer, load_step=sandbox.start if owned else None,
                   release=sandbox.close if owned else None, core_of=lambda: sandbox)


def main(argv=None) -> int:
    config = parse(SandboxConfig, "SANDBOX", argv, prog="python -m sandbox_svc",
                   description="SandboxService: runs untrusted Python programs, isolated and limited")
    setup_logging(config.log_level)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port, config.metrics_host)
    try:
        serve(create_server(config))
    except SandboxError as e:
        log.error("sandbox service cannot start: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
