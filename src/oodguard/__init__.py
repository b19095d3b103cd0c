"""oodguard: out-of-distribution detection for trained models.

Score convention everywhere: higher = more likely out-of-distribution.
"""

from . import detectors, metrics
from .outputs import ModelOutputs

__version__ = "0.1.0"
__all__ = ["ModelOutputs", "detectors", "metrics", "__version__"]
