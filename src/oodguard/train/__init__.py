"""Training-time OOD methods as composable parts: losses, outlier samplers, architecture changes, a training loop.

Methods (spec part A): Outlier Exposure (``oe``), energy-bounded fine-tuning (``energy``), MixOE (``mixoe``,
mixup and cutmix), DOS (``dos``), LogitNorm (``logitnorm``) and AbeT (``abet``). Each is a ``Method`` built
from a loss (``losses``), an outlier sampler (``samplers``) and, where the method changes the model, a head
(``heads``); ``train`` runs any of them on any ``torch.nn.Module`` and DataLoaders, seeded, with checkpoints
saved as safetensors.

Examples
--------
>>> import torch
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from oodguard.train import Recipe, create_method, train
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> id_loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
>>> outliers = DataLoader(TensorDataset(torch.randn(64, 4) * 3), batch_size=16)
>>> result = train(model, id_loader, create_method("oe"), outliers, recipe=Recipe(epochs=2), progress=False)
>>> len(result.epoch_losses)
2
"""

from oodguard.train.checkpoint import load_checkpoint, save_checkpoint
from oodguard.train.heads import LearnedTemperatureHead, RotationNet, add_absent_class, install_abet_head
from oodguard.train.loop import TrainResult, train
from oodguard.train.losses import (
    AbsentCategoryLoss,
    EnergyMarginLoss,
    LogitNormLoss,
    MixOELoss,
    OutlierExposureLoss,
    free_energy,
    soft_cross_entropy,
    uniform_cross_entropy,
)
from oodguard.train.methods import (
    DOS,
    METHODS,
    AbeT,
    CutMix,
    EnergyFineTune,
    LabelSmoothing,
    LogitNorm,
    Method,
    MixOE,
    Mixup,
    OutlierExposure,
    Recipe,
    Rotation,
    auto_margins,
    create_method,
)
from oodguard.train.mixing import mix_outliers, rand_bbox, sample_lambda
from oodguard.train.samplers import DiverseOutlierSampler, TakeAll, dos_candidate_size, kmeans
from oodguard.train.scores import absent_class_score

__all__ = [
    "AbeT", "AbsentCategoryLoss", "CutMix", "DOS", "LabelSmoothing", "Mixup", "DiverseOutlierSampler",
    "EnergyFineTune", "EnergyMarginLoss",
    "absent_class_score",
    "LearnedTemperatureHead", "LogitNorm", "LogitNormLoss", "METHODS", "Method", "MixOE", "MixOELoss",
    "OutlierExposure", "OutlierExposureLoss", "Recipe", "Rotation", "RotationNet",
    "TakeAll", "TrainResult", "add_absent_class", "auto_margins",
    "create_method", "dos_candidate_size", "free_energy", "install_abet_head", "kmeans", "load_checkpoint",
    "mix_outliers", "rand_bbox", "sample_lambda", "save_checkpoint", "soft_cross_entropy", "train",
    "uniform_cross_entropy",
]  # fmt: skip
