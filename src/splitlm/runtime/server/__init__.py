"""The server runtime: steps 4 and 8 (trunk forward and backward), and the loss in a vanilla split.

``SplitServer`` (``facade.py``) composes the router with its adapter bank (``router.py``), the worker and its
queue (``worker.py``) and the request handlers (``handlers.py``); merged passes (``merge.py``) are a ``TrunkMod``
the handlers are given. ``ServerSurface`` (``surface.py``) is what recipes, the driver and remote proxies call.
"""

from splitlm.runtime.server.facade import SplitServer
from splitlm.runtime.server.handlers import TrunkMod
from splitlm.runtime.server.merge import MergedPasses
from splitlm.runtime.server.router import OptimizerFactory, Route
from splitlm.runtime.server.surface import ServerSurface

__all__ = ["MergedPasses", "OptimizerFactory", "Route", "ServerSurface", "SplitServer", "TrunkMod"]
