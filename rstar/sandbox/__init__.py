"""The sandbox domain: run untrusted Python in isolated one-shot workers, under limits.

- `pool`: `Sandbox`, the service-side handle (admission, batches, deadlines,
  metrics, restarts of the fork server);
- `config`: `SandboxConfig`;
- `protocol`: the frames and messages between the pool, the fork server and a worker;
- `forkserver`: the fork-server process (warm pool, fork, reap, limits from outside);
- `child`: what runs inside one forked worker (enter isolation, run one program, exit);
- `isolation`: the isolation layers (rlimits, namespaces, pidns, unprivileged, Landlock, seccomp);
- `scratch`: per-run scratch directories and their disk cap (tmpfs, or scanned).

No gRPC: `sandbox_svc` serves it, the trainer runs it in-process."""
