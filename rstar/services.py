"""The table of the four services: name, app module, default gRPC and metrics ports.

One source: each service's config takes its default ports from here, and the
`rstar` CLI starts, probes and stops the services from it (by module name, in
subprocesses, so the CLI imports no service).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str           # "policy", "ppm", "sandbox", "search"
    module: str         # the app package run as `python -m MODULE`
    port: int           # default gRPC port
    metrics_port: int   # default Prometheus /metrics port
    env_prefix: str     # RSTAR_<PREFIX>_<OPTION>
    offset: int         # position under `rstar up --base-port BASE` (gRPC BASE+offset, metrics BASE+100+offset)


SERVICES: dict[str, ServiceSpec] = {s.name: s for s in (
    ServiceSpec("policy", "policy_svc", 50051, 9101, "POLICY", 0),
    ServiceSpec("ppm", "ppm_svc", 50052, 9102, "PPM", 1),
    ServiceSpec("sandbox", "sandbox_svc", 50053, 9103, "SANDBOX", 2),
    ServiceSpec("search", "search_svc", 50054, 9104, "SEARCH", 3),
)}

START_ORDER = ("sandbox", "ppm", "policy", "search")  # cheap ones first; search last (it waits on the rest)
