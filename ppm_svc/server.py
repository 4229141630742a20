"""`python -m ppm_svc`: the PPMService process."""

from __future__ import annotations

import logging
import sys

from rstar import metrics
from rstar.config import parse
from rstar.server import ServerHandle, create_grpc_server, serve, setup_logging
from rstar.v1 import ppm_pb2, ppm_pb2_grpc

from ppm_svc.config import PPMConfig
from ppm_svc.servicer import PPMServicer

log = logging.getLogger("ppm_svc")

SERVICE_NAME = ppm_pb2.DESCRIPTOR.services_by_name["PPMService"].full_name


def create_server(config: PPMConfig) -> tuple[ServerHandle, PPMServicer]:
    servicer = PPMServicer(config)

    def register(server):
        ppm_pb2_grpc.add_PPMServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return create_grpc_server("ppm", register, config.host, config.port), servicer


def main(argv=None) -> int:
    config = parse(PPMConfig, "PPM", argv, prog="python -m ppm_svc",
                   description="PPMService: process preference model scores")
    setup_logging(config.log_level)
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port)
    handle, servicer = create_server(config)
    source = None

    def load():
        nonlocal source
        from rstar.modelsource import ModelSource
        from rstar.ppm import PPMScorer

        source = ModelSource("ppm", config.model, config.model_version, config.store_url)
        model_dir, version = source.resolve()
        servicer.scorer = PPMScorer(model_dir, version, config.head_seed, config.batch_size, config.max_length)
        source.mark_serving(version)
        source.watch(config.reload_interval, servicer.scorer.swap)

    def stop():
        if source is not None:
            source.stop()

    serve(handle, load=load, on_stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
