"""The metrics catalogue: every Prometheus metric the services export.

Metrics are module-level singletons on the default registry, so importing this
module twice (several servers in one test process) never re-registers them.
Each carries a `service` label where more than one service can export it. The
README's metrics catalogue, the alert rules and the Grafana dashboards are
checked against the names defined here. This module does not start an HTTP
server by itself: `start_metrics_server` does, when a service asks; other read-only
pages can be served beside /metrics on it (`add_http_app`: the search's tree viewer).
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# --- every service (recorded by rstar.server's interceptor and model slot) ---
RPC_REQUESTS = Counter(
    "rstar_rpc_requests_total", "RPCs handled, by final status code.", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "rstar_rpc_latency_seconds", "RPC handling time.", ["service", "method"], buckets=LATENCY_BUCKETS
)
RPC_IN_FLIGHT = Gauge("rstar_rpc_in_flight", "RPCs being handled now.", ["service", "method"])
SERVICE_READY = Gauge("rstar_service_ready", "1 while the service reports SERVING.", ["service"])
MODEL_INFO = Gauge(
    "rstar_model_info", "1 for the model version a service serves now.", ["service", "model", "version"]
)
MODEL_RELOADS = Counter(
    "rstar_model_reloads_total", "Hot-reload attempts by outcome (ok, failed).", ["service", "model", "outcome"]
)

# --- policy ---
POLICY_GENERATED_TOKENS = Counter("rstar_policy_generated_tokens_total", "Tokens generated.")
POLICY_PROMPT_TOKENS = Counter("rstar_policy_prompt_tokens_total", "Prompt tokens processed.")
POLICY_SEQUENCES = Counter("rstar_policy_sequences_total", "Candidate steps generated.")
POLICY_REFUSED_ITEMS = Counter("rstar_policy_refused_items_total",
                               "Prefixes the policy engine refused (e.g. past the context); they fail alone.")
POLICY_BATCH_PREFIXES = Histogram(
    "rstar_policy_batch_prefixes", "Prefixes per Generate call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
)

# --- ppm ---
PPM_SCORED = Counter("rstar_ppm_scored_prefixes_total", "Prefixes scored.")
PPM_BATCH_PREFIXES = Histogram(
    "rstar_ppm_batch_prefixes", "Prefixes per Score call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
)

# --- sandbox ---
SANDBOX_EXECUTIONS = Counter(
    "rstar_sandbox_executions_total",
    "Programs executed, by outcome (ok, error, timeout, memory, killed, output_limit).",
    ["outcome"],
)
SANDBOX_LATENCY = Histogram(
    "rstar_sandbox_execution_seconds", "Wall time of one execution.", buckets=LATENCY_BUCKETS
)
SANDBOX_POOL_SIZE = Gauge("rstar_sandbox_pool_size", "Warm workers ready.")
SANDBOX_QUEUE_DEPTH = Gauge("rstar_sandbox_queue_depth", "Executions waiting for a worker.")
SANDBOX_ISOLATION = Gauge(
    "rstar_sandbox_isolation_layer", "1 for each isolation layer active.", ["layer"]
)

# --- search ---
SEARCH_ROLLOUTS = Counter("rstar_search_rollouts_total", "MCTS rollouts completed.", ["mode"])
SEARCH_TOKENS = Counter("rstar_search_generated_tokens_total", "Tokens generated for searches.", ["mode"])
SEARCH_EXECUTIONS = Counter("rstar_search_executions_total", "Step programs executed for searches.", ["mode"])
SEARCH_STAGE_SECONDS = Counter(
    "rstar_search_stage_seconds_total",
    "Search wall time by stage (generate, ppm, sandbox, other).",
    ["stage"],
)
SEARCH_TREE_NODES = Histogram(
    "rstar_search_tree_nodes", "Nodes per finished tree.", buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
)
SEARCH_ACTIVE = Gauge("rstar_search_active_requests", "Searches running now.")
SEARCH_QUEUE_DEPTH = Gauge("rstar_search_queue_depth", "Search requests waiting for a slot.")
SEARCH_QUEUE_LIMIT = Gauge("rstar_search_queue_limit", "Search requests admitted at most (running + waiting).")
SEARCH_SOLVES = Counter(
    "rstar_search_solves_total", "Finished Solve/SolveStream requests by outcome.", ["outcome"]
)
SEARCH_PROBLEMS = Counter(
    "rstar_search_synthesis_problems_total", "Synthesis problems finished, by solved (true/false).", ["solved"]
)
TRAJECTORY_SHARD_FAULTS = Counter(
    "rstar_trajectory_shard_faults_total",
    "Trajectory store faults survived: op=read a shard the trainer skipped as unreadable, "
    "op=write_part a synthesis part write that failed and is retried with the next part.", ["op"]
)

# --- evolution (exported by the round controller while it runs) ---
EVOLUTION_ROUND = Gauge("rstar_evolution_round", "Round the controller works on.")
EVOLUTION_STAGE = Gauge(
    "rstar_evolution_stage_info", "1 for the stage the current round is in.", ["round", "stage"]
)
EVOLUTION_SOLVED_RATIO = Gauge("rstar_evolution_solved_ratio", "Share of pool problems solved in synthesis.", ["round"])
EVOLUTION_LAST_SUCCESS = Gauge(
    "rstar_evolution_last_success_timestamp_seconds", "Unix time the last round finished."
)
EVOLUTION_FAILURES = Counter("rstar_evolution_round_failures_total", "Rounds that failed.")


_serving: tuple[str, int] | None = None  # (host, port) of the /metrics server this process started
_http_apps: dict[str, Callable] = {}     # path prefix -> WSGI app served beside /metrics (the search's /view)


def add_http_app(prefix: str, app: Callable) -> None:
    """Serve the WSGI `app` for `prefix` and the paths below it on this process's /metrics server
    (before or after it started); everything else stays the metrics exposition."""
    _http_apps["/" + prefix.strip("/")] = app


def _dispatch(metrics_app: Callable) -> Callable:
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        for prefix, extra in list(_http_apps.items()):
            if path == prefix or path.startswith(prefix + "/"):
                return extra(environ, start_response)
        return metrics_app(environ, start_response)

    return app


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on `host`:`port` (0 picks a free one); returns the bound port.

    The services pass their config's `metrics_host` (loopback by default; the Kubernetes
    manifests set 0.0.0.0 so Prometheus can scrape the pod IP). The default here is for
    callers without such a setting (the evolution controller, a pod)."""
    global _serving
    server, _thread = start_http_server(port, addr=host)
    server.set_app(_dispatch(server.get_app()))   # wsgiref's server: the app may be swapped while serving
    bound = server.server_address[1]
    _serving = (host, bound)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def serving_address() -> tuple[str, int] | None:
    """(host, port) of the /metrics server started in this process, None if none."""
    return _serving
