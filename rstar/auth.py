"""Who may call what: bearer tokens with scopes, checked by a server interceptor.

A token file lists the callers of a deployment (a file on disk, or a Kubernetes Secret
mounted as one), several per deployment so tokens can be rotated one at a time:

    version: 1
    tokens:
      - name: alice                 # who it is (logs; never the token itself)
        sha256: 3a7bd3e2...         # sha256 hex of the token (or `token: <the token>`)
        scopes: [solve, synthesize]
      - name: search
        sha256: ...
        scopes: [internal]

`AuthInterceptor` reads `authorization: Bearer <token>` from each call's metadata, hashes
it and compares the hash with every entry's in constant time: no or an unknown token is
UNAUTHENTICATED, a known token without the method's scope PERMISSION_DENIED (`METHOD_SCOPES`:
Solve/SolveStream need `solve`, Synthesize `synthesize` (with or without `store`), the
internal services' work methods `internal`, Info any valid token; `admin` holds every
scope; a method the table does not know needs `admin`, so a new RPC is closed until it is
listed). gRPC health and reflection are exempt: kubelet probes and `grpcurl list` carry
no token. The file is re-read when it changes (a rotated Secret), checked at most once a
second; a file that no longer parses keeps the previous table and logs an error.

Local stacks (`rstar up`): `ensure_local_tokens` creates `$RSTAR_HOME/auth/` on first start,
like a notebook server's token: `tokens.yaml` (hashes only, what the services read),
`user.token` (scopes solve, synthesize, admin: what the CLI and `SearchClient` send) and
`internal.token` (scope internal: what search sends to policy, PPM and sandbox), all
readable by the owner only. `user_token()` and `internal_token()` find them (the
environment variables RSTAR_TOKEN / RSTAR_INTERNAL_TOKEN win).

The handler runs with its caller at hand: `current_caller()` is the `Caller` whose token
the interceptor accepted (None without a token file, or for health and reflection), so a
service can key per-caller quotas by `Caller.name` without reading tokens itself.

Not here: transport security (TLS certificates: `rstar.server` serves them, the clients
in `rstar.clients` and `rstar.client` use them), per-request quotas, and identities beyond
a token's name (no users, groups or OIDC: put a gateway in front for those).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc
import yaml

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SOLVE, SYNTHESIZE, ADMIN, INTERNAL = "solve", "synthesize", "admin", "internal"
SCOPES = (SOLVE, SYNTHESIZE, ADMIN, INTERNAL)
ANY = ""  # a method any valid token may call

# full gRPC method -> the scope it needs; absent methods need ADMIN (closed by default)
METHOD_SCOPES: dict[str, str] = {
    "/rstar.v1.SearchService/Solve": SOLVE,
    "/rstar.v1.SearchService/SolveStream": SOLVE,
    # synthesis runs long searches for training data and may write to the store: its own scope
    "/rstar.v1.SearchService/Synthesize": SYNTHESIZE,
    "/rstar.v1.SearchService/Info": ANY,
    "/rstar.v1.PolicyService/Generate": INTERNAL,
    "/rstar.v1.PolicyService/Info": ANY,
    "/rstar.v1.PPMService/Score": INTERNAL,
    "/rstar.v1.PPMService/Info": ANY,
    "/rstar.v1.SandboxService/Execute": INTERNAL,
    "/rstar.v1.SandboxService/Info": ANY,
}
# probes and tooling carry no token
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

TOKEN_ENV = "RSTAR_TOKEN"
INTERNAL_TOKEN_ENV = "RSTAR_INTERNAL_TOKEN"
CHECK_INTERVAL_S = 1.0


class AuthConfigError(ValueError):
    """A token file that cannot be used (missing, malformed, unknown scope, duplicate token)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """One entry of a token file."""

    name: str
    sha256: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope == ANY or scope in self.scopes or ADMIN in self.scopes


def required_scope(method: str) -> str | None:
    """The scope `method` needs; None when it is exempt (health, reflection)."""
    if method.startswith(EXEMPT_PREFIXES):
        return None
    return METHOD_SCOPES.get(method, ADMIN)


