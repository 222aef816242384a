"""Built-in detectors of a malicious server; importing this package registers them by name."""

from splitlm.privacy.detectors.base import DETECTORS, Detector, DetectorContext, build_detectors

# isort: split
# Each built-in detector module registers itself on import.
from splitlm.privacy.detectors import scrutinizer, splitguard, splitout  # noqa: F401

__all__ = ["DETECTORS", "Detector", "DetectorContext", "build_detectors"]
