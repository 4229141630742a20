"""TLS on the real services (issue 16 item 2), with certificates made at test time.

Policy, PPM and sandbox serve mutual TLS (the real sandbox pool; policy and PPM with the
protocol fakes as cores), search serves TLS and reaches them with its client certificate
and internal token: a solve goes through the whole mTLS chain. A handshake without a client
certificate, or with one from another CA, is refused; plaintext to a TLS port fails; the
plaintext health-only port answers probes; plaintext on a non-loopback host is refused.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rstar import auth
from rstar.client import SearchClient, Unavailable
from rstar.config import ConfigError, build
from rstar.sandbox.config import SandboxConfig
from rstar.server import ServerSecurity, create_grpc_server
from rstar.store import LocalStore
from rstar.v1 import common_pb2, policy_pb2_grpc
from rstar_testing.fakes import HashScorer, WalkPolicy

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    """A CA and the certificates it issues (files under `root`)."""

    def __init__(self, root: Path, name: str = "rstar-test-ca"):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=1))
                     .not_valid_after(now + datetime.timedelta(hours=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca = root / "ca.crt"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str) -> tuple[Path, Path]:
        """A certificate for `cn` usable as server (localhost, 127.0.0.1) and as client: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.root / f"{cn}.crt", self.root / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path


def write_tokens(path: Path, **scopes: list[str]) -> dict[str, str]:
    """A token file with one fresh token per name; returns {name: token}."""
    import yaml

    tokens = {name: auth.new_token() for name in scopes}
    path.write_text(yaml.safe_dump({"version": 1, "tokens": [
        {"name": n, "sha256": auth.hash_token(t), "scopes": scopes[n]} for n, t in tokens.items()]}))
    return tokens


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory):
    """policy, ppm, sandbox on mutual TLS + tokens; search on TLS + tokens, mTLS downstream."""
    from policy_svc.config import PolicyConfig
    from policy_svc.server import create_server as policy_server
    from ppm_svc.config import PPMConfig
    from ppm_svc.server import create_server as ppm_server
    from sandbox_svc.server import create_server as sandbox_server
    from search_svc.config import SearchConfig
    from search_svc.server import create_server as search_server

    root = tmp_path_factory.mktemp("tls")
    pki = PKI(root / "pki")
    table = root / "tokens.yaml"
    tokens = write_tokens(table, user=["solve"], search=["internal"])
    (root / "internal.token").write_text(tokens["search"] + "\n")
    services = []

    def internal_tls(name: str) -> dict:
        cert, key = pki.issue(name)
        return dict(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki.ca), auth_tokens=str(table))

    policy = policy_server(PolicyConfig(port=0, metrics_port=-1, health_port=0, **internal_tls("policy")),
                           core=WalkPolicy()).start()
    ppm = ppm_server(PPMConfig(port=0, metrics_port=-1, **internal_tls("ppm")), core=HashScorer()).start()
    sandbox = sandbox_server(SandboxConfig(port=0, metrics_port=-1, **internal_tls("sandbox"))).start()
    services += [policy, ppm, sandbox]
    sandbox.load()
    cert, key = pki.issue("search")
    search = search_server(SearchConfig(
        port=0, metrics_port=-1, tls_cert=str(cert), tls_key=str(key), auth_tokens=str(table),
        policy_address=f"localhost:{policy.port}", ppm_address=f"localhost:{ppm.port}",
        sandbox_address=f"localhost:{sandbox.port}", downstream_tls_ca=str(pki.ca),
        downstream_tls_cert=str(cert), downstream_tls_key=str(key),
        downstream_token_file=str(root / "internal.token"), health_poll_s=0.2, rollouts=2, candidates=2),
        store=LocalStore(root / "store")).start()
    services.append(search)
    search.load()   # returns once policy, ppm and sandbox answered Info over mutual TLS
    try:
        yield dict(pki=pki, tokens=tokens, policy=policy, sandbox=sandbox, search=search, root=root)
    finally:
        for s in reversed(services):
            s.close()


