"""`python -m search_svc`: the SearchService process.

`create_server(config, core=None)` returns the `rstar.server.Service` every
service returns; the core is `rstar.search.core.SearchCore` (MCTS over the
engine protocols), this module only wires it to gRPC clients and health.
Health (readiness: the service "" and rstar.v1.SearchService) is SERVING only
while the policy, PPM and sandbox services all answer Info with ready=true
(`DownstreamMonitor` keeps polling and flips back to NOT_SERVING when one goes
away). Liveness is the health service `LIVENESS` ("liveness"): SERVING from
the start, whatever the downstream services do, so a policy outage takes search
pods out of the load balancer without restarting them (a restart cannot bring
the policy back, and would drop the searches in flight).
"""

from __future__ import annotations

import logging
import sys
import threading

from grpc_health.v1 import health_pb2

from rstar import metrics
from rstar.config import parse
from rstar.server import (PUBLIC_MAX_MESSAGE_BYTES, ServerHandle, ServerSecurity, Service, create_grpc_server, serve,
                          setup_logging)
from rstar.v1 import search_pb2, search_pb2_grpc
from rstar.clients import ClientSecurity, PolicyClient, PPMClient, SandboxClient, wait_ready
from search_svc.config import SearchConfig
from rstar.search.core import Admission, SearchCore
from search_svc.servicer import SearchServicer

log = logging.getLogger("search_svc")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
LIVENESS = "liveness"   # the health service name of the liveness probe (k8s/base/search.yaml)


class DownstreamMonitor:
    """Polls the three services' Info; sets our health and remembers their model versions."""

    def __init__(self, clients, handle: ServerHandle, interval: float):
        self.clients = clients
        self.handle = handle
        self.interval = interval
        self.ready = False
        self.versions: dict[str, str] = {}
        self.ready_event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._why = None

    def poll_once(self) -> bool:
        ready, versions, why = wait_ready(self.clients, timeout=max(1.0, self.interval))
        if versions:
            self.versions = versions
        if ready != self.ready:
            self.handle.set_serving(ready)
            self.ready = ready
        if ready:
            self.ready_event.set()
        if why != self._why:
            if why:
                log.info("waiting for downstream services: %s", why)
            else:
                log.info("downstream services ready: %s", self.versions)
            self._why = why
        return ready

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("downstream health poll failed")
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="search-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def info(self) -> tuple[bool, dict[str, str]]:
        return self.ready, dict(self.versions)


def create_server(config: SearchConfig, core: SearchCore | None = None, *, policy=None, scorer=None,
                  executor=None, store=None) -> Service:
    """Build the service (not started); returns the `Service` every service returns.

    `core`: a `SearchCore` to serve as it is. Without one, the core is built from
    `policy`/`scorer`/`executor`/`store` where given, else from the config (gRPC
    clients of the three services, the configured store). Health follows the
    downstream services that answer Info (`DownstreamMonitor`, started by the load
    step, also at `servicer.monitor`); with none to watch, the service is SERVING at once.
    """
    config.validate()
    clients = []

    def security(address: str) -> ClientSecurity:
        # the internal token and (m)TLS toward policy, ppm and sandbox (rstar.clients, rstar.auth)
        return ClientSecurity.from_files(config.downstream_token_file, config.downstream_tls,
                                         config.downstream_tls_ca, config.downstream_tls_cert,
                                         config.downstream_tls_key, address)

    # retries with a time budget, wait_for_ready, keepalive, round_robin (rstar.clients)
    retry = dict(retry_budget_s=config.retry_budget_s, max_backoff=config.retry_max_backoff_s)
    if core is None:
        if policy is None:
            policy = PolicyClient(config.policy_address, config.call_timeout_s, config.call_retries,
                                  config.retry_backoff_s, security=security(config.policy_address), **retry)
            clients.append(policy)
        if scorer is None:
            scorer = PPMClient(config.ppm_address, config.call_timeout_s, config.call_retries,
                               config.retry_backoff_s, security=security(config.ppm_address), **retry)
            clients.append(scorer)
        if executor is None:
            executor = SandboxClient(config.sandbox_address, config.call_timeout_s, config.call_retries,
                                     config.retry_backoff_s, wall_seconds=config.execution_wall_s,
                                     security=security(config.sandbox_address), **retry)
            clients.append(executor)
        if store is None:
            from rstar.store import open_store

            store = open_store(config.store_url or None)
        core = SearchCore(policy, executor, scorer, store,
                          Admission(config.max_concurrent_searches, config.max_queued_searches))
    servicer = SearchServicer(config, core)

    def register(server):
        search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    handle = create_grpc_server("search", register, config.host, config.port, max_workers=config.max_workers,
                                reflection=config.reflection, security=ServerSecurity.from_config(config),
                                max_message_bytes=PUBLIC_MAX_MESSAGE_BYTES)
    # liveness = this process answers (on the health port too: the same health servicer);
    # readiness ("" and SERVICE_NAME) follows the downstream services below
    handle.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    watched = [c for c in (core.policy, core.scorer, core.executor) if c is not None and hasattr(c, "info")]
    monitor = DownstreamMonitor(watched, handle, config.health_poll_s)
    servicer.info = monitor.info
    servicer.monitor = monitor

    def load_step() -> None:
        # "loaded" = every downstream service answers ready; the monitor keeps watching afterwards
        monitor.start()
        while not monitor.ready_event.wait(0.5):
            pass

    def release() -> None:
        monitor.stop()
        for c in clients:
            c.close()

    servicer.close = release
    if not watched:
        monitor.ready = True
        monitor.ready_event.set()
        handle.set_serving(True)
    return Service(handle, servicer, load_step=load_step if watched else None, release=release,
                   core_of=lambda: core)


def main(argv=None) -> int:
    config = parse(SearchConfig, "SEARCH", argv, prog="python -m search_svc",
                   description="SearchService: MCTS over the policy, PPM and sandbox services")
    setup_logging(config.log_level)
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_port, config.metrics_host)
    service = create_server(config)
    log.info("search: policy=%s ppm=%s sandbox=%s, default budget %d rollouts x k=%d, depth %d",
             config.policy_address, config.ppm_address, config.sandbox_address, config.rollouts,
             config.candidates, config.max_depth)
    serve(service, grace=config.drain_grace_s)   # in-flight searches finish (k8s: terminationGracePeriodSeconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
