"""Training methods as compositions of parts: an architecture change, an outlier sampler and a loss.

A ``Method`` says whether it needs auxiliary outliers, how it changes the model before training (``prepare``),
which sampler picks the outliers of a step, how a step's loss is computed from the model and the batches, and
which registered detector is its own test score. ``Recipe`` holds the optimiser settings; each method's
``official_recipe()`` gives the values of its official code (see docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from oodguard.train import heads
from oodguard.train.losses import (
    AbsentCategoryLoss,
    EnergyMarginLoss,
    LogitNormLoss,
    MixOELoss,
    OutlierExposureLoss,
    free_energy,
)
from oodguard.train.mixing import MIX_OPS, mix_outliers, sample_lambda
from oodguard.train.samplers import DiverseOutlierSampler, TakeAll

SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings: SGD with momentum, and a learning-rate schedule.

    ``cosine`` anneals per step from ``lr`` to ``lr_min``, an absolute rate: default 1e-6, as the official OE / energy /
    DOS code, whose ``LambdaLR`` multiplier ends at ``1e-6 / lr`` (the code that produced the published numbers; pass
    ``lr_min=1e-6 * lr`` for a relative floor, which differs by less than 1e-6 at every step). ``multistep`` multiplies
    by ``gamma`` after each fraction of the epochs in ``milestones``; ``constant`` keeps ``lr``. ``id_batch`` and
    ``outlier_batch`` are the official batch sizes, for the caller's loaders (the loop takes the loaders as given).
    """

    epochs: int = 10
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    lr_min: float = 1e-6
    milestones: tuple[float, ...] = (0.5, 0.75, 0.9)
    gamma: float = 0.1
    id_batch: int = 128
    outlier_batch: int = 256

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Recipe: {name} must be an integer >= {minimum}, got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Recipe: {name} must be a finite number, got {value!r}")
            return float(value)

        integer("epochs", 1)
        integer("id_batch", 1)
        integer("outlier_batch", 0)  # 0: the method uses no outliers
        if number("lr") <= 0:
            raise ValueError(f"Recipe: lr must be > 0, got {self.lr!r}")
        if not 0 <= number("momentum") < 1:
            raise ValueError(f"Recipe: momentum must lie in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"Recipe: nesterov must be True or False, got {self.nesterov!r}")
        if number("weight_decay") < 0:
            raise ValueError(f"Recipe: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if number("lr_min") < 0:
            raise ValueError(f"Recipe: lr_min must be >= 0, got {self.lr_min!r}")
        if self.schedule == "cosine" and self.lr_min > self.lr:  # lr_min is read by the cosine schedule only
            raise ValueError(f"Recipe: lr_min ({self.lr_min!r}) must be <= lr ({self.lr!r}) for the cosine schedule; "
                             "lower lr_min")  # fmt: skip
        if number("gamma") <= 0:
            raise ValueError(f"Recipe: gamma must be > 0 (the multistep factor), got {self.gamma!r}")
        milestones = self.milestones
        if not isinstance(milestones, (tuple, list)) or not all(
            not isinstance(m, bool) and isinstance(m, (int, float)) and 0 < m < 1 for m in milestones
        ) or any(b <= a for a, b in zip(milestones[:-1], milestones[1:], strict=True)):  # fmt: skip
            raise ValueError(f"Recipe: milestones must be strictly increasing fractions of the epochs in (0, 1), "
                             f"e.g. (0.5, 0.75, 0.9), got {milestones!r}")  # fmt: skip
        object.__setattr__(self, "milestones", tuple(float(m) for m in milestones))  # a list from JSON: hashable

    def learning_rate(self, step: int, epoch: int, total_steps: int) -> float:
        """The learning rate of a step (0-based ``step`` of ``total_steps``, 0-based ``epoch``)."""
        if self.schedule == "cosine":
            cosine = 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))
            return self.lr_min + (self.lr - self.lr_min) * cosine
        if self.schedule == "multistep":
            passed = sum(epoch >= int(self.epochs * fraction) for fraction in self.milestones)
            return self.lr * self.gamma**passed
        return self.lr


