"""Bearer tokens and scopes on the real services (issue 16 item 1).

The token file format and the method -> scope table; the search service in-process (the
protocol fakes downstream) with a token file: no or an unknown token is UNAUTHENTICATED, a
token without the method's scope PERMISSION_DENIED (Synthesize needs `synthesize`), health
and reflection need none, rejections are counted, a rewritten file takes effect; and a
local stack as `rstar up` starts it (sandbox and search as processes, policy and PPM fakes
in-process with the same table): the tokens are created once under $RSTAR_HOME/auth, owner
only, and `rstar solve` works with no token flag while a wrong RSTAR_TOKEN is refused.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rstar import auth, metrics
from rstar.client import AuthError, SearchClient
from rstar.store import LocalStore
from rstar.v1 import sandbox_pb2, sandbox_pb2_grpc
from rstar_testing.fakes import HashScorer, InProcessExecutor, WalkPolicy
from search_svc.config import SearchConfig
from search_svc.server import create_server
from tests.conftest import free_port
from tests.test_tls import write_tokens

pytestmark = pytest.mark.timeout(180)

PROBLEM = "Add some numbers."


# ---------------------------------------------------------------- the file and the table


def test_token_file_entries_are_checked():
    ok = auth.parse_tokens(yaml.safe_dump({"version": 1, "tokens": [
        {"name": "a", "token": "x" * 20, "scopes": ["solve"]},
        {"name": "b", "sha256": auth.hash_token("y" * 20), "scopes": "synthesize,admin"}]}))
    assert [(c.name, c.sha256, set(c.scopes)) for c in ok] == [
        ("a", auth.hash_token("x" * 20), {"solve"}), ("b", auth.hash_token("y" * 20), {"synthesize", "admin"})]
    bad = {
        "scopes must be": {"name": "a", "token": "x" * 20, "scopes": ["everything"]},
        "exactly one": {"name": "a", "token": "x" * 20, "sha256": auth.hash_token("x"), "scopes": ["solve"]},
        "16 characters": {"name": "a", "token": "short", "scopes": ["solve"]},
        "64 hex": {"name": "a", "sha256": "abc", "scopes": ["solve"]},
        "needs a name": {"token": "x" * 20, "scopes": ["solve"]},
        "unknown keys": {"name": "a", "token": "x" * 20, "scopes": ["solve"], "expires": 1},
    }
    for why, entry in bad.items():
        with pytest.raises(auth.AuthConfigError, match=why):
            auth.parse_tokens(yaml.safe_dump({"tokens": [entry]}))
    with pytest.raises(auth.AuthConfigError, match="twice"):
        auth.parse_tokens(yaml.safe_dump({"tokens": [{"name": n, "token": "x" * 20, "scopes": ["solve"]}
                                                     for n in "ab"]}))
    with pytest.raises(auth.AuthConfigError, match="version"):
        auth.parse_tokens(yaml.safe_dump({"version": 2, "tokens": []}))


def test_every_rpc_has_a_scope_and_unknown_methods_need_admin():
    from rstar.v1 import policy_pb2, ppm_pb2, sandbox_pb2 as sb, search_pb2

    for mod in (policy_pb2, ppm_pb2, sb, search_pb2):
        for service in mod.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert f"/{service.full_name}/{m.name}" in auth.METHOD_SCOPES, m.full_name
    assert auth.required_scope("/rstar.v1.SearchService/Synthesize") == auth.SYNTHESIZE
    assert auth.required_scope("/rstar.v1.SandboxService/Execute") == auth.INTERNAL
    assert auth.required_scope("/rstar.v1.SearchService/Info") == auth.ANY
    assert auth.required_scope("/rstar.v1.SearchService/DropEverything") == auth.ADMIN
    assert auth.required_scope("/grpc.health.v1.Health/Check") is None
    assert auth.required_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    admin = auth.Caller("root", "0" * 64, frozenset({auth.ADMIN}))
    assert all(admin.may(s) for s in auth.SCOPES)
    assert not auth.Caller("u", "0" * 64, frozenset({auth.SOLVE})).may(auth.SYNTHESIZE)


# ---------------------------------------------------------------- the search service with a token file


@pytest.fixture
def search(tmp_path):
    table = tmp_path / "tokens.yaml"
    tokens = write_tokens(table, solver=["solve"], synth=["synthesize"], internal=["internal"], root=["admin"])
    service = create_server(SearchConfig(port=0, metrics_port=-1, rollouts=2, candidates=2,
                                         auth_tokens=str(table)),
                            policy=WalkPolicy(), scorer=HashScorer(), executor=InProcessExecutor(),
                            store=LocalStore(tmp_path / "store")).start()
    yield service, tokens, table
    service.close()


def _client(service, token):
    return SearchClient(f"127.0.0.1:{service.port}", token=token, retries=0, timeout=30)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(AuthError) as e:
        fn()
    return e.value.code


def _rejected(code: str) -> float:
    return metrics.RPC_REQUESTS.labels("search", "Solve", code)._value.get()


def test_no_or_an_unknown_token_is_unauthenticated(search):
    service, tokens, _ = search
    before = _rejected("UNAUTHENTICATED")
    for token in ("", "not-a-token-of-this-deployment", tokens["solver"] + "x"):
        with _client(service, token) as c:
            assert _code(lambda: c.solve(PROBLEM, rollouts=1)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: c.info()) == grpc.StatusCode.UNAUTHENTICATED
    assert _rejected("UNAUTHENTICATED") == before + 3        # counted like any other RPC
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:  # a malformed header is no token
        from rstar.v1 import common_pb2, search_pb2_grpc

        with pytest.raises(grpc.RpcError) as e:
            search_pb2_grpc.SearchServiceStub(ch).Info(common_pb2.InfoRequest(), timeout=5,
                                                       metadata=(("authorization", tokens["root"]),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_without_the_methods_scope_is_permission_denied(search):
    service, tokens, _ = search
    with _client(service, tokens["solver"]) as c:
        assert c.solve(PROBLEM, rollouts=1).stats.rollouts == 1
        assert c.solve_stream(PROBLEM, rollouts=1).result().stats.rollouts == 1
        assert c.info().ready                                   # Info: any valid token
        for store in (False, True):                             # Synthesize needs `synthesize`, store or not
            err = _code(lambda: c.synthesize([("p", PROBLEM, "3")], rollouts=1, store=store).result())
            assert err == grpc.StatusCode.PERMISSION_DENIED
    with _client(service, tokens["synth"]) as c:
        assert c.synthesize([("p", PROBLEM, "3")], rollouts=1).result().problems == 1
        assert _code(lambda: c.solve(PROBLEM, rollouts=1)) == grpc.StatusCode.PERMISSION_DENIED
    with _client(service, tokens["internal"]) as c:             # search's own token is no user token
        with pytest.raises(AuthError, match="`solve` scope"):
            c.solve(PROBLEM, rollouts=1)
    with _client(service, tokens["root"]) as c:                 # admin: every scope
        c.solve(PROBLEM, rollouts=1)
        c.synthesize([("p", PROBLEM, "3")], rollouts=1).result()


def test_health_and_reflection_need_no_token(search):
    service, _, _ = search
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        (r,) = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert "rstar.v1.SearchService" in {s.name for s in r.list_services_response.service}


def test_a_rewritten_token_file_takes_effect_and_a_broken_one_is_ignored(search):
    service, tokens, table = search
    new = write_tokens(table, rotated=["solve"])["rotated"]     # the old tokens are gone
    time.sleep(auth.CHECK_INTERVAL_S + 0.1)
    with _client(service, tokens["solver"]) as old, _client(service, new) as fresh:
        assert _code(lambda: old.solve(PROBLEM, rollouts=1)) == grpc.StatusCode.UNAUTHENTICATED
        assert fresh.solve(PROBLEM, rollouts=1).stats.rollouts == 1
        table.write_text("tokens: [nonsense")                   # a half-written Secret
        time.sleep(auth.CHECK_INTERVAL_S + 0.1)
        assert fresh.solve(PROBLEM, rollouts=1).stats.rollouts == 1


# ---------------------------------------------------------------- a local stack (`rstar up`)


@pytest.fixture
def local_stack(tmp_path, monkeypatch):
    """sandbox and search as `rstar up` starts them; policy and PPM fakes in-process, same tokens."""
    from policy_svc.config import PolicyConfig
    from policy_svc.server import create_server as policy_server
    from ppm_svc.config import PPMConfig
    from ppm_svc.server import create_server as ppm_server
    from rstar_cli import stack

    home = tmp_path / "home"
    env = {"RSTAR_HOME": str(home)}
    monkeypatch.delenv("RSTAR_TOKEN", raising=False)
    tokens, created = auth.ensure_local_tokens(home)
    assert created and auth.ensure_local_tokens(home) == (tokens, False)   # created once, then reused
    policy = policy_server(PolicyConfig(port=0, metrics_port=-1, auth_tokens=str(tokens.table)),
                           core=WalkPolicy()).start()
    ppm = ppm_server(PPMConfig(port=0, metrics_port=-1, auth_tokens=str(tokens.table)), core=HashScorer()).start()
    eps = {n: stack.Endpoint(n, f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/metrics")
           for n in ("sandbox", "search")}
    args = {"search": ["--policy-address", policy.address, "--ppm-address", ppm.address, "--health-poll-s", "0.2",
                       "--rollouts", "2", "--candidates", "2"]}
    procs = stack.start_services(eps, extra_env=env, log_dir=home / "logs", service_args=args, follow=True)
    try:
        stack.wait_healthy(eps, procs, timeout=120, quiet=True)   # health: no token needed
        yield eps, home, tokens
    finally:
        stack.stop_services(procs)
        policy.close()
        ppm.close()


def _solve(address: str, home, **env):
    return subprocess.run([sys.executable, "-m", "rstar_cli.main", "solve", PROBLEM, "--rollouts", "1", "-k", "1",
                           "--max-depth", "3", "--json", f"--search-address={address}"],
                          capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "RSTAR_TOKEN"},
                               "RSTAR_HOME": str(home), **env})


def test_rstar_up_creates_owner_only_tokens_and_rstar_solve_sends_them(local_stack):
    eps, home, tokens = local_stack
    for path in (tokens.table, tokens.user, tokens.internal):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(tokens.directory.stat().st_mode) == 0o700
    user, internal = auth.read_token(tokens.user), auth.read_token(tokens.internal)
    table = tokens.table.read_text()
    assert user not in table and internal not in table             # the services hold hashes only
    scopes = {c.name: set(c.scopes) for c in auth.parse_tokens(table)}
    assert scopes == {"local-user": {"solve", "synthesize", "admin"}, "local-search": {"internal"}}
    out = _solve(eps["search"].address, home)                      # no token flag: the stack's own
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["rollouts"] == 1        # search reached policy/ppm/sandbox
    out = _solve(eps["search"].address, home, RSTAR_TOKEN="wrong-token-wrong-token")
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr


def test_the_local_sandbox_wants_the_internal_token(local_stack, monkeypatch):
    eps, _, tokens = local_stack
    req = sandbox_pb2.ExecuteRequest(programs=[sandbox_pb2.Program(code="print(6 * 7)")])
    with grpc.insecure_channel(eps["sandbox"].address) as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Execute(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {auth.read_token(tokens.internal)}"),)
        assert stub.Execute(req, timeout=30, metadata=md).results[0].stdout == "42\n"
    # the internal clients find the local internal token by themselves (the trainer's path)
    from rstar.clients import SandboxClient

    monkeypatch.setenv("RSTAR_HOME", str(tokens.directory.parent))
    client = SandboxClient(eps["sandbox"].address, timeout=30)
    try:
        assert client.execute(["print(6 * 7)"])[0].stdout == "42\n"
    finally:
        client.close()


def test_the_tree_viewer_takes_the_apis_tokens(tmp_path):
    """The search service's /view/ data asks for a token with a solve/synthesize scope when the API does."""
    path = tmp_path / "tokens.yaml"
    users = {"reader": "r" * 24, "internal": "i" * 24, "boss": "b" * 24}
    path.write_text(yaml.safe_dump({"version": 1, "tokens": [
        {"name": "reader", "sha256": auth.hash_token(users["reader"]), "scopes": ["solve"]},
        {"name": "internal", "sha256": auth.hash_token(users["internal"]), "scopes": ["internal"]},
        {"name": "boss", "sha256": auth.hash_token(users["boss"]), "scopes": ["admin"]}]}))
    allowed = auth.http_authorizer(auth.TokenTable(path))
    assert allowed(f"Bearer {users['reader']}") and allowed(f"bearer {users['boss']}")
    assert not allowed(f"Bearer {users['internal']}")       # a service token reads no trees
    assert not allowed(None) and not allowed("Bearer nope-nope-nope-nope") and not allowed(users["reader"])
