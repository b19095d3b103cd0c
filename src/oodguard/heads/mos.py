"""Training a MOS group-softmax head on frozen penultimate features (MOS's training side).

MOS (Huang & Li, CVPR 2021) needs a classifier head whose ``C`` classes are split into ``K`` groups, each group
with an extra "others" logit, trained with the sum over groups of each group's softmax cross-entropy. The
``mos`` detector (:mod:`oodguard.detectors.openset`) then scores the head's ``C + K`` logits.
:func:`train_mos_head` trains such a linear head on features a frozen backbone already produced (e.g.
``extract(model, data).features``); :class:`MOSHead` holds it, computes its logits, predictions and
:class:`~oodguard.outputs.ModelOutputs` ready for the detector, and saves with safetensors (no pickle).

Example
-------
>>> import numpy as np
>>> from oodguard import detectors
>>> rng = np.random.default_rng(0)
>>> labels = np.repeat(np.arange(4), 50)
>>> features = rng.normal(size=(200, 8)) + 6 * np.eye(8)[labels]
>>> head = train_mos_head(features, labels, default_groups(4, 2), progress=False)
>>> bool((head.predict(features) == labels).mean() > 0.95)
True
>>> scores = detectors.create("mos", group_sizes=head.group_sizes).score(head.outputs(features))
>>> scores.shape
(200,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard import persist
from oodguard.detectors.openset import GroupLayout, check_group_sizes, mos_group_labels, mos_predict
from oodguard.outputs import ArrayLike, ModelOutputs

__all__ = ["MOSHead", "train_mos_head", "mos_loss", "default_groups", "official_schedule", "OPTIMIZERS"]

#: The kind of file MOSHead.save writes (see oodguard.persist).
FILE_KIND = "mos_head"
FORMAT_VERSION = 1
OPTIMIZERS = ("adam", "sgd")
#: The official schedule (``utils/finetune_utils.py``, ``get_schedule``): by training-set size, the steps where the
#: linear warm-up ends, the learning rate is divided by 10 (three times), and training stops.
OFFICIAL_SCHEDULES = ((20_000, (100, 200, 300, 400, 500)), (500_000, (500, 3_000, 6_000, 9_000, 10_000)))
OFFICIAL_SCHEDULE_LARGE = (500, 6_000, 12_000, 18_000, 20_000)


def official_schedule(num_rows: int) -> tuple[int, ...]:
    """The official MOS fine-tuning schedule for ``num_rows`` training samples: ``(warm-up end, 3 decays, stop)``."""
    for limit, supports in OFFICIAL_SCHEDULES:
        if num_rows < limit:
            return supports
    return OFFICIAL_SCHEDULE_LARGE


# --------------------------------------------------------------------------------------------- groups
def default_groups(num_classes: int, num_groups: int) -> list[int]:
    """Group sizes splitting classes ``0..C-1`` into ``num_groups`` contiguous groups of near-equal size.

    The first ``C mod K`` groups get one class more, e.g. ``default_groups(10, 3) == [4, 3, 3]``: group 0 holds
    classes 0-3, group 1 classes 4-6, group 2 classes 7-9. Use it only when no taxonomy is available: MOS works
    best when each group holds semantically related classes (the paper groups ImageNet by its WordNet taxonomy;
    its ablation of grouping strategies favours semantic groups over random ones), so a contiguous split is only
    as good as the class order is semantic. To use a taxonomy, reorder the class ids so that each group is
    contiguous and pass its sizes.
    """
    for name, value in (("num_classes", num_classes), ("num_groups", num_groups)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"default_groups: {name} must be an integer >= 1, got {value!r}")
    if num_groups > num_classes:
        raise ValueError(
            f"default_groups: num_groups={num_groups} exceeds num_classes={num_classes}; every group needs at "
            "least one class, so pass num_groups <= num_classes"
        )
    base, extra = divmod(int(num_classes), int(num_groups))
    return [base + 1 if k < extra else base for k in range(int(num_groups))]


class _LossLayout:
    """The detector's group layout plus, for every one of the ``C + K`` columns, the group it belongs to."""

    def __init__(self, group_sizes: list[int], device: torch.device) -> None:
        self.groups = GroupLayout(group_sizes, device)
        self.group_sizes = group_sizes
        sizes = torch.tensor(group_sizes, dtype=torch.int64, device=device)
        self.column_group = torch.repeat_interleave(torch.arange(len(group_sizes), device=device), sizes + 1)

    def target_columns(self, labels: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` column of each group's target: its "others" column + the group target (0 = "others")."""
        return self.groups.others + torch.as_tensor(mos_group_labels(labels, self.group_sizes))

    def group_lse(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp of every group's logits (``"others"`` included), ``[N, K]``: one segment reduction.

        Differentiable: the per-group maximum is only a numerical shift (the LSE's gradient does not depend on
        it), so it is taken without gradient; ``exp`` and the segment sum carry the gradient.
        """
        rows, groups = logits.shape[0], self.groups.num_groups
        index = self.column_group.expand(rows, -1)
        with torch.no_grad():
            peak = logits.new_full((rows, groups), -torch.inf).scatter_reduce(1, index, logits, "amax")
        shifted = torch.exp(logits - peak[:, self.column_group])
        return peak + logits.new_zeros(rows, groups).index_add(1, self.column_group, shifted).log()

    def loss(self, logits: torch.Tensor, target_columns: torch.Tensor) -> torch.Tensor:
        """Per sample ``sum_k CE(softmax(f^k), target_k) = sum_k [LSE(f^k) - f^k_{target_k}]``, ``[N]``."""
        return self.group_lse(logits).sum(dim=1) - logits.gather(1, target_columns).sum(dim=1)


def mos_loss(
    logits: torch.Tensor, labels: torch.Tensor, group_sizes: Sequence[int], reduction: str = "mean"
) -> torch.Tensor:
    """The MOS group-softmax loss ``sum_k CE(softmax over group k's logits, target_k)`` (differentiable).

    Parameters
    ----------
    logits : tensor ``[N, C + K]``
        Group-softmax head outputs: ``K`` groups stored contiguously, each ``[others, its classes...]``.
    labels : integer tensor ``[N]``
        Class ids ``0..C-1``; the group targets come from :func:`~oodguard.detectors.openset.mos_group_labels`
        (own group: position + 1; every other group: 0 = "others"). A negative label (an outlier) is "others"
        in every group.
    group_sizes : list of int
        Real classes per group (``C = sum``).
    reduction : ``"mean"`` (over samples, as the official ``CrossEntropyLoss`` per group then summed over
        groups), ``"sum"`` or ``"none"`` (``[N]``).

    The log-sum-exp of all K groups is one segment reduction (scatter max + index_add), with no loop over groups.
    """
    sizes = check_group_sizes(group_sizes, "mos_loss")
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise ValueError("mos_loss: logits must be a floating torch tensor [N, C + K]")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"mos_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    layout = _LossLayout(sizes, logits.device)
    layout.groups.check_width(logits, "mos_loss")
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"mos_loss: labels must have shape [{logits.shape[0]}], got {tuple(labels.shape)}")
    per_sample = layout.loss(logits, layout.target_columns(labels))
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


# --------------------------------------------------------------------------------------------- the head
def _features_in(features: Any, labels: Any, where: str) -> tuple[ModelOutputs, torch.Tensor, bool]:
    """Validated rows as a ModelOutputs (features, optional labels), the features and whether numpy was given."""
    if isinstance(features, ModelOutputs):
        if features.features is None:
            raise ValueError(
                f"{where}: these ModelOutputs have no features; extract them with a model whose final linear "
                "layer is found (or pass feature_layer=...)"
            )
        if labels is not None:
            features = features.with_fields(labels=labels)
        outputs = features
    else:
        outputs = ModelOutputs(features=features, labels=labels)
    if outputs.features is None:
        raise ValueError(f"{where}: features are required; pass an array [N, D] or ModelOutputs with features")
    return outputs, outputs.features, outputs.array_type == "numpy"


class MOSHead:
    """A linear MOS group-softmax head ``logits = features @ weight.T + bias`` with ``C + K`` outputs.

    Group ``k`` owns ``group_sizes[k] + 1`` consecutive logits, the first being its "others" category; groups are
    stored in order, as the ``mos`` detector and :func:`~oodguard.detectors.openset.mos_predict` expect.
    Usually made by :func:`train_mos_head` or :meth:`load`.

    Attributes
    ----------
    weight : tensor ``[C + K, D]``
    bias : tensor ``[C + K]``
    group_sizes : list of int, real classes per group (``C = sum(group_sizes)``, ``K = len(group_sizes)``)
    training : dict, the training settings and the mean training loss after each epoch (saved with the head)
    """

    def __init__(
        self,
        weight: ArrayLike,
        bias: ArrayLike,
        group_sizes: Sequence[int],
        training: dict[str, Any] | None = None,
    ) -> None:
        self.group_sizes = check_group_sizes(group_sizes, "MOSHead")
        checked = ModelOutputs(head=(weight, bias))  # shape, dtype and finite checks
        assert checked.head is not None  # given above
        self.weight, self.bias = checked.head
        width = sum(self.group_sizes) + len(self.group_sizes)
        if self.weight.shape[0] != width:
            raise ValueError(
                f"MOSHead: weight has {self.weight.shape[0]} rows but group_sizes {self.group_sizes} describe "
                f"{width} logits (C + K: one 'others' logit per group); pass the matching group_sizes"
            )
        self.training = dict(training or {})

    @property
    def num_classes(self) -> int:
        return sum(self.group_sizes)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[1]

    def __repr__(self) -> str:
        return f"MOSHead(C={self.num_classes}, K={self.num_groups}, D={self.feature_dim}, groups={self.group_sizes})"

    def _logits(self, features: torch.Tensor, where: str) -> torch.Tensor:
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"{where}: features have D={features.shape[1]} columns but this head was trained on D="
                f"{self.feature_dim}; pass the same layer's features"
            )
        weight = self.weight.to(device=features.device, dtype=features.dtype)
        bias = self.bias.to(device=features.device, dtype=features.dtype)
        return torch.addmm(bias, features, weight.T)

    def logits(self, features: ArrayLike | ModelOutputs) -> ArrayLike:
        """The ``C + K`` group-softmax logits ``[N, C + K]`` (numpy in, numpy out)."""
        _, rows, is_numpy = _features_in(features, None, "MOSHead.logits")
        logits = self._logits(rows, "MOSHead.logits")
        return logits.cpu().numpy() if is_numpy else logits

    def outputs(self, features: ArrayLike | ModelOutputs, labels: ArrayLike | None = None) -> ModelOutputs:
        """ModelOutputs with this head's logits (MOS layout), the features, the labels and this head.

        Ready for ``detectors.create("mos", group_sizes=head.group_sizes)``. Given ModelOutputs, their other
        fields (layers, labels) are kept and logits and head are replaced. The outputs' ``num_classes`` is then
        ``C + K`` (the head's width): feed them to MOS, not to detectors that read the classes from the logits.
        """
        outputs, rows, is_numpy = _features_in(features, labels, "MOSHead.outputs")
        logits = self._logits(rows, "MOSHead.outputs")
        if is_numpy:
            head = (self.weight.cpu().numpy(), self.bias.cpu().numpy())
            return outputs.with_fields(logits=logits.cpu().numpy(), head=head)
        return outputs.with_fields(logits=logits, head=(self.weight, self.bias))

    def predict(self, features: ArrayLike | ModelOutputs) -> ArrayLike:
        """Class predictions ``0..C-1`` by the official MOS rule (:func:`~oodguard.detectors.openset.mos_predict`)."""
        return mos_predict(self.logits(features), self.group_sizes)

    def detector(self):
        """A ``mos`` detector for this head's group sizes (it needs no fit)."""
        from oodguard.detectors import create

        return create("mos", group_sizes=self.group_sizes)

    def loss(self, features: ArrayLike | ModelOutputs, labels: ArrayLike | None = None) -> float:
        """Mean group-softmax loss of this head on labelled features (labels ``0..C-1``), in float64."""
        outputs, rows, _ = _features_in(features, labels, "MOSHead.loss")
        if outputs.labels is None:
            raise ValueError("MOSHead.loss: labels are required; pass labels=[N] class ids")
        _check_labels(outputs.labels, self.num_classes, "MOSHead.loss")
        logits = self._logits(rows, "MOSHead.loss").to(torch.float64)
        return float(mos_loss(logits, outputs.labels.to(logits.device), self.group_sizes))

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> None:
        """Write one safetensors file: ``weight``, ``bias`` and a JSON header (group sizes, training settings)."""
        header = {"group_sizes": self.group_sizes, "training": self.training}
        persist.save(path, {"weight": self.weight, "bias": self.bias}, kind=FILE_KIND, version=FORMAT_VERSION,
                     header=header)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> MOSHead:
        """Read a file written by :meth:`save`; refuses other files and unknown format versions."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such MOS head file: {path}")
        tensors, header = persist.load(path, kind=FILE_KIND, versions=FORMAT_VERSION)
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"{path}: expected tensors 'weight' and 'bias', found {sorted(tensors)}")
        try:
            group_sizes = header.get("group_sizes")
            if group_sizes is None:
                raise ValueError("the header has no group_sizes; save the head with MOSHead.save")
            return cls(tensors["weight"], tensors["bias"], group_sizes, header.get("training"))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


# --------------------------------------------------------------------------------------------- training
def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in 0..{num_classes - 1} (group_sizes sum to C={num_classes}), got "
            f"min {int(labels.min())}, max {int(labels.max())}; negative labels mark OOD rows: drop them "
            "(outputs.id_only()), and make group_sizes cover every class"
        )


def _positive(value: Any, name: str, integer: bool = False, zero: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(
            f"train_mos_head: {name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}"
        )


def _lr_factor(step: int, supports: Sequence[int]) -> float:
    """Learning-rate factor at ``step``: linear warm-up to ``supports[0]``, x0.1 after each of ``supports[1:-1]``."""
    if step < supports[0]:
        return (step + 1) / supports[0]  # the official warm-up starts at 0, which would waste the first step
    return 0.1 ** sum(step > decay for decay in supports[1:-1])  # strictly after, as officially


def _scaled_schedule(num_rows: int, total: int) -> tuple[int, ...]:
    """The official schedule for this data size, stretched to ``total`` steps (each support at least 1)."""
    official = official_schedule(num_rows)
    return tuple(max(1, round(support * total / official[-1])) for support in official)


def train_mos_head(
    features: ArrayLike | ModelOutputs,
    labels: ArrayLike | None,
    group_sizes: Sequence[int],
    *,
    epochs: int | None = None,
    lr: float = 0.03,
    batch_size: int = 512,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    mixup: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> MOSHead:
    """Train a linear MOS group-softmax head on frozen features; deterministic for a given seed.

    Loss (per mini-batch): ``mean_i sum_k CE(softmax(f^k(x_i)), t_ik)`` where ``f^k`` are group ``k``'s
    ``|G_k| + 1`` logits and ``t_ik`` the group targets of :func:`~oodguard.detectors.openset.mos_group_labels`
    (position + 1 in the sample's own group, 0 = "others" in every other group); vectorised over groups by a
    segment log-sum-exp (:func:`mos_loss`). The head starts at zero, as officially (``zero_head=True``).

    Parameters
    ----------
    features : array ``[N, D]`` or ModelOutputs with features (and labels)
        Penultimate features of a frozen backbone, e.g. ``extract(model, data).features``.
    labels : integer array ``[N]`` in ``0..C-1``, or None to take them from ``features`` (ModelOutputs)
    group_sizes : list of int
        Real classes per group in class-id order: group 0 holds classes ``0..group_sizes[0]-1``, and so on.
        Without a taxonomy use :func:`default_groups`.
    epochs : int, optional
        Passes over the data. Default: as many steps as the official schedule gives this data size
        (:func:`official_schedule`: 500 steps below 20k rows, 10k below 500k, else 20k), the last pass partial.
    lr : peak learning rate (default 0.03 for Adam; the official SGD uses 0.003).
    batch_size : rows per step (512, as officially).
    weight_decay : L2 penalty on the weight (not the bias), in standardised feature units; 0 as officially.
    optimizer : ``"adam"`` (default) or ``"sgd"`` (momentum 0.9, the official optimiser).
    mixup : Beta(mixup, mixup) mixing of feature rows; 0 (default) disables it (see deviations).
    seed : seeds the data order and mixup, which then decide the result.
    progress : show a tqdm bar over the steps.

    Returns
    -------
    MOSHead, in the features' dtype and on their device. ``head.training`` records the settings, the number of
    steps and ``epoch_loss``: the mean training loss over each pass (during that pass).

    Deviations from the official recipe (``finetune.py``, ``utils/finetune_utils.py``, frozen BiT backbone with
    ``num_block_open 0``: SGD momentum 0.9, lr 0.003, batch 512, zero-initialised head, no weight decay, the
    size-dependent step schedule of :func:`official_schedule` with linear warm-up and x0.1 decays, mixup alpha
    0.1 on images for datasets of >= 20k images):

    * Default optimiser Adam with lr 0.03, which gets a linear head close to its optimum within the official
      number of steps, in seconds on CPU for small heads; ``optimizer="sgd", lr=0.003`` is the official optimiser.
    * With ``epochs`` given, the official schedule for this data size is stretched to ``epochs`` passes.
    * The official warm-up's first step has learning rate 0 (a wasted step); here step ``t`` of a warm-up of
      ``W`` steps uses ``(t + 1) / W``.
    * Features are standardised (per dimension, training mean and standard deviation; dimensions with zero
      spread are only centred) for well-conditioned optimisation; the standardisation is folded back into the
      returned weight and bias, so the head takes raw features. ``weight_decay`` acts in standardised units.
    * No mixup by default: with a frozen backbone, mixing feature vectors is not the same as mixing images
      (the official code mixes images before the backbone). ``mixup > 0`` mixes feature rows, one ratio per step.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.arange(6).repeat(20)
    >>> features = np.random.default_rng(0).normal(size=(120, 6)) + 5 * np.eye(6)[labels]
    >>> head = train_mos_head(features, labels, [3, 3], progress=False)
    >>> head.logits(features).shape  # C + K = 6 + 2
    (120, 8)
    """
    outputs, x, _ = _features_in(features, labels, "train_mos_head")
    sizes = check_group_sizes(group_sizes, "train_mos_head")
    if outputs.labels is None:
        raise ValueError("train_mos_head: labels are required; pass labels=[N] class ids 0..C-1")
    _check_labels(outputs.labels, sum(sizes), "train_mos_head")
    if len(outputs) == 0:
        raise ValueError("train_mos_head: got no rows; pass the features of the training set")
    if epochs is not None:
        _positive(epochs, "epochs", integer=True)
    _positive(batch_size, "batch_size", integer=True)
    _positive(lr, "lr")
    _positive(weight_decay, "weight_decay", zero=True)
    _positive(mixup, "mixup", zero=True)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"train_mos_head: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"train_mos_head: seed must be an integer, got {seed!r}")

    device, dtype = x.device, x.dtype
    layout = _LossLayout(sizes, device)
    targets = layout.target_columns(outputs.labels.to(device))

    # Standardise in float64, train in the features' dtype.
    mean = x.to(torch.float64).mean(dim=0)
    std = x.to(torch.float64).std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = ((x.to(torch.float64) - mean) / std).to(dtype)

    weight = torch.zeros(layout.groups.width, x.shape[1], dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(layout.groups.width, dtype=dtype, device=device, requires_grad=True)
    groups = [{"params": [weight], "weight_decay": float(weight_decay)}, {"params": [bias], "weight_decay": 0.0}]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=float(lr))
    else:
        opt = torch.optim.SGD(groups, lr=float(lr), momentum=0.9)
    rows = len(z)
    if epochs is None:
        supports = official_schedule(rows)
    else:
        supports = _scaled_schedule(rows, int(epochs) * -(-rows // batch_size))
    total = supports[-1]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, supports))
    generator = torch.Generator().manual_seed(int(seed))
    mix_rng = np.random.default_rng(int(seed))

    from tqdm.auto import tqdm

    epoch_loss: list[float] = []
    step = 0
    with tqdm(total=total, desc="train MOS head", disable=not progress) as bar:
        while step < total:
            order = torch.randperm(rows, generator=generator).to(device)
            running = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            for start in range(0, rows, batch_size):
                if step == total:
                    break
                batch = order[start : start + batch_size]
                inputs, batch_targets = z[batch], targets[batch]
                if mixup > 0:
                    ratio = float(mix_rng.beta(mixup, mixup))
                    partner = torch.randperm(len(batch), generator=generator).to(device)
                    logits = torch.addmm(bias, ratio * inputs + (1 - ratio) * inputs[partner], weight.T)
                    per_sample = ratio * layout.loss(logits, batch_targets)
                    per_sample = per_sample + (1 - ratio) * layout.loss(logits, batch_targets[partner])
                else:
                    per_sample = layout.loss(torch.addmm(bias, inputs, weight.T), batch_targets)
                opt.zero_grad(set_to_none=True)
                per_sample.mean().backward()
                opt.step()
                schedule.step()
                running += per_sample.detach().sum().to(torch.float64)
                seen += len(batch)
                step += 1
                bar.update(1)
            epoch_loss.append(float(running) / seen)
            if not math.isfinite(epoch_loss[-1]):
                raise ValueError(
                    f"train_mos_head: the loss became {epoch_loss[-1]} in pass {len(epoch_loss)}; lower lr (now {lr})"
                )
            bar.set_postfix(loss=f"{epoch_loss[-1]:.4f}")

    # Fold the standardisation into the head: W z + b = (W / std) x + (b - (W / std) mean).
    raw_weight = weight.detach().to(torch.float64) / std
    raw_bias = bias.detach().to(torch.float64) - raw_weight @ mean
    training = {
        "epochs": None if epochs is None else int(epochs),
        "steps": int(total),
        "schedule": list(supports),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "weight_decay": float(weight_decay),
        "optimizer": optimizer,
        "mixup": float(mixup),
        "seed": int(seed),
        "num_rows": int(rows),
        "epoch_loss": epoch_loss,
    }
    return MOSHead(raw_weight.to(dtype), raw_bias.to(dtype), sizes, training)