class Method:
    """A training method: ``prepare`` the model, pick outliers with ``sampler``, compute ``loss`` per step.

    Class attributes: ``name``; ``needs_outliers``; ``score`` (the method's own test score, higher = more OOD: a
    registered detector's name, or ``"absent-class"`` for ``scores.absent_class_score``); ``paper``; ``code``.
    """

    name: ClassVar[str] = ""
    needs_outliers: ClassVar[bool] = True
    score: ClassVar[str] = "msp"
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""

    def __init__(self) -> None:
        self.sampler: Any = TakeAll()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Change the architecture before training (default: none). May return a new module."""
        return model

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        outliers: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, inputs, labels, outliers, ...)")

    def config(self) -> dict[str, Any]:
        """The hyperparameters (JSON-serialisable), for cache keys and checkpoints."""
        return {"name": self.name}

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"


def _joint_logits(model: nn.Module, inputs: torch.Tensor, outliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over the concatenated ID and outlier batches (as the official OE/energy/DOS code)."""
    logits = model(torch.cat([inputs, outliers.to(inputs.dtype)]))
    return logits[: inputs.shape[0]], logits[inputs.shape[0] :]


def _require_outliers(method: Method, outliers: torch.Tensor | None) -> torch.Tensor:
    if outliers is None or outliers.shape[0] == 0:
        raise ValueError(f"{method.name} trains with auxiliary outliers; pass an outlier_loader")
    return outliers


class OutlierExposure(Method):
    """Outlier Exposure (``OutlierExposureLoss``, weight 0.5); test score MSP. Fine-tuning recipe of
    ``oe_tune.py``: 10 epochs, lr 1e-3, SGD Nesterov, weight decay 5e-4, cosine, ID batch 128, OE batch 256.

    Paper: Hendrycks, Mazeika & Dietterich, ICLR 2019. Code: hendrycks/outlier-exposure ``CIFAR/oe_tune.py``.
    """

    name = "oe"
    score = "msp"
    paper = "Hendrycks, Mazeika & Dietterich, ICLR 2019"
    code = "hendrycks/outlier-exposure CIFAR/oe_tune.py"

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.criterion = OutlierExposureLoss(weight)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.criterion.weight}

    def loss(self, model, inputs, labels, outliers, generator):
        logits_in, logits_out = _joint_logits(model, inputs, _require_outliers(self, outliers))
        return self.criterion(logits_in, labels, logits_out)


class EnergyFineTune(Method):
    """Energy-bounded fine-tuning (``EnergyMarginLoss``: margins ``m_in``, ``m_out``, weight 0.1); test score energy.

    Defaults: the CIFAR-10 margins of the official ``run.sh`` (-23, -5); they depend on the model, so use
    ``auto_margins`` for another one. Recipe as OE's fine-tuning (10 epochs, lr 1e-3, batches 128 + 256).

    Paper: Liu, Wang, Owens & Li, NeurIPS 2020. Code: wetliu/energy_ood ``CIFAR/train.py``, ``CIFAR/run.sh``.
    """

    name = "energy"
    score = "energy"
    paper = "Liu, Wang, Owens & Li, NeurIPS 2020"
    code = "wetliu/energy_ood CIFAR/train.py, CIFAR/run.sh"

    def __init__(self, m_in: float = -23.0, m_out: float = -5.0, weight: float = 0.1) -> None:
        super().__init__()
        self.criterion = EnergyMarginLoss(m_in, m_out, weight)

    def config(self) -> dict[str, Any]:
        c = self.criterion
        return {"name": self.name, "m_in": c.m_in, "m_out": c.m_out, "weight": c.weight}

    def loss(self, model, inputs, labels, outliers, generator):
        logits_in, logits_out = _joint_logits(model, inputs, _require_outliers(self, outliers))
        return self.criterion(logits_in, labels, logits_out)


