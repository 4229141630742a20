"""PolicyService configuration (env prefix RSTAR_POLICY_)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rstar.config import ConfigError, ServingSecurity, field
from rstar.services import SERVICES


@dataclass
class PolicyConfig(ServingSecurity):
    host: str = field("127.0.0.1", "address to bind")
    port: int = field(SERVICES["policy"].port, "gRPC port (0 = any free port)")
    metrics_port: int = field(SERVICES["policy"].metrics_port, "Prometheus /metrics HTTP port (0 = any free port, -1 = off)")
    metrics_host: str = field("127.0.0.1", "address the /metrics HTTP server binds (0.0.0.0 in a pod, so Prometheus can scrape it)")
    reflection: bool = field(True, "serve gRPC server reflection (grpcurl, grpcui); off: reflection calls get UNIMPLEMENTED")
    model: str = field("default", "HF model directory, 'default' (the embedded Qwen2.5-Coder-0.5B-Instruct) or an embedded model's name (e.g. smollm2-135m-instruct)")
    model_version: str = field("", "version label reported to clients (default: derived from the model)")
    store_url: str = field("", "object store with the model registry; when set, serve and hot-reload models/policy/CURRENT")
    reload_interval: float = field(30.0, "seconds between polls of the registry's CURRENT (0 = no hot reload)")
    reload_mode: str = field("auto", "hot reload: 'beside' (load the new version next to the old one, then switch; "
                             "memory for two engines), 'drain' (NOT_SERVING, finish in-flight requests, release the "
                             "old engine, load the new one: a GPU that holds one engine), 'auto' (drain on a GPU, "
                             "beside on the CPU)")
    few_shot: bool = field(True, "prepend the two worked examples (needed by models not fine-tuned on the format)")
    cpu_threads: str = field("all", "vLLM's CPU thread binding (VLLM_CPU_OMP_THREADS_BIND, which wins when set): "
                             "'all' = one OpenMP thread per core this process may use (1.8-1.9x over vLLM's "
                             "default on 2 cores), 'auto' = vLLM's own choice (one core on a 2-core machine), "
                             "or a core list such as '0-1' or '0,2'")
    max_model_len: int = field(4096, "context length given to vLLM")
    kv_cache_gib: int = field(2, "CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPU")
    gpu_memory_utilization: float = field(0.85, "fraction of GPU memory vLLM may use (GPU only)")
    dtype: str = field("auto", "model dtype for vLLM (auto = bfloat16 on a GPU or a CPU with native bf16, else float32)")
    chunked_prefill: bool = field(False, "let vLLM split long prefills across steps (off: vllm-cpu 0.32 kills the "
                                  "engine when a seeded request's prefill is chunked, 'CPU Generator does not use offset')")
    max_batched_tokens: int = field(16384, "tokens scheduled per engine step (at least max_model_len)")
    enforce_eager: bool = field(True, "skip graph compilation (loads in ~25 s instead of ~90 s on the CPU)")
    default_max_tokens: int = field(256, "tokens per candidate step when a request does not say")
    max_items: int = field(4096, "prefixes per Generate call at most")
    max_candidates: int = field(64, "candidates per prefix at most")
    max_batch_sequences: int = field(256, "sequences merged into one engine call at most")
    log_level: str = field("INFO", "logging level")

    def validate(self) -> None:
        self.validate_security()
        if self.default_max_tokens <= 0 or self.max_items <= 0 or self.max_candidates <= 0:
            raise ConfigError("default_max_tokens, max_items and max_candidates must be positive")
        if not re.fullmatch(r"all|auto|\d+(-\d+)?(,\d+(-\d+)?)*", self.cpu_threads):
            raise ConfigError(f"cpu_threads must be all, auto or a core list like 0-1, got {self.cpu_threads!r}")
        if self.reload_mode not in ("auto", "beside", "drain"):
            raise ConfigError(f"reload_mode must be auto, beside or drain, got {self.reload_mode!r}")
