"""Training losses for OOD detection, as small ``nn.Module`` objects over logits.

Every loss takes the logits of the in-distribution batch and its labels, and (where the method uses them) the
logits of the auxiliary outliers, and returns a scalar to minimise. They are pure functions of their inputs and
hyperparameters, so they compose with any model and training loop. Formulas follow the papers and official code
of the training-time methods (OE, energy-bounded fine-tuning, MixOE, DOS, LogitNorm); AbeT trains with plain
cross-entropy on its learned-temperature logits (see ``heads.LearnedTemperatureHead``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _check_logits(logits: torch.Tensor, name: str, min_classes: int = 2) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a [batch, classes] tensor, got {shape}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{name} must have at least {min_classes} classes, got {logits.shape[1]}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch of 0 rows); pass at least one row")


def _check_labels(labels: torch.Tensor, logits: torch.Tensor, classes: int) -> None:
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape [{logits.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes - 1}], got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")  # fmt: skip


def _finite_number(name: str, value: float, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and value < 0:
        # a negative weight would reward confident outliers: the opposite of the method
        raise ValueError(f"{name} must be >= 0 (0 switches the term off), got {value!r}")
    return float(value)


def check_mixing_share(lam: float | torch.Tensor, name: str = "lam") -> None:
    """``lam`` (a number or a tensor of them) is the ID share of a mixed sample: it must lie in [0, 1]."""
    values = torch.as_tensor(lam, dtype=torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or bool((values > 1).any()):
        shown = values.item() if values.numel() == 1 else f"values in [{float(values.min())}, {float(values.max())}]"
        raise ValueError(f"{name} is the ID share of the mixed sample and must lie in [0, 1], got {shown}")


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy from ``softmax(logits)`` to the uniform distribution: ``LSE(f) - mean_k f_k``."""
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k targets_k log softmax(logits)_k`` (MixOE's ``SoftCE``)."""
    _check_logits(logits, "logits")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """``E(x) = -LSE(f(x))`` per row (temperature 1); low energy = in-distribution."""
    return -torch.logsumexp(logits, dim=1)


class OutlierExposureLoss(nn.Module):
    """Outlier Exposure: ``CE(f(x_in), y) + weight * mean_j [LSE(f(x_out_j)) - mean_k f_k(x_out_j)]``.

    The bracket is the cross-entropy from the softmax of an outlier to the uniform distribution. Default
    ``weight = 0.5`` (hard-coded in the official ``oe_tune.py`` / ``oe_scratch.py``; OpenOOD ``lambda_oe: 0.5``).

    Paper: Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019.
    Code: hendrycks/outlier-exposure ``CIFAR/oe_tune.py``; OpenOOD ``openood/trainers/oe_trainer.py``.
    """

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = _finite_number("weight", weight, non_negative=True)

    def forward(self, logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_in, "logits_in")
        _check_logits(logits_out, "logits_out")
        _check_labels(labels, logits_in, logits_in.shape[1])
        return F.cross_entropy(logits_in, labels) + self.weight * uniform_cross_entropy(logits_out).mean()


class EnergyMarginLoss(nn.Module):
    """Energy-bounded learning: CE plus squared hinges that push ID energy below ``m_in``, outliers above ``m_out``.

    ``L = CE + weight * (mean_in relu(E(x_in) - m_in)^2 + mean_out relu(m_out - E(x_out))^2)``, ``E = -LSE(f)``.
    Defaults: the margins of the official ``CIFAR/run.sh`` for CIFAR-10 (``m_in = -23``, ``m_out = -5``; the
    argparse defaults -25/-7 did not produce the released checkpoints, so ``run.sh`` is followed) and
    ``weight = 0.1`` (hard-coded). Margins are model-dependent: ``auto_margins`` sets them from the mean ID and
    outlier energies of the pretrained model, as the authors advise (energy_ood issue #21).

    Paper: Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    Code: wetliu/energy_ood ``CIFAR/train.py``, ``CIFAR/run.sh``.
    """

    def __init__(self, m_in: float = -23.0, m_out: float = -5.0, weight: float = 0.1) -> None:
        super().__init__()
        self.m_in = _finite_number("m_in", m_in)
        self.m_out = _finite_number("m_out", m_out)
        self.weight = _finite_number("weight", weight, non_negative=True)
        if not self.m_in < self.m_out:
            raise ValueError(f"m_in must be below m_out (ID energies are pushed lower), got {m_in} >= {m_out}")

    def forward(self, logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_in, "logits_in")
        _check_logits(logits_out, "logits_out")
        _check_labels(labels, logits_in, logits_in.shape[1])
        hinge_in = F.relu(free_energy(logits_in) - self.m_in).pow(2).mean()
        hinge_out = F.relu(self.m_out - free_energy(logits_out)).pow(2).mean()
        return F.cross_entropy(logits_in, labels) + self.weight * (hinge_in + hinge_out)


class MixOELoss(nn.Module):
    """MixOE: ``CE(f(x_in), y) + oe_weight * SoftCE(f(x_mix), y_soft)`` with soft targets decaying to uniform.

    ``y_soft = lam * onehot(y) + (1 - lam) / K`` for the mixing coefficient ``lam`` of the mixed batch (see
    ``mixing.mix_outliers``). The name ``oe_weight`` avoids the clash between the official ``--beta`` (this
    weight) and OpenOOD's ``beta`` (a Beta shape). Default 1.0 (official argparse and OpenOOD ``lambda_oe``);
    the paper's scripts use 5.0 (``MixOE`` in ``methods`` takes that per variant).

    Paper: Zhang et al., "Mixture Outlier Exposure: Towards Out-of-Distribution Detection in Fine-grained
    Environments", WACV 2023. Code: zjysteven/MixOE ``train/train_mixoe.py``; OpenOOD ``mixoe_trainer.py``.
    """

    def __init__(self, oe_weight: float = 1.0) -> None:
        super().__init__()
        self.oe_weight = _finite_number("oe_weight", oe_weight, non_negative=True)

    @staticmethod
    def soft_targets(labels: torch.Tensor, lam: float | torch.Tensor, num_classes: int) -> torch.Tensor:
        """``lam * onehot(labels) + (1 - lam) / num_classes``: the target decays linearly to uniform."""
        check_mixing_share(lam)
        onehot = F.one_hot(labels, num_classes).to(torch.float32)
        lam = torch.as_tensor(lam, dtype=torch.float32, device=labels.device)
        if lam.ndim == 1:
            lam = lam[:, None]
        return lam * onehot + (1 - lam) / num_classes

    def forward(
        self, logits_in: torch.Tensor, labels: torch.Tensor, logits_mix: torch.Tensor, lam: float | torch.Tensor
    ) -> torch.Tensor:
        _check_logits(logits_in, "logits_in")
        _check_logits(logits_mix, "logits_mix")
        _check_labels(labels, logits_in, logits_in.shape[1])
        if logits_mix.shape != logits_in.shape:
            raise ValueError(f"logits_mix must match logits_in's shape {tuple(logits_in.shape)} (one mixed sample "
                             f"per ID sample), got {tuple(logits_mix.shape)}")  # fmt: skip
        targets = self.soft_targets(labels, lam, logits_in.shape[1]).to(logits_mix.dtype)
        return F.cross_entropy(logits_in, labels) + self.oe_weight * soft_cross_entropy(logits_mix, targets)


class AbsentCategoryLoss(nn.Module):
    """DOS's absent-category loss on a (K+1)-way classifier: ``CE(f(x_in), y) + weight * CE(f(x_out), K)``.

    The last logit (index ``K``) is the absent (OOD) category. Default ``weight = 1.0`` (official ``--beta``).

    Paper: Jiang et al., "Diverse Outlier Sampling for Out-of-Distribution Detection", ICLR 2024.
    Code: lygjwy/DOS ``train_diverse.py``.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = _finite_number("weight", weight, non_negative=True)

    def forward(self, logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_in, "logits_in", min_classes=3)
        _check_logits(logits_out, "logits_out", min_classes=3)
        if logits_out.shape[1] != logits_in.shape[1]:
            raise ValueError(f"logits_out has {logits_out.shape[1]} classes, logits_in {logits_in.shape[1]}; both "
                             "come from the same (K+1)-way model")  # fmt: skip
        absent = logits_in.shape[1] - 1
        _check_labels(labels, logits_in, absent)  # ID labels never name the absent class
        target_out = torch.full((logits_out.shape[0],), absent, dtype=torch.long, device=logits_out.device)
        return F.cross_entropy(logits_in, labels) + self.weight * F.cross_entropy(logits_out, target_out)


class LogitNormLoss(nn.Module):
    """LogitNorm: cross-entropy on L2-normalised logits scaled by ``1 / tau``.

    ``L = CE(f / (tau * (||f||_2 + 1e-7)), y)``. It replaces the plain CE and uses no outliers. Default
    ``tau = 0.04`` (OpenOOD ``train_logitnorm.yml``, the paper's CIFAR-10 choice); the official README's example
    uses 0.01. Test score: MSP on the raw logits.

    Paper: Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022.
    Code: hongxin001/logitnorm_ood ``common/loss_function.py``; OpenOOD ``logitnorm_trainer.py``.
    """

    def __init__(self, tau: float = 0.04) -> None:
        super().__init__()
        self.tau = _finite_number("tau", tau, positive=True)

    def forward(self, logits_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_in, "logits_in")
        _check_labels(labels, logits_in, logits_in.shape[1])
        norms = torch.linalg.vector_norm(logits_in, dim=1, keepdim=True) + 1e-7
        return F.cross_entropy(logits_in / (norms * self.tau), labels)
