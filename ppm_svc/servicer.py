"""PPMService servicer: protobuf <-> PPMScorer, validation."""

from __future__ import annotations

from rstar.server import invalid, unavailable
from rstar.v1 import common_pb2, ppm_pb2, ppm_pb2_grpc

from ppm_svc.config import PPMConfig

MAX_TEXT = 256 * 1024


class PPMServicer(ppm_pb2_grpc.PPMServiceServicer):
    def __init__(self, config: PPMConfig):
        self.config = config
        self.scorer = None

    def Score(self, request: ppm_pb2.ScoreRequest, context):
        scorer = self.scorer
        if scorer is None:
            raise unavailable("PPM model is loading")
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
            prefixes.append((p.question, list(p.steps)))
        scores, version = scorer.score(prefixes)
        return ppm_pb2.ScoreResponse(scores=scores, model_version=version)

    def Info(self, request, context):
        s = self.scorer
        models = [common_pb2.ModelVersion(name="ppm", version=s.version)] if s else []
        return common_pb2.InfoResponse(service="ppm", models=models, ready=s is not None,
                                       details={"model_dir": s.model_dir if s else ""})
