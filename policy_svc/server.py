"""`python -m policy_svc`: the PolicyService process.

`create_server(config, core=None)` returns the `rstar.server.Service` every
service returns. The policy it serves sits in a `ModelSlot`: with `core` given
(anything implementing `rstar.protocols.Policy`, e.g. a fake in tests) that one
is served at once; without, the load step resolves the model (`ModelSource`:
a directory, the embedded default, or the registry's CURRENT), builds a vLLM
`PolicyEngine` and, with a registry, hot-reloads promoted versions through the
slot (`reload_mode`: beside or drain). Health is SERVING exactly while the slot
can serve.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from rstar import metrics
from rstar.config import parse
from rstar.reload import model_service
from rstar.server import Service, serve, setup_logging
from rstar.v1 import policy_pb2, policy_pb2_grpc

from policy_svc.config import PolicyConfig
from policy_svc.servicer import PolicyServicer

log = logging.getLogger("policy_svc")

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def create_server(config: PolicyConfig, core=None, on_fatal: Callable[[str], None] | None = None) -> Service:
    """Build the service (not started). `core`: a `Policy` to serve instead of loading the model;
    `on_fatal`: told when a loaded engine dies for good (the process should exit)."""

    def build(version: str, model_dir: Path):
        from policy_svc.core import PolicyEngine

        engine = PolicyEngine(
            model_dir, version, few_shot=config.few_shot, max_model_len=config.max_model_len,
            kv_cache_gib=config.kv_cache_gib, gpu_memory_utilization=config.gpu_memory_utilization,
            dtype=config.dtype, enforce_eager=config.enforce_eager, max_batch_sequences=config.max_batch_sequences,
            chunked_prefill=config.chunked_prefill, max_batched_tokens=config.max_batched_tokens,
            cpu_threads=config.cpu_threads,
        )
        engine.on_fatal = on_fatal
        return engine

    def two_copies() -> bool:
        from policy_svc.core import has_gpu

        return config.reload_mode == "beside" or (config.reload_mode == "auto" and not has_gpu())

    return model_service("policy", config, lambda slot: PolicyServicer(config, slot),
                         policy_pb2_grpc.add_PolicyServiceServicer_to_server, SERVICE_NAME, build, core, two_copies)


def main(argv=None) -> int:
    config = parse(PolicyConfig, "POLICY", argv, prog="python -m policy_svc",
                   description="PolicyService: candidate next steps from vLLM")
    setup_logging(config.log_level)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port, config.metrics_host)
    serve(create_server(config, on_fatal=_fatal))
    return 0


def _fatal(reason: str) -> None:
    """The engine is gone: shut down (health NOT_SERVING, drain) so a supervisor restarts us."""
    import os
    import signal

    log.critical("%s; shutting down", reason)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
