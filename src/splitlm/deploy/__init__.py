"""Deployment: the same run with its parties in other processes, machines or Ray actors.

- ``serve`` / ``agent``: ``splitlm serve`` hosts the trunk and the aggregator; each ``splitlm client`` holds its
  parts and data and answers the server's commands over one gRPC stream.
- ``ray``: the server and each client as Ray actors (``transport.name=ray``).
- ``remote``: the orchestrator's proxies of clients that run elsewhere.

``launch`` runs a config wherever its ``transport.name`` says.
"""

from __future__ import annotations

from typing import Any

from splitlm.config import Config


def launch(config: Config, resume: bool = False, started: float | None = None) -> dict[str, Any]:
    """Train as ``config`` says: in this process, or with Ray actors (``transport.name=ray``)."""
    if config.transport.name == "ray":
        from splitlm.deploy.ray import run_ray

        return run_ray(config, resume, started)
    from splitlm.frameworks import run_framework

    return run_framework(config, resume, started)


__all__ = ["launch"]
