"""SandboxService configuration (env prefix RSTAR_SANDBOX_)."""

from __future__ import annotations

from dataclasses import dataclass

from rstar.config import ConfigError, ServingSecurity, field
from rstar.services import SERVICES

from rstar.sandbox.isolation import LAYERS

MiB = 1024 * 1024


@dataclass
class SandboxConfig(ServingSecurity):
    host: str = field("127.0.0.1", "address to bind")
    port: int = field(SERVICES["sandbox"].port, "gRPC port (0 = any free port)")
    metrics_port: int = field(SERVICES["sandbox"].metrics_port, "Prometheus /metrics HTTP port (0 = any free port, -1 = off)")
    metrics_host: str = field("127.0.0.1", "address the /metrics HTTP server binds (0.0.0.0 in a pod, so Prometheus can scrape it)")
    reflection: bool = field(True, "serve gRPC server reflection (grpcurl, grpcui); off: reflection calls get UNIMPLEMENTED")
    pool_size: int = field(2, "warm workers kept forked and isolated ahead of demand")
    max_concurrent: int = field(2, "programs running at once (about one per core)")
    max_queue: int = field(1024, "programs waiting for a worker at most; beyond it Execute gets RESOURCE_EXHAUSTED")
    max_programs: int = field(256, "programs per Execute call at most")
    max_code_bytes: int = field(256 * 1024, "size of one program at most")
    wall_seconds: float = field(5.0, "default wall-time limit of one program")
    memory_bytes: int = field(256 * MiB, "default memory limit (address space added on top of the warm worker)")
    output_bytes: int = field(64 * 1024, "default cap on stdout + stderr of one program")
    file_bytes: int = field(16 * MiB, "largest file a program may write in its scratch directory")
    disk_bytes: int = field(64 * MiB, "disk cap of one run: bytes in its scratch directory in all (beyond it the "
                            "run is ended, failure KILLED); a tmpfs of this size where the fork server may mount")
    disk_files: int = field(1024, "disk cap of one run: files and directories in its scratch directory")
    max_wall_seconds: float = field(60.0, "largest wall-time limit a request may ask for")
    max_memory_bytes: int = field(4096 * MiB, "largest memory limit a request may ask for")
    max_output_bytes: int = field(16 * MiB, "largest output cap a request may ask for")
    layers: list = field(list(LAYERS), "isolation layers to use where they work (rlimits, namespaces, "
                         "pidns, unprivileged, landlock, seccomp)")
    require_layers: list = field(["rlimits", "seccomp"], "layers without which the service refuses to start")
    allow_unisolated: bool = field(False, "start even when no active layer set hides other processes (landlock, or "
                                   "pidns with seccomp or unprivileged): programs could then read the service's "
                                   "environment and memory; for debugging only")
    scratch_root: str = field("", "directory for per-execution scratch directories (default: the system temp dir)")
    start_timeout: float = field(120.0, "seconds to wait for the warm pool at start")
    log_level: str = field("INFO", "logging level")

    def validate(self) -> None:
        self.validate_security()
        for name in ("pool_size", "max_concurrent", "max_programs", "max_code_bytes", "memory_bytes",
                     "output_bytes", "file_bytes", "disk_bytes", "disk_files"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_queue < 0:
            raise ConfigError("max_queue must be >= 0")
        if self.max_programs > self.max_concurrent + self.max_queue:
            raise ConfigError("max_programs must not exceed max_concurrent + max_queue (a batch must fit when idle)")
        if not 0 < self.wall_seconds <= self.max_wall_seconds:
            raise ConfigError("wall_seconds must be in (0, max_wall_seconds]")
        if self.memory_bytes > self.max_memory_bytes or self.output_bytes > self.max_output_bytes:
            raise ConfigError("default limits must not exceed the max_* limits")
        unknown = (set(self.layers) | set(self.require_layers)) - set(LAYERS)
        if unknown:
            raise ConfigError(f"unknown isolation layers {sorted(unknown)}; known: {', '.join(LAYERS)}")
        missing = set(self.require_layers) - set(self.layers)
        if missing:
            raise ConfigError(f"required layers {sorted(missing)} are not in layers")