def parse_tokens(text: str, where: str = "token file") -> list[Caller]:
    """The callers a token file lists; AuthConfigError for anything it cannot trust."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AuthConfigError(f"{where}: not YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise AuthConfigError(f"{where}: expected a mapping with a `tokens:` list")
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise AuthConfigError(f"{where}: version {version!r}, this reader knows {SCHEMA_VERSION}")
    callers, seen = [], set()
    for i, entry in enumerate(data["tokens"]):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise AuthConfigError(f"{where}: entry {i} needs a name")
        name = str(entry["name"])
        unknown = set(entry) - {"name", "sha256", "token", "scopes"}
        if unknown:
            raise AuthConfigError(f"{where}: {name}: unknown keys {sorted(unknown)}")
        if ("sha256" in entry) == ("token" in entry):
            raise AuthConfigError(f"{where}: {name}: give exactly one of sha256, token")
        digest = str(entry["sha256"]).lower() if "sha256" in entry else hash_token(str(entry["token"]))
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AuthConfigError(f"{where}: {name}: sha256 must be 64 hex digits")
        if "token" in entry and len(str(entry["token"])) < 16:
            raise AuthConfigError(f"{where}: {name}: a token must have at least 16 characters")
        scopes = entry.get("scopes") or []
        if isinstance(scopes, str):
            scopes = [s.strip() for s in scopes.split(",") if s.strip()]
        bad = set(scopes) - set(SCOPES)
        if bad or not scopes:
            raise AuthConfigError(f"{where}: {name}: scopes must be some of {', '.join(SCOPES)}, got {scopes}")
        if digest in seen:
            raise AuthConfigError(f"{where}: {name}: the same token is listed twice")
        seen.add(digest)
        callers.append(Caller(name, digest, frozenset(scopes)))
    return callers


class TokenTable:
    """The callers of one token file, re-read when the file changes."""

    def __init__(self, path: str | Path, check_interval: float = CHECK_INTERVAL_S):
        self.path = Path(path)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._callers = parse_tokens(self._read(), str(self.path))  # a bad file at start is fatal
        self._checked = time.monotonic()
        log.info("auth: %d token(s) from %s", len(self._callers), self.path)

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError as e:
            raise AuthConfigError(f"cannot read the token file {self.path}: {e.strerror}") from None

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()  # follows symlinks: a Secret volume swaps its ..data link
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return
        with self._lock:
            if now - self._checked < self.check_interval:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            try:
                callers = parse_tokens(self._read(), str(self.path))
            except AuthConfigError as e:
                log.error("auth: keeping the previous %d token(s): %s", len(self._callers), e)
                return
            self._stamp, self._callers = stamp, callers
            log.info("auth: reloaded %d token(s) from %s", len(callers), self.path)

    def lookup(self, token: str) -> Caller | None:
        """The caller holding `token`, or None. Every entry is compared (constant time per entry)."""
        self._refresh()
        digest = hash_token(token).encode()
        found = None
        for caller in self._callers:
            if hmac.compare_digest(digest, caller.sha256.encode()):
                found = caller
        return found


VIEW_SCOPES = ("solve", "synthesize")   # who may read stored trees in the search service's viewer


def http_authorizer(table: "TokenTable", scopes: Iterable[str] = VIEW_SCOPES):
    """A check of an HTTP `Authorization: Bearer <token>` header against the API's token table:
    allowed when the token's caller holds one of `scopes` (admin holds every scope)."""
    wanted = tuple(scopes)

    def allowed(header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        caller = table.lookup(header[7:].strip())
        return caller is not None and any(caller.may(s) for s in wanted)

    return allowed


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _denying(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that only aborts (so the rejection is counted like any RPC)."""
    def unary(request, context):
        context.abort(code, message)

    def stream(request, context):
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: unary(None, ctx), **kw)
    return grpc.stream_stream_rpc_method_handler(lambda it, ctx: stream(None, ctx), **kw)


_CALLER: contextvars.ContextVar["Caller | None"] = contextvars.ContextVar("rstar_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC this thread is handling (set by `AuthInterceptor`); None without auth."""
    return _CALLER.get()


def _as_caller(handler: grpc.RpcMethodHandler, caller: Caller) -> grpc.RpcMethodHandler:
    """`handler` run with `current_caller()` = `caller` (reset afterwards: handler threads are reused)."""
    def unary(fn):
        def run(request, context):
            token = _CALLER.set(caller)
            try:
                return fn(request, context)
            finally:
                _CALLER.reset(token)
        return run

    def stream(fn):
        def run(request, context):
            # set around each step, never across a yield: a generator may be finished (closed,
            # collected) in another thread's context, where resetting would fail
            token = _CALLER.set(caller)
            try:
                responses = iter(fn(request, context))
            finally:
                _CALLER.reset(token)
            try:
                while True:
                    token = _CALLER.set(caller)
                    try:
                        item = next(responses)
                    except StopIteration:
                        return
                    finally:
                        _CALLER.reset(token)
                    yield item
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
        return run

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kw)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but health and reflection, then authorizes it by `METHOD_SCOPES`."""

    def __init__(self, service: str, tokens: TokenTable):
        self.service = service
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        scope = required_scope(method)
        if handler is None or scope is None:
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        short = method.rsplit("/", 1)[-1]
        if token is None:
            return _denying(handler, grpc.StatusCode.UNAUTHENTICATED,
                            f"{self.service}: {short} needs a bearer token (authorization: Bearer ...)")
        caller = self.tokens.lookup(token)
        if caller is None:
            return _denying(handler, grpc.StatusCode.UNAUTHENTICATED, f"{self.service}: unknown token")
        if not caller.may(scope):
            log.warning("auth: %s may not call %s (needs scope %s, has %s)", caller.name, short, scope,
                        ",".join(sorted(caller.scopes)))
            return _denying(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{self.service}: {short} needs the `{scope}` scope")
        return _as_caller(handler, caller)


# ---------------------------------------------------------------- local stacks


@dataclass(frozen=True)
class LocalTokens:
    """The files of a local stack's tokens under `$RSTAR_HOME/auth/`."""

    directory: Path

    @property
    def table(self) -> Path:
        return self.directory / "tokens.yaml"

    @property
    def user(self) -> Path:
        return self.directory / "user.token"

    @property
    def internal(self) -> Path:
        return self.directory / "internal.token"

    def complete(self) -> bool:
        return self.table.is_file() and self.user.is_file() and self.internal.is_file()


def local_tokens(home: Path | None = None) -> LocalTokens:
    from rstar.config import home_dir

    return LocalTokens((home or home_dir()) / "auth")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_local_tokens(home: Path | None = None) -> tuple[LocalTokens, bool]:
    """The local stack's tokens, created on first use; (their files, whether they were just created).

    Files written before the table, so a table never names tokens whose files are missing; an
    incomplete set (an interrupted first start) is replaced as a whole."""
    loc = local_tokens(home)
    if loc.complete():
        return loc, False
    loc.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(loc.directory, 0o700)
    user, internal = new_token(), new_token()
    _write_private(loc.user, user + "\n")
    _write_private(loc.internal, internal + "\n")
    table = {"version": SCHEMA_VERSION, "tokens": [
        {"name": "local-user", "sha256": hash_token(user), "scopes": [SOLVE, SYNTHESIZE, ADMIN]},
        {"name": "local-search", "sha256": hash_token(internal), "scopes": [INTERNAL]},
    ]}
    _write_private(loc.table, "# rstar tokens of this $RSTAR_HOME's local stack (rstar.auth)\n"
                   + yaml.safe_dump(table, sort_keys=False))
    return loc, True


def read_token(path: str | Path) -> str:
    """A token file's token (its first non-empty line); AuthConfigError when missing or empty."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise AuthConfigError(f"cannot read the token in {path}: {e.strerror}") from None
    if not lines:
        raise AuthConfigError(f"{path} holds no token")
    return lines[0]


def _found(env_name: str, path: Path, address: str | None) -> str | None:
    value = os.environ.get(env_name, "").strip()
    if value:
        return value
    if address is not None and not loopback_target(address):
        return None  # the local stack's token is for the local stack, never sent elsewhere
    try:
        return read_token(path)
    except AuthConfigError:
        return None


def user_token(address: str | None = None, home: Path | None = None) -> str | None:
    """The token a user's client sends by default: $RSTAR_TOKEN, else (to a loopback `address`)
    the local stack's user token, else None."""
    return _found(TOKEN_ENV, local_tokens(home).user, address)


def internal_token(address: str | None = None, home: Path | None = None) -> str | None:
    """The token an internal client sends by default: $RSTAR_INTERNAL_TOKEN, else (to a loopback
    `address`) the local stack's internal token, else None."""
    return _found(INTERNAL_TOKEN_ENV, local_tokens(home).internal, address)


# ---------------------------------------------------------------- where plaintext is allowed


def loopback_host(host: str) -> bool:
    """A bind address only this machine can reach (not 0.0.0.0 / :: / a real interface)."""
    host = host.strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.") or host.startswith("unix:")


def loopback_target(address: str) -> bool:
    """A gRPC target (`host:port`, `ipv4:...`, `unix:...`, `dns:///host:port`) on this machine."""
    target = address.split("///", 1)[-1]
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):
        target = target.split(":", 1)[1]
    host = target[1:target.find("]")] if target.startswith("[") else target.rsplit(":", 1)[0]
    return loopback_host(host)
