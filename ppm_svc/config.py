"""PPMService configuration (env prefix RSTAR_PPM_)."""

from __future__ import annotations

from dataclasses import dataclass

from rstar.config import ConfigError, ServingSecurity, field
from rstar.services import SERVICES


@dataclass
class PPMConfig(ServingSecurity):
    host: str = field("127.0.0.1", "address to bind")
    port: int = field(SERVICES["ppm"].port, "gRPC port (0 = any free port)")
    metrics_port: int = field(SERVICES["ppm"].metrics_port, "Prometheus /metrics HTTP port (0 = any free port, -1 = off)")
    metrics_host: str = field("127.0.0.1", "address the /metrics HTTP server binds (0.0.0.0 in a pod, so Prometheus can scrape it)")
    reflection: bool = field(True, "serve gRPC server reflection (grpcurl, grpcui); off: reflection calls get UNIMPLEMENTED")
    model: str = field("default", "HF model directory (backbone, optional value_head.safetensors), or 'default'")
    model_version: str = field("", "version label reported to clients (default: derived from the model)")
    store_url: str = field("", "object store with the model registry; when set, serve and hot-reload models/ppm/CURRENT")
    reload_interval: float = field(30.0, "seconds between polls of the registry's CURRENT (0 = no hot reload)")
    reload_mode: str = field("beside", "hot reload: 'beside' (load the new version next to the old one, then "
                             "switch; memory for two models) or 'drain' (NOT_SERVING, finish in-flight requests, "
                             "release the old model, load the new one)")
    head_seed: int = field(0, "seed of a freshly initialised value head (when the model has none)")
    batch_size: int = field(16, "prefixes per forward pass")
    max_length: int = field(2048, "tokens per prefix at most (longer prefixes keep their last tokens)")
    max_prefixes: int = field(4096, "prefixes per Score call at most")
    threads: int = field(0, "torch threads (0 = torch default)")
    log_level: str = field("INFO", "logging level")

    def validate(self) -> None:
        self.validate_security()
        if self.batch_size <= 0 or self.max_length <= 0 or self.max_prefixes <= 0:
            raise ConfigError("batch_size, max_length and max_prefixes must be positive")
        if self.reload_mode not in ("beside", "drain"):
            raise ConfigError(f"reload_mode must be beside or drain, got {self.reload_mode!r}")