@torch.no_grad()
def auto_margins(
    model: nn.Module, id_batches: Any, outlier_batches: Any, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Energy margins from a pretrained model: ``(mean ID energy, mean outlier energy)``.

    The authors' advice for a new model (energy_ood issue #21: set ``m_in`` and ``m_out`` near the average ID
    and outlier energies; "Average is fine"). ``id_batches`` / ``outlier_batches``: iterables of input tensors or
    of ``(inputs, ...)`` tuples. The model's train/eval mode is restored.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        means = []
        for batches, what in ((id_batches, "id_batches"), (outlier_batches, "outlier_batches")):
            total, count = 0.0, 0
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                energies = free_energy(model(inputs.to(device)).to(torch.float64))
                total, count = total + float(energies.sum()), count + energies.numel()
            if count == 0:
                raise ValueError(f"{what} is empty; pass at least one batch")
            means.append(total / count)
    finally:
        for module, training in modes:
            module.training = training
    m_in, m_out = means
    if not m_in < m_out:
        raise ValueError(
            f"the model's mean ID energy ({m_in:.3f}) is not below its mean outlier energy ({m_out:.3f}); energy "
            "fine-tuning needs m_in < m_out, so pass margins by hand"
        )
    return m_in, m_out


class MixOE(Method):
    """Mixture Outlier Exposure: ID CE plus a soft CE on ID/outlier mixtures whose targets decay to uniform.

    ``mix_op``: ``"mixup"`` or ``"cutmix"`` (outlier patch pasted into the ID image). ``lam ~ Beta(mix_alpha,
    mix_beta)`` per batch; ``mix_beta`` defaults to ``mix_alpha`` (official ``Beta(alpha, alpha)``). Defaults per
    variant from the paper's ``scripts/train.sh``: mixup ``mix_alpha = 1``, cutmix ``mix_alpha = 2``, both with
    ``oe_weight = 5`` (the argparse defaults 1/1 and OpenOOD's ``Beta(0.1, 1)`` with weight 1 are alternatives).
    Test score MSP. Two forward passes per step (ID, mixed); an outlier batch shorter than the ID batch is
    extended by repeating its rows. Recipe: 10 epochs, lr 1e-3, weight decay 1e-5, SGD
    Nesterov, cosine, batches 32 + 32.

    Paper: Zhang, Inkawhich, Linderman, Chen & Li, WACV 2023. Code: zjysteven/MixOE ``train/train_mixoe.py``.
    """

    name = "mixoe"
    score = "msp"
    paper = "Zhang, Inkawhich, Linderman, Chen & Li, WACV 2023"
    code = "zjysteven/MixOE train/train_mixoe.py, scripts/train.sh"
    PAPER_ALPHA = {"mixup": 1.0, "cutmix": 2.0}

    def __init__(
        self, mix_op: str = "mixup", mix_alpha: float | None = None, mix_beta: float | None = None,
        oe_weight: float = 5.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if mix_op not in MIX_OPS:
            raise ValueError(f"mix_op must be one of {MIX_OPS}, got {mix_op!r}")
        self.mix_op = mix_op
        self.mix_alpha = float(self.PAPER_ALPHA[mix_op] if mix_alpha is None else mix_alpha)
        self.mix_beta = float(self.mix_alpha if mix_beta is None else mix_beta)
        if not all(math.isfinite(v) and v > 0 for v in (self.mix_alpha, self.mix_beta)):
            raise ValueError(f"mix_alpha and mix_beta must be > 0, got {self.mix_alpha} and {self.mix_beta}")
        self.criterion = MixOELoss(oe_weight)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "mix_op": self.mix_op, "mix_alpha": self.mix_alpha, "mix_beta": self.mix_beta,
                "oe_weight": self.criterion.oe_weight}  # fmt: skip

    def loss(self, model, inputs, labels, outliers, generator):
        outliers = _require_outliers(self, outliers).to(inputs.dtype)
        if outliers.shape[0] < inputs.shape[0]:  # a short last batch: repeat it (OpenOOD refreshes the loader)
            outliers = outliers.repeat_interleave(-(-inputs.shape[0] // outliers.shape[0]), dim=0)
        lam = sample_lambda(self.mix_alpha, self.mix_beta, generator)
        mixed, lam = mix_outliers(inputs, outliers, self.mix_op, lam, generator)
        return self.criterion(model(inputs), labels, model(mixed), lam)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(weight_decay=1e-5, id_batch=32, outlier_batch=32)


class DOS(Method):
    """Diverse Outlier Sampling: a (K+1)-way model, per-step ``DiverseOutlierSampler``, ``AbsentCategoryLoss``.

    ``prepare`` adds the absent-class output (``heads.add_absent_class``). Test score: the absent-class
    probability (``scores.absent_class_score``: ``p_{K+1}``, i.e. the paper's ``1 - p_{K+1}`` in the OOD direction).
    Official recipe: from scratch, 100 epochs, lr 0.1, weight decay 1e-4, SGD Nesterov, multistep at
    [0.5, 0.75, 0.9] of the epochs, batch 64, candidates 384, k = 64, n_init = 5, beta = 1.

    Paper: Jiang, Cheng, Chen, Wang & Wei, ICLR 2024. Code: lygjwy/DOS ``train_diverse.py``, ``detect.py``.
    """

    name = "dos"
    score = "absent-class"
    paper = "Jiang, Cheng, Chen, Wang & Wei, ICLR 2024"
    code = "lygjwy/DOS train_diverse.py, detect.py"

    def __init__(
        self, weight: float = 1.0, num_keep: int = 64, num_clusters: int = 64, n_init: int = 5,
        head_name: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.criterion = AbsentCategoryLoss(weight)
        self.head_name = head_name
        self.sampler = DiverseOutlierSampler(num_keep, num_clusters, n_init, head_name=head_name)

    def config(self) -> dict[str, Any]:
        s = self.sampler
        return {"name": self.name, "weight": self.criterion.weight, "num_keep": s.num_keep,
                "num_clusters": s.num_clusters, "n_init": s.n_init}  # fmt: skip

    def prepare(self, model: nn.Module) -> nn.Module:
        return heads.add_absent_class(model, self.head_name)

    def loss(self, model, inputs, labels, outliers, generator):
        logits_in, logits_out = _joint_logits(model, inputs, _require_outliers(self, outliers))
        return self.criterion(logits_in, labels, logits_out)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(epochs=100, lr=0.1, weight_decay=1e-4, schedule="multistep", id_batch=64, outlier_batch=384)


class LogitNorm(Method):
    """LogitNorm: ``LogitNormLoss`` (tau 0.04) instead of CE, no outliers; test score MSP on the raw logits.

    Official recipe (OpenOOD ``train_logitnorm.yml``): 100 epochs from scratch, lr 0.1, SGD Nesterov, weight
    decay 5e-4, cosine to 1e-6, batch 128.

    Paper: Wei, Xie, Cheng, Feng, An & Li, ICML 2022. Code: hongxin001/logitnorm_ood ``common/loss_function.py``.
    """

    name = "logitnorm"
    needs_outliers = False
    score = "msp"
    paper = "Wei, Xie, Cheng, Feng, An & Li, ICML 2022"
    code = "hongxin001/logitnorm_ood common/loss_function.py"

    def __init__(self, tau: float = 0.04) -> None:
        super().__init__()
        self.criterion = LogitNormLoss(tau)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "tau": self.criterion.tau}

    def loss(self, model, inputs, labels, outliers, generator):
        return self.criterion(model(inputs), labels)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(epochs=100, lr=0.1, weight_decay=5e-4, outlier_batch=0)


class AbeT(Method):
    """AbeT: a learned-temperature cosine head (``heads.LearnedTemperatureHead``) trained with plain CE, no outliers.

    Test score: the ablated energy ``-LSE(c(x) / T(x))``, i.e. the registered ``energy`` detector on this model's
    logits. Official recipe (``main.py``): SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 64, 200 epochs,
    multistep at [100, 150, 180] (= [0.5, 0.75, 0.9] of the epochs), gamma 0.1.

    Paper: LeVine et al., arXiv 2401.12129, 2024. Code: anonymousoodauthor/abet ``nets.py``, ``main.py``.
    """

    name = "abet"
    needs_outliers = False
    score = "energy"
    paper = "LeVine, Pikus, Phillips, Norman, Amat Gil & Hendryx, arXiv 2401.12129"
    code = "anonymousoodauthor/abet nets.py, main.py"

    def __init__(self, head_name: str | None = None) -> None:
        super().__init__()
        self.head_name = head_name

    def prepare(self, model: nn.Module) -> nn.Module:
        return heads.install_abet_head(model, self.head_name)

    def loss(self, model, inputs, labels, outliers, generator):
        return F.cross_entropy(model(inputs), labels)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(epochs=200, lr=0.1, nesterov=False, weight_decay=1e-4, schedule="multistep", id_batch=64,
                      outlier_batch=0)  # fmt: skip


class LabelSmoothing(Method):
    """Label smoothing: cross-entropy against ``(1 - eps) onehot(y) + eps / K``; no outliers; test score MSP.

    ``eps = 0`` is plain cross-entropy (tested). Default ``eps = 0.1`` (Szegedy et al.; the value the
    regularisation study evaluates). Recipe: as mixup's official CIFAR recipe (200 epochs, lr 0.1, weight decay
    1e-4, multistep at 50 % and 75 %, batch 128), the study training every regulariser the same way.

    Papers: Szegedy, Vanhoucke, Ioffe, Shlens & Wojna, "Rethinking the Inception Architecture for Computer Vision",
    CVPR 2016; evaluated for robustness and uncertainty by Chun, Oh, Yun, Han, Choe & Yoo, "An Empirical Evaluation
    on Robustness and Uncertainty of Regularization Methods", ICML 2019 workshops (arXiv 1906.02900).
    """

    name = "label_smoothing"
    needs_outliers = False
    score = "msp"
    paper = "Szegedy et al., CVPR 2016; Chun et al., arXiv 1906.02900, 2019"
    code = "torch.nn.functional.cross_entropy(label_smoothing=eps)"

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"label_smoothing: eps must lie in [0, 1), got {eps!r}")
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}

    def loss(self, model, inputs, labels, outliers, generator):
        return F.cross_entropy(model(inputs), labels, label_smoothing=self.eps)

    @staticmethod
    def official_recipe() -> Recipe:
        return _MIXUP_RECIPE


