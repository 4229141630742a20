"""gRPC clients of the policy, PPM and sandbox services, as the engine's protocols.

Each call gets a deadline (the client's call timeout, capped by the request's
remaining time), is retried with exponential backoff on UNAVAILABLE (all three
calls are idempotent: generation is seeded), and is cancelled as soon as the
request's `CallScope` stops, which frees the downstream work (a cancelled
Generate frees its vLLM slots). Model versions come back on the results
(`Versioned.model_version`).

Security (`ClientSecurity`): TLS with a CA bundle and, for mutual TLS, a client
certificate; a bearer token (scope `internal`, rstar.auth) on every call: call
credentials over TLS, metadata on plaintext. Without one given, a client sends
$RSTAR_INTERNAL_TOKEN, or to a loopback address the local stack's internal token
(`rstar up`), so the trainer's clients reach a local stack unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from rstar import auth
from rstar.server import MAX_MESSAGE_BYTES
from rstar.v1 import (common_pb2, policy_pb2, policy_pb2_grpc, ppm_pb2, ppm_pb2_grpc, sandbox_pb2,
                      sandbox_pb2_grpc)
from rstar.protocols import (CallScope, Cancelled, Candidate, DeadlineExceeded, ExecResult, GenerationItem,
                             SamplingParams, Versioned)

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class DownstreamError(Exception):
    """A downstream service failed a call (after retries); carries its status code."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{service} service: {code.name}: {details}")
        self.service = service
        self.code = code
        self.details = details


@dataclass(frozen=True)
class ClientSecurity:
    """How an internal client reaches its service: TLS material (PEM bytes) and a bearer token."""

    token: str | None = None
    tls: bool = False
    root_certs: bytes | None = None   # None with tls: the system's roots
    cert: bytes | None = None         # client certificate chain (mutual TLS)
    key: bytes | None = None

    @classmethod
    def from_files(cls, token_file: str = "", tls: bool = False, ca: str = "", cert: str = "",
                   key: str = "", address: str | None = None) -> "ClientSecurity":
        """From paths ('' = not given); no token file: `rstar.auth.internal_token(address)`."""
        if bool(cert) != bool(key):
            raise ValueError("a client certificate and its key go together")
        token = auth.read_token(token_file) if token_file else auth.internal_token(address)
        return cls(token, bool(tls or ca or cert), Path(ca).read_bytes() if ca else None,
                   Path(cert).read_bytes() if cert else None, Path(key).read_bytes() if key else None)


