"""PolicyService servicer: protobuf <-> PolicyEngine, validation, deadlines."""

from __future__ import annotations

import grpc

from rstar import steps
from rstar.server import ServiceError, invalid, unavailable
from rstar.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from policy_svc.config import PolicyConfig
from policy_svc.core import Item, Sampling

MAX_TEXT = 256 * 1024


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig):
        self.config = config
        self.engine = None  # set once the model is loaded

    def _engine(self):
        if self.engine is None:
            raise unavailable("policy model is loading")
        return self.engine

    def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext):
        engine = self._engine()
        cfg = self.config
        if not request.items:
            raise invalid("GenerateRequest.items is empty")
        if len(request.items) > cfg.max_items:
            raise invalid(f"{len(request.items)} items exceed the limit of {cfg.max_items}")
        items = []
        for i, it in enumerate(request.items):
            if not it.prefix.question.strip():
                raise invalid(f"items[{i}].prefix.question is empty")
            size = len(it.prefix.question) + sum(len(s) for s in it.prefix.steps)
            if size > MAX_TEXT:
                raise invalid(f"items[{i}] prefix is {size} characters (limit {MAX_TEXT})")
            n = it.n or 1
            if n < 0 or n > cfg.max_candidates:
                raise invalid(f"items[{i}].n={it.n} outside 1..{cfg.max_candidates}")
            items.append(Item(it.prefix.question, list(it.prefix.steps), n, int(it.seed)))
        sp = request.sampling
        if sp.temperature < 0 or sp.top_p < 0 or sp.top_p > 1 or sp.max_tokens < 0:
            raise invalid("sampling: temperature >= 0, 0 <= top_p <= 1, max_tokens >= 0 required")
        sampling = Sampling(
            temperature=float(sp.temperature),
            top_p=float(sp.top_p) if sp.top_p > 0 else 1.0,
            max_tokens=int(sp.max_tokens) or cfg.default_max_tokens,
            stop=tuple(sp.stop) or steps.GENERATION_STOPS,
        )
        timeout = context.time_remaining()  # None or huge without a client deadline
        if timeout is not None and timeout > 1e6:
            timeout = None
        try:
            results, version = engine.generate(items, sampling, timeout=timeout)
        except TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired while generating") from None
        resp = policy_pb2.GenerateResponse(model_version=version)
        for r in results:
            resp.results.add(
                prompt_tokens=r.prompt_tokens,
                candidates=[policy_pb2.Candidate(text=c.text, finish_reason=c.finish_reason, num_tokens=c.num_tokens)
                            for c in r.candidates],
            )
        return resp

    def Info(self, request, context):
        engine = self.engine
        models = [common_pb2.ModelVersion(name="policy", version=engine.version)] if engine else []
        details = {"model_dir": engine.model_dir if engine else "",
                   "few_shot": str(engine.few_shot if engine else self.config.few_shot)}
        return common_pb2.InfoResponse(service="policy", models=models, ready=engine is not None, details=details)
