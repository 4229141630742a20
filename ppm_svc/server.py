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
from rstar.reload import ModelSlot
from rstar.server import Service, create_grpc_server, serve, setup_logging
from rstar.v1 import ppm_pb2, ppm_pb2_grpc

from ppm_svc.config import PPMConfig
from ppm_svc.servicer import PPMServicer

log = logging.getLogger("ppm_svc")

SERVICE_NAME = ppm_pb2.DESCRIPTOR.services_by_name["PPMService"].full_name


def create_server(config: PPMConfig, core=None) -> Service:
    """Build the service (not started). `core`: a `Scorer` to serve instead of loading the model."""
    built: set[int] = set()  # scorers this service built (and so closes); an injected core is the caller's

    def close_scorer(scorer) -> None:
        if id(scorer) in built:
            built.discard(id(scorer))
            scorer.close()

    slot: ModelSlot = ModelSlot("ppm", "ppm", close=close_scorer, two_copies=config.reload_mode != "drain")
    servicer = PPMServicer(config, slot)

    def register(server):
        ppm_pb2_grpc.add_PPMServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    handle = create_grpc_server("ppm", register, config.host, config.port)
    slot.on_ready = handle.set_serving
    source = None

    def build(version: str, model_dir: Path):
        from rstar.ppm import PPMScorer

        scorer = PPMScorer(model_dir, version, config.head_seed, config.batch_size, config.max_length)
        built.add(id(scorer))
        return scorer

    def load_step() -> None:
        nonlocal source
        from rstar.modelsource import ModelSource

        source = ModelSource("ppm", config.model, config.model_version, config.store_url)
        model_dir, version = source.resolve()
        load = slot.loader(build)
        load(version, model_dir)
        source.watch(config.reload_interval, load)

    def release() -> None:
        if source is not None:
            source.stop()
        slot.close()

    if core is not None:
        slot.swap(core, config.model_version or getattr(core, "version", "") or "injected")
    return Service(handle, servicer, load_step=None if core is not None else load_step, release=release,
                   core_of=lambda: slot.current.model if slot.current is not None else None)


def main(argv=None) -> int:
    config = parse(PPMConfig, "PPM", argv, prog="python -m ppm_svc",
                   description="PPMService: process preference model scores")
    setup_logging(config.log_level)
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port)
    serve(create_server(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
