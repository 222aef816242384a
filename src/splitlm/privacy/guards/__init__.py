"""Server-side guards (``privacy.guards``): SafeSplit's check of each client's change to the trunk adapter
and to its client side.

``base`` holds the ``Guard`` interface and its registry, which names the built-in guards' modules (``safesplit``);
importing this package registers nothing.
"""

from splitlm.privacy.guards.base import GUARDS, Guard, build_guards

__all__ = ["GUARDS", "Guard", "build_guards"]
