"""Model detectors: they run the model themselves (input perturbations, gradients through inner layers, test-time
views) through a :class:`~oodguard.extraction.ModelRunner`. Importing the modules registers their detectors."""

from oodguard.detectors.model import (  # noqa: F401
    cover,
    features,
    gradient,
    images,
    iodin,
    mc_dropout,
    nac_layers,
    rankfeat,
    rotation,
)
