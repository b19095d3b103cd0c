"""Running a model: one forward pass per dataset into :class:`~oodguard.outputs.ModelOutputs` (``extract``, cached
by fingerprints of the model and the data), the :class:`ModelRunner` that model detectors use for gradients
through the network, and the data loaders (arrays, image folders, image lists, CIFAR files)."""

from oodguard.extraction.data import ArrayDataset, ImageFolder, ImageList, Normalize, Resize, load_image
from oodguard.extraction.extract import content_hash, extract, find_head, model_fingerprint
from oodguard.extraction.model_runner import FEATURES, GradientBatch, ModelRunner

__all__ = [
    "FEATURES",
    "ArrayDataset",
    "GradientBatch",
    "ImageFolder",
    "ImageList",
    "ModelRunner",
    "Normalize",
    "Resize",
    "content_hash",
    "extract",
    "find_head",
    "load_image",
    "model_fingerprint",
]
