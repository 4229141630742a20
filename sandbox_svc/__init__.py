"""sandbox_svc: SandboxService, untrusted Python run in a warm pool of isolated workers (docs/sandbox.md)."""
