"""rstar: the shared package of the rStar-Math service system.

Holds what every service needs and nothing service-specific: configuration,
the step format and grading, the object store and model registry, gRPC server
scaffolding, metrics, and the `rstar` CLI. The generated gRPC stubs live in
`rstar.v1` (compiled from `proto/rstar/v1/*.proto`).
"""

__version__ = "0.1.0"
