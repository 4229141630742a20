"""gRPC clients of the policy, PPM and sandbox services, as the engine's protocols.

Each call gets a deadline (the client's call timeout, capped by the request's
remaining time) and is cancelled as soon as the request's `CallScope` stops,
which frees the downstream work (a cancelled Generate frees its vLLM slots).
Model versions come back on the results (`Versioned.model_version`).

Fault tolerance (`RetryPolicy`): calls go out with `wait_for_ready`, so a call
to a service that is down (restarting, rescheduled) waits for it to come back
within its deadline instead of failing fast; an answer of UNAVAILABLE (a model
still loading, a server shutting down) is retried with jittered exponential
backoff for at most `budget_s` seconds from the first failure (and never past
the request's deadline). All three calls are idempotent (generation is seeded).
The sandbox's back-pressure, RESOURCE_EXHAUSTED (its queue is full), is retried
the same way, and when it repeats the batch is split in halves, sent one after
the other, so smaller requests fit in the room the queue has. RESOURCE_EXHAUSTED
from the policy or PPM is not retried (it can also mean a message too large).

Channels (`make_channel`) send keepalive pings (a connection to a peer that
vanished without closing it, such as a failed node, is dropped within ~40 s
instead of holding calls until their deadline; idle connections stay open
through NAT and connection-tracking timeouts) and balance
calls `round_robin` over every address the target resolves to: with a headless
Kubernetes Service (`dns:///policy:50051`), every ready replica gets calls; they
reconnect within seconds of a restart (reconnect backoff at most 5 s).

Not here: hedged or parallel retries, client-side health checking of replicas
(a replica that is NOT_SERVING but reachable answers UNAVAILABLE, which is
retried, and round_robin moves on), circuit breaking. Waiting for an unreachable
service (`wait_for_ready`) is bounded by the call's deadline, not by the retry
budget: the budget bounds how long answered failures are retried.

Security (`ClientSecurity`): TLS with a CA bundle and, for mutual TLS, a client
certificate; a bearer token (scope `internal`, rstar.auth) on every call: call
credentials over TLS, metadata on plaintext. Without one given, a client sends
$RSTAR_INTERNAL_TOKEN, or to a loopback address the local stack's internal token
(`rstar up`), so the trainer's clients reach a local stack unchanged.
"""

from __future__ import annotations

import logging
import random
import time
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

# keepalive: ping an idle connection every 30 s and drop it when a ping goes unanswered for 10 s
# (the servers allow pings every 10 s: rstar.server.MIN_PING_INTERVAL_S)
KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
MAX_RECONNECT_BACKOFF_S = 5.0   # gRPC's default (120 s) would leave a restarted service unused for minutes
SPLIT_AFTER = 2                 # RESOURCE_EXHAUSTED answers in a row before a sandbox batch is split


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


def channel_options() -> list[tuple[str, object]]:
    """The options of every internal channel: message sizes, keepalive, reconnects, round_robin."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),   # keep pinging a connection with no call on it
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(MAX_RECONNECT_BACKOFF_S * 1000)),
            # re-resolve the name soon after a replica goes away, so its replacement is found
            ("grpc.dns_min_time_between_resolutions_ms", 5000)]


def make_channel(address: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """A channel to one service (`channel_options`). `security` None: plaintext, with the
    default internal token. `address` is a gRPC target: `host:port`, or `dns:///host:port`
    to balance over every address a headless Service name resolves to."""
    security = security if security is not None else ClientSecurity(auth.internal_token(address))
    options = channel_options()
    if security.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=security.root_certs, private_key=security.key,
                                             certificate_chain=security.cert)
        if security.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(security.token))
        return grpc.secure_channel(address, creds, options=options)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _BearerMetadata(security.token)) if security.token else channel


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed call is retried: at most `attempts` attempts (0 = no limit), for at most
    `budget_s` seconds from the first failure, waiting `backoff_s` (doubling, at most
    `max_backoff_s`, jittered to 50-100%) between attempts; always inside the request's deadline."""

    attempts: int = 4
    budget_s: float = 300.0
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0


