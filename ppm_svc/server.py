"""`python -m ppm_svc`: the PPMService process.

`create_server(config, core=None)` returns the `rstar.server.Service` every
service returns. The scorer it serves sits in a `ModelSlot`: with `core` given
(anything implementing `rstar.protocols.Scorer`, e.g. a fake in tests) that one
is served at once; without, the load step resolves the model (`ModelSource`)
and builds an `rstar.ppm.PPMScorer`, and, with a registry, hot-reloads promoted
versions through the slot (`reload_mode`: beside or drain). Health is SERVING
exactly while the slot can serve.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rstar import metrics
from rstar.config import parse
from rstar.reload import model_service
from rstar.server import Service, serve, setup_logging
from rstar.v1 import ppm_pb2, ppm_pb2_grpc

from ppm_svc.config import PPMConfig
from ppm_svc.servicer import PPMServicer

log = logging.getLogger("ppm_svc")

SERVICE_NAME = ppm_pb2.DESCRIPTOR.services_by_name["PPMService"].full_name


def create_server(config: PPMConfig, core=None) -> Service:
    """Build the service (not started). `core`: a `Scorer` to serve instead of loading the model."""

    def build(version: str, model_dir: Path):
        from rstar.ppm import PPMScorer

        return PPMScorer(model_dir, version, config.head_seed, config.batch_size, config.max_length)

    return model_service("ppm", config, lambda slot: PPMServicer(config, slot),
                         ppm_pb2_grpc.add_PPMServiceServicer_to_server, SERVICE_NAME, build, core,
                         lambda: config.reload_mode != "drain")


def main(argv=None) -> int:
    config = parse(PPMConfig, "PPM", argv, prog="python -m ppm_svc",
                   description="PPMService: process preference model scores")
    setup_logging(config.log_level)
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port, config.metrics_host)
    serve(create_server(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