class _BearerMetadata(grpc.UnaryUnaryClientInterceptor):
    """`authorization: Bearer` on every call of a plaintext channel (call credentials need TLS)."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)


def make_channel(address: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """A channel to one service. `security` None: plaintext, with the default internal token."""
    security = security if security is not None else ClientSecurity(auth.internal_token(address))
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if security.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=security.root_certs, private_key=security.key,
                                             certificate_chain=security.cert)
        if security.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(security.token))
        return grpc.secure_channel(address, creds, options=options)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _BearerMetadata(security.token)) if security.token else channel


class _Client:
    service = ""

    def __init__(self, address: str, timeout: float = 300.0, retries: int = 4, backoff: float = 0.2,
                 channel: grpc.Channel | None = None, security: ClientSecurity | None = None):
        self.address = address
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff
        self.channel = channel or make_channel(address, security)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, scope: CallScope | None):
        scope = scope or CallScope()
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            scope.check()
            timeout = self.timeout
            remaining = scope.remaining()
            if remaining is not None:
                if remaining <= 0:
                    scope.check()
                timeout = max(0.001, min(timeout, remaining))
            future = method.future(request, timeout=timeout)
            unregister = scope.on_stop(future.cancel)
            try:
                return future.result()
            except grpc.FutureCancelledError:
                scope.check()
                raise Cancelled(f"{self.service} call cancelled") from None
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and scope.stopped:
                    scope.check()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and scope.remaining() is not None \
                        and scope.remaining() <= 0.01:
                    scope.stop("deadline")
                    raise DeadlineExceeded(f"deadline exceeded in the {self.service} call") from None
                if code in _RETRYABLE and attempt < self.retries:
                    log.warning("%s at %s: %s (attempt %d/%d), retrying in %.2fs", self.service, self.address,
                                code.name, attempt, self.retries, delay)
                    if scope.wait(delay):
                        scope.check()
                    delay *= 2
                    continue
                raise DownstreamError(self.service, code, e.details() or "") from None
            finally:
                unregister()
        raise AssertionError("unreachable")

    def info(self, timeout: float = 2.0) -> common_pb2.InfoResponse:
        return self._stub.Info(common_pb2.InfoRequest(), timeout=timeout)


class PolicyClient(_Client):
    service = "policy"

    def __init__(self, *a, stop: Sequence[str] = (), **kw):
        super().__init__(*a, **kw)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.stop = list(stop)

    def generate(self, items: Sequence[GenerationItem], params: SamplingParams, scope: CallScope | None = None):
        req = policy_pb2.GenerateRequest(
            items=[policy_pb2.GenerationItem(prefix=common_pb2.Prefix(question=it.question, steps=list(it.steps)),
                                             n=it.n, seed=it.seed) for it in items],
            sampling=policy_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                               max_tokens=params.max_tokens, stop=self.stop),
        )
        resp = self._call(self._stub.Generate, req, scope)
        results = [[Candidate(c.text, c.finish_reason, c.num_tokens) for c in r.candidates] for r in resp.results]
        return Versioned(results, resp.model_version, [r.prompt_tokens for r in resp.results])


class PPMClient(_Client):
    service = "ppm"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._stub = ppm_pb2_grpc.PPMServiceStub(self.channel)

    def score(self, prefixes: Sequence[tuple[str, Sequence[str]]], scope: CallScope | None = None):
        req = ppm_pb2.ScoreRequest(prefixes=[common_pb2.Prefix(question=q, steps=list(s)) for q, s in prefixes])
        resp = self._call(self._stub.Score, req, scope)
        return Versioned([float(x) for x in resp.scores], resp.model_version)


_FAILURES = {
    sandbox_pb2.OK: "ok", sandbox_pb2.ERROR: "error", sandbox_pb2.TIMEOUT: "timeout",
    sandbox_pb2.MEMORY: "memory", sandbox_pb2.KILLED: "killed", sandbox_pb2.OUTPUT_LIMIT: "output_limit",
}


def failure_name(result: sandbox_pb2.ExecutionResult) -> str:
    if result.failure == sandbox_pb2.FAILURE_KIND_UNSPECIFIED:
        return "ok" if result.exit_code == 0 else "error"
    return _FAILURES.get(result.failure, "error")


class SandboxClient(_Client):
    """Sends a batch's programs in one Execute call (chunks of `max_programs`, sent concurrently)."""

    service = "sandbox"

    def __init__(self, *a, wall_seconds: float = 0.0, max_programs: int = 256, **kw):
        super().__init__(*a, **kw)
        self._stub = sandbox_pb2_grpc.SandboxServiceStub(self.channel)
        self.limits = sandbox_pb2.Limits(wall_seconds=wall_seconds)
        self.max_programs = max_programs

    def execute(self, programs: Sequence[str], scope: CallScope | None = None):
        chunks = [programs[i:i + self.max_programs] for i in range(0, len(programs), self.max_programs)]
        if len(chunks) == 1:
            return self._execute_chunk(chunks[0], scope)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(lambda c: self._execute_chunk(c, scope), chunks))
        return [r for part in parts for r in part]

    def _execute_chunk(self, programs: Sequence[str], scope: CallScope | None):
        req = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code=p) for p in programs],
                                         limits=self.limits)
        resp = self._call(self._stub.Execute, req, scope)
        return [ExecResult(r.stdout, r.stderr, failure_name(r), r.duration_seconds) for r in resp.results]


def wait_ready(clients: Sequence[_Client], timeout: float = 2.0) -> tuple[bool, dict[str, str], str]:
    """Ask every service's Info: (all ready, {model name: version}, why not ready)."""
    versions: dict[str, str] = {}
    for c in clients:
        try:
            info = c.info(timeout=timeout)
        except grpc.RpcError as e:
            return False, versions, f"{c.service} at {c.address}: {e.code().name}"
        if not info.ready:
            return False, versions, f"{c.service} at {c.address}: not ready"
        for m in info.models:
            versions[m.name] = m.version
    return True, versions, ""