def test_a_solve_crosses_mutual_tls_end_to_end(mtls_stack):
    s = mtls_stack
    with SearchClient(f"localhost:{s['search'].port}", token=s["tokens"]["user"], root_certs=s["pki"].ca,
                      timeout=60) as client:
        result = client.solve("Add some numbers.", rollouts=2, candidates=2, max_depth=4)
    assert result.stats.rollouts >= 1 and result.stats.executions >= 1   # the real sandbox ran code over mTLS
    assert set(result.model_versions) >= {"policy", "ppm"}


def _info(address: str, creds: grpc.ChannelCredentials, token: str) -> common_pb2.InfoResponse:
    with grpc.secure_channel(address, creds) as ch:
        return policy_pb2_grpc.PolicyServiceStub(ch).Info(
            common_pb2.InfoRequest(), timeout=5, metadata=(("authorization", f"Bearer {token}"),))


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_stack):
    s = mtls_stack
    address = f"localhost:{s['policy'].port}"
    token = s["tokens"]["search"]
    cert, key = s["pki"].issue("trainer")
    ok = grpc.ssl_channel_credentials(s["pki"].ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    assert _info(address, ok, token).ready
    with pytest.raises(grpc.RpcError) as e:   # TLS, the right CA, a valid token, but no client certificate
        _info(address, grpc.ssl_channel_credentials(s["pki"].ca.read_bytes()), token)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rogue = PKI(s["root"] / "rogue", "rogue-ca")
    rcert, rkey = rogue.issue("intruder")
    with pytest.raises(grpc.RpcError) as e:   # a certificate the cluster CA did not sign
        _info(address, grpc.ssl_channel_credentials(s["pki"].ca.read_bytes(), rkey.read_bytes(),
                                                    rcert.read_bytes()), token)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_a_tls_port_fails_and_the_health_port_answers_probes(mtls_stack):
    s = mtls_stack
    with grpc.insecure_channel(f"127.0.0.1:{s['search'].port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with SearchClient(f"127.0.0.1:{s['search'].port}", token="", retries=0, timeout=5) as plain:
        with pytest.raises(Unavailable):
            plain.info()
    policy = s["policy"]
    assert policy.handle.health_port and policy.handle.health_port != policy.port
    with grpc.insecure_channel(f"127.0.0.1:{policy.handle.health_port}") as ch:   # what kubelet asks
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:        # the health port serves health only
            policy_pb2_grpc.PolicyServiceStub(ch).Info(common_pb2.InfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_plaintext_is_refused_off_loopback_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="plaintext"):
        build(SandboxConfig, "SANDBOX", env={"RSTAR_SANDBOX_HOST": "0.0.0.0"})
    build(SandboxConfig, "SANDBOX", env={"RSTAR_SANDBOX_HOST": "0.0.0.0", "RSTAR_SANDBOX_ALLOW_PLAINTEXT": "true"})
    build(SandboxConfig, "SANDBOX", env={"RSTAR_SANDBOX_HOST": "0.0.0.0", "RSTAR_SANDBOX_TLS_CERT": "c",
                                         "RSTAR_SANDBOX_TLS_KEY": "k"})
    with pytest.raises(ConfigError, match="together"):
        build(SandboxConfig, "SANDBOX", env={"RSTAR_SANDBOX_TLS_CERT": "c"})
    with pytest.raises(ConfigError, match="mutual"):
        build(SandboxConfig, "SANDBOX", env={"RSTAR_SANDBOX_TLS_CLIENT_CA": "ca"})
    # the server scaffolding checks it too, for servers built without a config
    with pytest.raises(ValueError, match="plaintext"):
        create_grpc_server("t", lambda server: [], host="0.0.0.0", port=0)
    handle = create_grpc_server("t", lambda server: [], host="0.0.0.0", port=0,
                                security=ServerSecurity(allow_plaintext=True))
    handle.server.stop(0)
