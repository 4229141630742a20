"""SandboxService servicer: protobuf <-> `Sandbox`, validation, deadlines, error codes.

Not here: running programs (`rstar.sandbox.pool`), the server and its health (`sandbox_svc.server`).
"""

from __future__ import annotations

import threading

import grpc

from rstar.server import ServiceError, exhausted, unavailable
from rstar.v1 import common_pb2, sandbox_pb2, sandbox_pb2_grpc

from rstar.sandbox.pool import QueueFull, Sandbox, SandboxUnavailable

FAILURE_TO_PROTO = {
    "ok": sandbox_pb2.OK,
    "error": sandbox_pb2.ERROR,
    "timeout": sandbox_pb2.TIMEOUT,
    "memory": sandbox_pb2.MEMORY,
    "killed": sandbox_pb2.KILLED,
    "output_limit": sandbox_pb2.OUTPUT_LIMIT,
}


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox

    def Execute(self, request: sandbox_pb2.ExecuteRequest, context: grpc.ServicerContext):
        lim = request.limits
        limits = self.sandbox.resolve_limits(lim.wall_seconds, lim.memory_bytes, lim.output_bytes)  # ValueError
        programs = [p.code for p in request.programs]
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        try:
            results = self.sandbox.execute(programs, limits, timeout=context.time_remaining(), cancelled=cancelled)
        except QueueFull as e:
            raise exhausted(str(e)) from None
        except SandboxUnavailable as e:
            raise unavailable(str(e)) from None
        except TimeoutError as e:
            code = grpc.StatusCode.CANCELLED if cancelled.is_set() else grpc.StatusCode.DEADLINE_EXCEEDED
            raise ServiceError(code, str(e)) from None
        return sandbox_pb2.ExecuteResponse(results=[
            sandbox_pb2.ExecutionResult(
                stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code, failure=FAILURE_TO_PROTO[r.failure],
                duration_seconds=r.duration_seconds, truncated=r.truncated,
            )
            for r in results
        ])

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext):
        return common_pb2.InfoResponse(service="sandbox", ready=self.sandbox.state.ready,
                                       details=self.sandbox.info())
