"""oodguard: out-of-distribution detection for trained models.

Score convention everywhere: higher = more likely out-of-distribution.
"""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from oodguard import detectors, metrics  # noqa: E402
from oodguard.guard import Guard, load_guard  # noqa: E402
from oodguard.outputs import ModelOutputs  # noqa: E402

__all__ = ["Guard", "ModelOutputs", "detectors", "evaluate_model", "load_guard", "metrics", "__version__"]


def evaluate_model(*args: Any, **kwargs: Any) -> Any:
    """Every detector on your model and data: see :func:`oodguard.benchmark.custom.evaluate_model`."""
    from oodguard.benchmark.custom import evaluate_model as run

    return run(*args, **kwargs)
