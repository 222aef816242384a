"""Frameworks: the order of pipeline steps across clients and rounds, each a short recipe in its own module.

Importing this package registers the built-ins in ``FRAMEWORKS``; ``run_framework`` trains in-process
(``splitlm.deploy.launch`` also covers Ray and networked runs).
"""

from splitlm.frameworks import centralized, gsfl, psl, sflv1, sflv2, sl  # noqa: F401  (register the built-ins)
from splitlm.frameworks.base import FRAMEWORKS, Framework, config_problems, framework_of, register
from splitlm.frameworks.driver import run_framework

__all__ = ["FRAMEWORKS", "Framework", "config_problems", "framework_of", "register", "run_framework"]
