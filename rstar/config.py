"""Typed configuration: one dataclass per component, overridable by env and flags.

Every field carries a default that runs on a laptop and a `doc` string. Values
come, lowest precedence first, from the dataclass default, an optional YAML
file, environment variables (`RSTAR_<PREFIX>_<FIELD>`), and command-line flags
(`--field-name`). Unknown keys in a YAML file are rejected. Parsing never has
side effects (no directories are created, nothing is loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def field(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with documentation (shown in --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kw)


def home_dir() -> Path:
    """Where embedded state lives (object store, model cache): $RSTAR_HOME or ~/.rstar."""
    return Path(os.environ.get("RSTAR_HOME", Path.home() / ".rstar")).expanduser()


def _convert(raw: str, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
    if origin in (list, tuple) or typ in (list, tuple):
        return [s.strip() for s in raw.split(",") if s.strip()]
    try:
        return typ(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from e


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` flag per dataclass field (default: unset)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(flag, dest=f.name, default=None, type=str, help=f"{doc} (default: {default!r})")
    del hints


def build(cls: type[T], env_prefix: str, args: argparse.Namespace | None = None,
          yaml_path: str | Path | None = None, env: dict[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from defaults < YAML < environment < flags < explicit overrides."""
    env = os.environ if env is None else env
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown keys in {yaml_path}: {sorted(unknown)}")
        values.update(data)
    for name in names:
        key = f"RSTAR_{env_prefix}_{name}".upper()
        if key in env:
            values[name] = _convert(env[key], hints[name], key)
        if args is not None and getattr(args, name, None) is not None:
            values[name] = _convert(getattr(args, name), hints[name], "--" + name.replace("_", "-"))
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    values.update(overrides)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def parse(cls: type[T], env_prefix: str, argv: Sequence[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    """Parse flags (and --config YAML) for a service's `main`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file with config values")
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return build(cls, env_prefix, args, yaml_path=args.config)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable


@dataclasses.dataclass
class ServingSecurity:
    """Transport security and authentication, the same fields in every service's config
    (each service's dataclass inherits them: `RSTAR_<SERVICE>_TLS_CERT`, `--tls-cert`, ...).

    Plaintext gRPC is for loopback: a service bound to any other address refuses to start
    without `tls_cert` + `tls_key` unless `allow_plaintext` says the network protects it."""

    tls_cert: str = field("", "PEM certificate chain this service presents (with tls_key: the port speaks TLS only)")
    tls_key: str = field("", "PEM private key of tls_cert")
    tls_client_ca: str = field("", "PEM CA bundle client certificates must chain to: mutual TLS, a client "
                               "without a valid certificate is refused in the handshake (needs tls_cert)")
    auth_tokens: str = field("", "token file (YAML: name, sha256 or token, scopes; rstar/auth.py): every RPC but "
                             "health and reflection then needs `authorization: Bearer <token>` with the method's "
                             "scope ('' = no authentication)")
    allow_plaintext: bool = field(False, "serve plaintext gRPC on a non-loopback host (only inside a network "
                                  "that already protects it, e.g. a service mesh with mTLS)")
    health_port: int = field(-1, "a second, plaintext port (same host) serving only grpc.health.v1, for probes "
                             "that cannot speak TLS or present a client certificate (kubelet's gRPC probe); "
                             "-1 = off, 0 = any free port")

    def validate_security(self) -> None:
        from rstar.auth import loopback_host

        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        host = getattr(self, "host", "127.0.0.1")
        if not self.tls_cert and not self.allow_plaintext and not loopback_host(host):
            raise ConfigError(f"plaintext gRPC on {host} would reach the network: give tls_cert and tls_key, "
                              "or allow_plaintext=true where the network already protects it")
