"""The sandbox domain: a warm pool of isolated one-shot workers that run untrusted
Python under limits (`pool`), the isolation layers (`isolation`) and the fork server
(`zygote`). No gRPC: `sandbox_svc` serves it, the trainer runs it in-process."""
