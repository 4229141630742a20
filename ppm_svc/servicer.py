"""PPMService servicer: protobuf <-> the engine's `Scorer` protocol, validation, deadlines.

It scores a `ScoreRequest`'s prefixes with the scorer held in the model slot
(whatever implements `Scorer`: `rstar.ppm.PPMScorer`, or a fake in tests), with
a `CallScope` carrying the RPC's deadline and cancellation, and returns the
scores with the model version that produced them. Each request runs on one
version from start to end, even across a hot reload.

Not here: scoring (`rstar.ppm`), model loading and reload (`ppm_svc.server`,
`rstar.reload`).
"""

from __future__ import annotations

import grpc

from rstar.reload import ModelSlot, call_model
from rstar.server import ServiceError, invalid
from rstar.v1 import common_pb2, ppm_pb2, ppm_pb2_grpc

from ppm_svc.config import PPMConfig

MAX_TEXT = 256 * 1024


class PPMServicer(ppm_pb2_grpc.PPMServiceServicer):
    def __init__(self, config: PPMConfig, slot: ModelSlot):
        self.config = config
        self.slot = slot

    def parse(self, request: ppm_pb2.ScoreRequest) -> list[tuple[str, tuple[str, ...]]]:
        """The request's prefixes; ServiceError(INVALID_ARGUMENT) when it is malformed."""
        if not request.prefixes:
            raise invalid("ScoreRequest.prefixes is empty")
        if len(request.prefixes) > self.config.max_prefixes:
            raise invalid(f"{len(request.prefixes)} prefixes exceed the limit of {self.config.max_prefixes}")
        prefixes = []
        for i, p in enumerate(request.prefixes):
            if not p.question.strip():
                raise invalid(f"prefixes[{i}].question is empty")
            size = len(p.question) + sum(len(s) for s in p.steps)
            if size > MAX_TEXT:
                raise invalid(f"prefixes[{i}] is {size} characters (limit {MAX_TEXT})")
            prefixes.append((p.question, tuple(p.steps)))
        return prefixes

    def Score(self, request: ppm_pb2.ScoreRequest, context):
        prefixes = self.parse(request)
        scores, version = call_model(self.slot, context, lambda model, scope: model.score(prefixes, scope=scope),
                                     "PPM", "scoring")
        if len(scores) != len(prefixes):
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the scorer answered {len(scores)} of {len(prefixes)}")
        return ppm_pb2.ScoreResponse(scores=[float(s) for s in scores], model_version=version)

    def Info(self, request, context):
        cur = self.slot.current
        core = cur.model if cur is not None else None
        models = [common_pb2.ModelVersion(name="ppm", version=cur.version)] if cur is not None else []
        details = {"model_dir": str(getattr(core, "model_dir", "") or (cur.path if cur and cur.path else "")),
                   "reload_mode": "beside" if self.slot.two_copies else "drain"}
        return common_pb2.InfoResponse(service="ppm", models=models, ready=self.slot.ready, details=details)
