"""Non-IID remedies (survey §3), one module each, registered in ``REMEDIES`` and configured under ``remedies``.

Importing the package imports every module in it, so each built-in remedy registers itself; a remedy of your own
registers itself from its own module (``@REMEDIES.component``)."""

import importlib
import pkgutil

from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy, RoundRows, build_remedies

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REMEDIES", "ClientSetup", "Remedy", "RoundRows", "build_remedies"]
