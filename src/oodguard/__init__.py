"""oodguard: out-of-distribution detection for trained models.

Score convention everywhere: higher = more likely out-of-distribution.
"""

__version__ = "0.1.0"

from oodguard import detectors, metrics  # noqa: E402
from oodguard.guard import Guard, load_guard  # noqa: E402
from oodguard.outputs import ModelOutputs  # noqa: E402

__all__ = ["Guard", "ModelOutputs", "detectors", "load_guard", "metrics", "__version__"]
