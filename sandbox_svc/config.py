"""SandboxService configuration (env prefix RSTAR_SANDBOX_): the pool's settings plus serving.

The fields live with the pool they configure (`rstar.sandbox.config`), because the
trainer runs the same pool in-process; this module is the service's name for them.
"""

from rstar.sandbox.config import SandboxConfig

__all__ = ["SandboxConfig"]