#: facebookresearch/mixup-cifar10 ``train.py``: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 200 epochs,
#: the learning rate divided by 10 at epochs 100 and 150.
_MIXUP_RECIPE = Recipe(epochs=200, lr=0.1, nesterov=False, weight_decay=1e-4, schedule="multistep",
                       milestones=(0.5, 0.75), id_batch=128, outlier_batch=0)  # fmt: skip


class _PairMixing(Method):
    """Mixes each ID image with another of the same batch (a seeded permutation) and mixes their labels' losses:
    ``lam * CE(f(x~), y) + (1 - lam) * CE(f(x~), y[perm])``, ``lam ~ Beta(alpha, alpha)`` per batch."""

    needs_outliers = False
    score = "msp"
    mix_op: ClassVar[str] = "mixup"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{self.name}: alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}

    def mixed_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The mixed inputs, the partner labels and the share ``lam`` of the original images."""
        perm = torch.randperm(inputs.shape[0], generator=generator)
        lam = sample_lambda(self.alpha, self.alpha, generator)
        mixed, lam = mix_outliers(inputs, inputs[perm], self.mix_op, lam, generator)
        return mixed, labels[perm], lam

    def loss(self, model, inputs, labels, outliers, generator):
        mixed, partner, lam = self.mixed_batch(inputs, labels, generator)
        logits = model(mixed)
        return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partner)


class Mixup(_PairMixing):
    """mixup: convex combinations of image pairs and of their labels (``alpha`` 1, the CIFAR default); test score
    MSP. Official recipe: ``_MIXUP_RECIPE``.

    Paper: Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018. Code:
    facebookresearch/mixup-cifar10 ``train.py`` (``mixup_data``, ``mixup_criterion``).
    """

    name = "mixup"
    mix_op = "mixup"
    paper = "Zhang, Cisse, Dauphin & Lopez-Paz, ICLR 2018"
    code = "facebookresearch/mixup-cifar10 train.py"

    @staticmethod
    def official_recipe() -> Recipe:
        return _MIXUP_RECIPE


class CutMix(_PairMixing):
    """CutMix: a box of another image of the batch pasted in (side ``sqrt(1 - lam)`` of the image, ``lam ~
    Beta(1, 1)``), the labels mixed by the pasted area; applied to every batch (``cutmix_prob`` 1, the ImageNet
    setting; the CIFAR runs use 0.5); test score MSP.

    Official recipe (CIFAR, PyramidNet): SGD lr 0.25, momentum 0.9, weight decay 1e-4, batch 64, 300 epochs, the
    learning rate divided by 10 at 50 % and 75 %.

    Paper: Yun, Han, Oh, Chun, Choe & Yoo, "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", ICCV 2019. Code: clovaai/CutMix-PyTorch ``train.py`` (``rand_bbox``).
    """

    name = "cutmix"
    mix_op = "cutmix"
    paper = "Yun, Han, Oh, Chun, Choe & Yoo, ICCV 2019"
    code = "clovaai/CutMix-PyTorch train.py"

    def __init__(self, alpha: float = 1.0, cutmix_prob: float = 1.0) -> None:
        super().__init__(alpha)
        if isinstance(cutmix_prob, bool) or not isinstance(cutmix_prob, (int, float)) or not 0 < cutmix_prob <= 1:
            raise ValueError(f"cutmix: cutmix_prob must lie in (0, 1], got {cutmix_prob!r}")
        self.cutmix_prob = float(cutmix_prob)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "cutmix_prob": self.cutmix_prob}

    def loss(self, model, inputs, labels, outliers, generator):
        if self.cutmix_prob < 1 and float(torch.rand(1, generator=generator)) >= self.cutmix_prob:
            return F.cross_entropy(model(inputs), labels)
        return super().loss(model, inputs, labels, outliers, generator)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(epochs=300, lr=0.25, weight_decay=1e-4, schedule="multistep", milestones=(0.5, 0.75),
                      id_batch=64, outlier_batch=0)  # fmt: skip


class Rotation(Method):
    """Self-supervised rotation prediction beside the classifier: ``CE(f(x), y) + weight * CE(r(R_k x), k)`` over
    the four rotations ``k`` of every image, ``r`` a 4-way linear head on the penultimate features
    (``heads.RotationNet``, added by ``prepare``); no outliers. Own test score: the registered ``rotation``
    detector (the rotation loss minus the divergence of the class prediction from uniform).

    ``weight`` 1: the released run (``snapshots/training_command.txt``: rotation only, ``rot_loss_weight`` 3, divided
    by the 3 auxiliary tasks of the training script). Official recipe: 200 epochs, lr 0.1, SGD Nesterov, weight
    decay 5e-4, cosine, batch 128.

    Paper: Hendrycks, Mazeika, Kadavath & Song, "Using Self-Supervised Learning Can Improve Model Robustness and
    Uncertainty", NeurIPS 2019. Code: hendrycks/ss-ood ``multiclass_ood/train_auxiliary.py``,
    ``test_auxiliary_ood.py``.
    """

    name = "rotation"
    needs_outliers = False
    score = "rotation"
    paper = "Hendrycks, Mazeika, Kadavath & Song, NeurIPS 2019"
    code = "hendrycks/ss-ood multiclass_ood/train_auxiliary.py, test_auxiliary_ood.py"

    def __init__(self, weight: float = 1.0, head_name: str | None = None) -> None:
        super().__init__()
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight >= 0)
        ):
            raise ValueError(f"rotation: weight must be >= 0, got {weight!r}")
        self.weight = float(weight)
        self.head_name = head_name

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight}

    def prepare(self, model: nn.Module) -> nn.Module:
        return heads.RotationNet(model, self.head_name)

    def loss(self, model, inputs, labels, outliers, generator):
        if not isinstance(model, heads.RotationNet):
            raise ValueError("rotation: train the model that prepare() returned (it carries the rotation head)")
        turned, targets = heads.rotations(inputs)
        logits, rotation_logits = model.logits_and_rotation(turned)
        classification = F.cross_entropy(logits[: inputs.shape[0]], labels)
        return classification + self.weight * F.cross_entropy(rotation_logits, targets)

    @staticmethod
    def official_recipe() -> Recipe:
        return Recipe(epochs=200, lr=0.1, weight_decay=5e-4, id_batch=128, outlier_batch=0)


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (OutlierExposure, EnergyFineTune, MixOE, DOS, LogitNorm, AbeT, LabelSmoothing, Mixup, CutMix, Rotation)
}


def create_method(name: str, **params: Any) -> Method:
    """A method by name (``oe``, ``energy``, ``mixoe``, ``dos``, ``logitnorm``, ``abet``, ``label_smoothing``,
    ``mixup``, ``cutmix``, ``rotation``) with its parameters."""
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; available: {', '.join(METHODS)}")
    try:
        return METHODS[name](**params)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from error


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """``Recipe`` as a JSON-ready dict."""
    values = asdict(recipe)
    values["milestones"] = list(values["milestones"])
    return values
