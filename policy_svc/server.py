"""`python -m policy_svc`: the PolicyService process."""

from __future__ import annotations

import logging
import sys

from rstar import metrics
from rstar.config import parse
from rstar.server import ServerHandle, create_grpc_server, serve, setup_logging
from rstar.v1 import policy_pb2, policy_pb2_grpc

from policy_svc.config import PolicyConfig
from policy_svc.servicer import PolicyServicer

log = logging.getLogger("policy_svc")

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def create_server(config: PolicyConfig) -> tuple[ServerHandle, PolicyServicer]:
    servicer = PolicyServicer(config)

    def register(server):
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return create_grpc_server("policy", register, config.host, config.port), servicer


def main(argv=None) -> int:
    config = parse(PolicyConfig, "POLICY", argv, prog="python -m policy_svc",
                   description="PolicyService: candidate next steps from vLLM")
    setup_logging(config.log_level)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port)
    handle, servicer = create_server(config)
    source = None

    def load():
        nonlocal source
        from rstar.modelsource import ModelSource
        from policy_svc.core import PolicyEngine

        source = ModelSource("policy", config.model, config.model_version, config.store_url)
        model_dir, version = source.resolve()
        servicer.engine = PolicyEngine(
            model_dir, version, few_shot=config.few_shot, max_model_len=config.max_model_len,
            kv_cache_gib=config.kv_cache_gib, gpu_memory_utilization=config.gpu_memory_utilization,
            dtype=config.dtype, enforce_eager=config.enforce_eager, max_batch_sequences=config.max_batch_sequences,
            chunked_prefill=config.chunked_prefill, max_batched_tokens=config.max_batched_tokens,
        )
        servicer.engine.on_fatal = _fatal
        source.mark_serving(version)
        source.watch(config.reload_interval, servicer.engine.swap)

    def stop():
        if source is not None:
            source.stop()
        if servicer.engine is not None:
            servicer.engine.close()

    serve(handle, load=load, on_stop=stop)
    return 0


def _fatal(reason: str) -> None:
    """The engine is gone: shut down (health NOT_SERVING, drain) so a supervisor restarts us."""
    import os
    import signal

    log.critical("%s; shutting down", reason)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
