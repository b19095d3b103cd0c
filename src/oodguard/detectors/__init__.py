"""Detector library: ``create(name, **params)``, ``available()``, ``info(name)``, ``load(dir)``.

Every detector returns scores where **higher = more likely out-of-distribution**.
"""

from oodguard.detectors.base import (
    Detector,
    NotFittedError,
    OutputDetector,
    Source,
    available,
    clone,
    create,
    implementation,
    info,
    load,
    needs_model,
    protocol,
    register,
)

# Importing the modules registers their detectors.
from oodguard.detectors import logits, openset, distance, subspace, shaping, head, gram, zeroshot  # noqa: E402,F401  isort: skip
from oodguard.detectors import autoencoder, bam, early_exit, evidential, ocs, sdm  # noqa: E402,F401  isort: skip
from oodguard.detectors import information_geometry, pnml, rectification, relation, relative_feature  # noqa: E402,F401  isort: skip
from oodguard.detectors import posterior, normalized_distance, collapse  # noqa: E402,F401  isort: skip
from oodguard.detectors import mixture, prototype_gradient, weight_perturbation  # noqa: E402,F401  isort: skip
from oodguard.detectors import model  # noqa: E402,F401  isort: skip
from oodguard.detectors import ahm  # noqa: E402,F401  isort: skip
from oodguard.detectors.distributed import fit_distributed, score_distributed  # noqa: E402  isort: skip

__all__ = [
    "Detector",
    "NotFittedError",
    "OutputDetector",
    "Source",
    "available",
    "clone",
    "create",
    "fit_distributed",
    "implementation",
    "info",
    "protocol",
    "load",
    "needs_model",
    "register",
    "score_distributed",
]
