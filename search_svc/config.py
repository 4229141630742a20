"""Configuration of the search service (env prefix SEARCH: `RSTAR_SEARCH_<FIELD>`).

Laptop defaults: a small budget (8 rollouts, k=4) that finishes in minutes on
2 CPU cores with the 135M default model. The paper's settings are far larger
(k=8 in the paper, 12/32 in the authors' code; 8-128 rollouts), see docs/search.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from rstar.config import ConfigError, ServingSecurity, field
from rstar.services import SERVICES


@dataclass
class SearchConfig(ServingSecurity):
    # --- serving ---
    host: str = field("127.0.0.1", "address to bind the gRPC server to")
    port: int = field(SERVICES["search"].port, "gRPC port (0 picks a free one)")
    metrics_port: int = field(SERVICES["search"].metrics_port, "Prometheus /metrics HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = field("127.0.0.1", "address the /metrics HTTP server binds (0.0.0.0 in a pod, so Prometheus can scrape it)")
    reflection: bool = field(True, "serve gRPC server reflection (grpcurl, grpcui); off: reflection calls get UNIMPLEMENTED")
    log_level: str = field("INFO", "logging level")
    max_workers: int = field(32, "gRPC handler threads")
    drain_grace_s: float = field(21660.0, "seconds in-flight searches get to finish after SIGTERM (a second "
                                 "signal stops at once); at least max_wall_seconds, so no admitted search is "
                                 "cut; the pod's terminationGracePeriodSeconds must be longer")
    # --- downstream services ---
    policy_address: str = field("127.0.0.1:50051", "PolicyService host:port")
    ppm_address: str = field("127.0.0.1:50052", "PPMService host:port")
    sandbox_address: str = field("127.0.0.1:50053", "SandboxService host:port")
    call_timeout_s: float = field(300.0, "deadline of one downstream call (capped by the request's deadline)")
    call_retries: int = field(0, "attempts per downstream call at most (0 = as many as retry_budget_s allows)")
    retry_budget_s: float = field(300.0, "how long one downstream call is retried on UNAVAILABLE (sandbox: also "
                                  "RESOURCE_EXHAUSTED, splitting the batch) from its first failure; the "
                                  "request's deadline caps it (a policy restart takes minutes)")
    retry_backoff_s: float = field(0.2, "first retry delay; doubles per attempt (jittered), up to retry_max_backoff_s")
    retry_max_backoff_s: float = field(5.0, "longest delay between two attempts of a downstream call")
    health_poll_s: float = field(2.0, "how often downstream Info is polled to set health")
    downstream_token_file: str = field("", "file with the bearer token sent to policy, ppm and sandbox (scope "
                                       "internal; '' = $RSTAR_INTERNAL_TOKEN, else the local stack's token for "
                                       "loopback addresses, else none)")
    downstream_tls: bool = field(False, "TLS to policy, ppm and sandbox (on by itself when a downstream_tls_* "
                                 "file is given; system roots without downstream_tls_ca)")
    downstream_tls_ca: str = field("", "PEM CA bundle that the downstream services' certificates chain to")
    downstream_tls_cert: str = field("", "PEM client certificate for mutual TLS to the downstream services")
    downstream_tls_key: str = field("", "PEM private key of downstream_tls_cert")
    # --- storage ---
    store_url: str = field("", "object store for synthesis trees ('' = $RSTAR_HOME/store, file:// or s3://)")
    # --- default budget (used when a request omits its budget) ---
    rollouts: int = field(8, "MCTS rollouts per search (paper: 8-16 per round, 64-128 for hard problems)")
    candidates: int = field(4, "k candidate steps per expansion (paper: 8; authors' code: 12 synthesis, 32 test)")
    max_depth: int = field(16, "maximum steps in a trajectory (spec: 16)")
    exploration: float = field(2.0, "UCT constant c (spec: 2)")
    temperature: float = field(0.7, "policy sampling temperature")
    top_p: float = field(0.95, "policy nucleus sampling")
    max_step_tokens: int = field(256, "token limit of one generated step (a step cut there is failed)")
    execution_wall_s: float = field(0.0, "wall-time limit of one step program (0 = sandbox default)")
    # --- limits (RESOURCE_EXHAUSTED beyond them) ---
    max_rollouts: int = field(512, "largest rollouts a request may ask for")
    max_candidates: int = field(64, "largest k a request may ask for")
    max_trajectories: int = field(128, "largest number of independent searches in one Solve")
    max_synthesis_problems: int = field(10000, "largest problem list of one Synthesize")
    max_active_trees: int = field(32, "trees advanced together in one engine loop (synthesis batch size)")
    max_concurrent_searches: int = field(4, "requests searching at once")
    max_queued_searches: int = field(16, "requests waiting for a slot before RESOURCE_EXHAUSTED")
    max_problem_chars: int = field(16384, "longest problem text accepted (INVALID_ARGUMENT beyond)")
    # --- admission: work, prompt length, per-caller quotas, response size (docs/search.md) ---
    max_request_work: int = field(65536, "largest rollouts x k x trees of one request (trees: Solve's "
                                  "trajectories, Synthesize's problems); RESOURCE_EXHAUSTED beyond")
    max_tokens_per_tree: int = field(262144, "generated tokens a request may spend per tree: its max_tokens "
                                     "(0 = this x trees) is capped there; RESOURCE_EXHAUSTED beyond")
    default_wall_seconds: float = field(1800.0, "wall-time limit of a request that sets none (max_wall_seconds 0)")
    max_wall_seconds: float = field(21600.0, "largest max_wall_seconds a request may ask for")
    max_problem_tokens: int = field(2048, "longest problem in estimated tokens (UTF-8 bytes / "
                                    "problem_bytes_per_token); INVALID_ARGUMENT beyond")
    problem_bytes_per_token: float = field(6.0, "bytes per token of the problem-length estimate (Qwen2.5's "
                                           "tokenizer: 1.4-6.2 on GSM8K/MATH problems, so the estimate is "
                                           "lenient: the policy makes the exact check)")
    max_searches_per_caller: int = field(8, "requests one token (caller name) may have running or waiting")
    caller_tokens_per_minute: int = field(1000000, "generated tokens a caller may spend per minute (a bucket "
                                          "of one minute; a caller in debt is RESOURCE_EXHAUSTED)")
    response_trajectories: int = field(16, "trajectories and alternatives a SolveResponse lists (best first; "
                                       "trajectories_total / alternatives_total count them all)")

    def validate(self) -> None:
        self.validate_security()
        positive = ("rollouts", "candidates", "max_depth", "max_step_tokens", "max_rollouts", "max_candidates",
                    "max_trajectories", "max_synthesis_problems", "max_active_trees",
                    "max_concurrent_searches", "max_problem_chars", "max_request_work",
                    "max_tokens_per_tree", "max_problem_tokens", "max_searches_per_caller",
                    "caller_tokens_per_minute", "response_trajectories")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_searches < 0:
            raise ConfigError("max_queued_searches must be >= 0")
        if self.exploration < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("exploration and temperature must be >= 0, top_p in (0, 1]")
        if self.call_timeout_s <= 0:
            raise ConfigError("call_timeout_s must be > 0")
        if self.call_retries < 0 or self.retry_budget_s < 0 or self.retry_backoff_s < 0 \
                or self.retry_max_backoff_s < self.retry_backoff_s:
            raise ConfigError("need call_retries, retry_budget_s, retry_backoff_s >= 0 and "
                              "retry_max_backoff_s >= retry_backoff_s")
        if self.drain_grace_s < self.max_wall_seconds:
            raise ConfigError(f"drain_grace_s ({self.drain_grace_s:g}) must be at least max_wall_seconds "
                              f"({self.max_wall_seconds:g}): a shutdown would cut searches it admitted")
        if not 0 < self.default_wall_seconds <= self.max_wall_seconds:
            raise ConfigError("need 0 < default_wall_seconds <= max_wall_seconds")
        if not self.problem_bytes_per_token > 0:
            raise ConfigError("problem_bytes_per_token must be > 0")
        if bool(self.downstream_tls_cert) != bool(self.downstream_tls_key):
            raise ConfigError("downstream_tls_cert and downstream_tls_key go together")
