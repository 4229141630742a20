"""PolicyService servicer: protobuf <-> the engine's `Policy` protocol, validation, deadlines.

It translates a `GenerateRequest` into `rstar.protocols` types (`GenerationItem`,
`SamplingParams`), runs it on the policy held in the model slot (whatever
implements `Policy`: the vLLM `PolicyEngine`, or a fake in tests) with a
`CallScope` carrying the RPC's deadline and cancellation, and translates the
`Versioned` candidates back. Each request runs on one model version from start
to end, even across a hot reload.

Not here: generation (`policy_svc.core`), model loading and reload
(`policy_svc.server`, `rstar.reload`).
"""

from __future__ import annotations

import grpc

from rstar import steps
from rstar.protocols import GenerationItem, SamplingParams
from rstar.reload import ModelSlot, call_model
from rstar.server import ServiceError, invalid
from rstar.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from policy_svc.config import PolicyConfig

MAX_TEXT = 256 * 1024


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig, slot: ModelSlot):
        self.config = config
        self.slot = slot

    def parse(self, request: policy_pb2.GenerateRequest) -> tuple[list[GenerationItem], SamplingParams]:
        """The request as protocol types; ServiceError(INVALID_ARGUMENT) when it is malformed."""
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
            items.append(GenerationItem(it.prefix.question, tuple(it.prefix.steps), n, int(it.seed)))
        sp = request.sampling
        if sp.temperature < 0 or sp.top_p < 0 or sp.top_p > 1 or sp.max_tokens < 0:
            raise invalid("sampling: temperature >= 0, 0 <= top_p <= 1, max_tokens >= 0 required")
        if sp.stop and set(sp.stop) != set(steps.GENERATION_STOPS):
            # one stop-string set for every policy: the step format's (rstar.steps.GENERATION_STOPS)
            raise invalid(f"sampling.stop: only the step markers {list(steps.GENERATION_STOPS)} are supported "
                          "(leave it empty)")
        params = SamplingParams(
            temperature=float(sp.temperature),
            top_p=float(sp.top_p) if sp.top_p > 0 else 1.0,
            max_tokens=int(sp.max_tokens) or cfg.default_max_tokens,
        )
        return items, params

    def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext):
        items, params = self.parse(request)
        result, version = call_model(self.slot, context, lambda model, scope: model.generate(items, params, scope=scope),
                                     "policy", "generating")
        if len(result) != len(items):
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the policy answered {len(result)} of {len(items)} items")
        prompt_tokens = list(getattr(result, "prompt_tokens", []) or [])
        resp = policy_pb2.GenerateResponse(model_version=version)
        for i, cands in enumerate(result):
            resp.results.add(
                prompt_tokens=prompt_tokens[i] if i < len(prompt_tokens) else 0,
                candidates=[policy_pb2.Candidate(text=c.text, finish_reason=c.finish_reason, num_tokens=c.num_tokens)
                            for c in cands],
            )
        return resp

    def Info(self, request, context):
        cur = self.slot.current
        core = cur.model if cur is not None else None
        models = [common_pb2.ModelVersion(name="policy", version=cur.version)] if cur is not None else []
        details = {"model_dir": str(getattr(core, "model_dir", "") or (cur.path if cur and cur.path else "")),
                   "few_shot": str(getattr(core, "few_shot", self.config.few_shot)),
                   "reload_mode": "beside" if self.slot.two_copies else "drain",
                   "cpu_threads_bind": str(getattr(core, "thread_binding", "") or ""),
                   "prompt_style": str(getattr(core, "prompt_style", ""))}
        return common_pb2.InfoResponse(service="policy", models=models, ready=self.slot.ready, details=details)