class _Retrying:
    """The retry state of one call (shared by the halves of a split sandbox batch)."""

    def __init__(self, policy: RetryPolicy, scope: CallScope):
        self.policy = policy
        self.scope = scope
        self.end: float | None = None    # the budget's end, set by the first failure
        self.delay = policy.backoff_s

    def wait(self) -> bool:
        """After a retryable failure: wait the backoff and return True, or False when the budget
        or the request's deadline leaves no room for another attempt."""
        now = time.monotonic()
        if self.end is None:
            self.end = now + self.policy.budget_s
        wait = self.delay * random.uniform(0.5, 1.0)   # jitter: clients that failed together spread out
        limit = self.end
        remaining = self.scope.remaining()
        if remaining is not None:
            limit = min(limit, now + remaining - 0.05)
        if now + wait > limit:
            return False
        self.delay = min(self.delay * 2, self.policy.max_backoff_s)
        if self.scope.wait(wait):
            self.scope.check()
        return True


class _Split(Exception):
    """The sandbox keeps answering RESOURCE_EXHAUSTED: send the batch in smaller parts."""


class _Client:
    service = ""
    retry_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def __init__(self, address: str, timeout: float = 300.0, retries: int = 4, backoff: float = 0.2,
                 channel: grpc.Channel | None = None, security: ClientSecurity | None = None, *,
                 retry_budget_s: float = 300.0, max_backoff: float = 5.0, wait_for_ready: bool = True):
        """`retries`: attempts per call at most (0: as many as `retry_budget_s` allows);
        `backoff`: the first retry delay; `wait_for_ready`: a call to an unreachable service
        waits for it (within its deadline) instead of failing at once."""
        self.address = address
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.retry = RetryPolicy(self.retries, retry_budget_s, backoff, max(backoff, max_backoff))
        self.wait_for_ready = wait_for_ready
        self.channel = channel or make_channel(address, security)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, scope: CallScope | None, retrying: _Retrying | None = None,
              can_split: bool = False):
        scope = scope or CallScope()
        retrying = retrying or _Retrying(self.retry, scope)
        attempt, exhausted = 0, 0
        while True:
            attempt += 1
            scope.check()
            timeout = self.timeout
            remaining = scope.remaining()
            if remaining is not None:
                if remaining <= 0:
                    scope.check()
                timeout = max(0.001, min(timeout, remaining))
            future = method.future(request, timeout=timeout, wait_for_ready=self.wait_for_ready)
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
                exhausted = exhausted + 1 if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 0
                if can_split and exhausted >= SPLIT_AFTER:
                    raise _Split() from None
                if code in self.retry_codes and (self.retry.attempts == 0 or attempt < self.retry.attempts):
                    log.warning("%s at %s: %s (attempt %d), retrying: %s", self.service, self.address,
                                code.name, attempt, e.details())
                    if retrying.wait():
                        continue
                raise DownstreamError(self.service, code, e.details() or "") from None
            finally:
                unregister()

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
    """Sends a batch's programs in one Execute call (chunks of `max_programs`, sent concurrently).

    The sandbox's back-pressure (RESOURCE_EXHAUSTED: its queue cannot take the batch) is retried
    with backoff; after `SPLIT_AFTER` such answers in a row the batch is split in halves, sent
    one after the other (down to single programs), all within one retry budget."""

    service = "sandbox"
    retry_codes = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

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

    def _execute_chunk(self, programs: Sequence[str], scope: CallScope | None,
                       retrying: _Retrying | None = None):
        scope = scope or CallScope()
        retrying = retrying or _Retrying(self.retry, scope)
        req = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code=p) for p in programs],
                                         limits=self.limits)
        try:
            resp = self._call(self._stub.Execute, req, scope, retrying, can_split=len(programs) > 1)
        except _Split:
            half = (len(programs) + 1) // 2
            log.warning("sandbox at %s: queue full for %d programs, sending them as %d + %d", self.address,
                        len(programs), half, len(programs) - half)
            # no wait first: a half may fit in the room the queue has now; the halves share the
            # budget and the backoff, so a queue that stays full still ends the call in time
            return (self._execute_chunk(programs[:half], scope, retrying)
                    + self._execute_chunk(programs[half:], scope, retrying))
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

