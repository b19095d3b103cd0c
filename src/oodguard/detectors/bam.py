"""Boxed abstraction monitors: is a feature vector inside one of the boxes around the clusters of the fit features?

LoRA-BAM (Wu, Duan, Bensalem & Cheng, 2025) clusters the feature vectors of the fine-tuning data at a LoRA layer,
encloses each cluster in an axis-aligned box enlarged by the feature spread within the cluster, and flags a query
outside every box as OOD. The box mechanics and the continuous box score follow the Outside-the-Box monitor of
Guérin et al.'s monitoring benchmark. The detector works on any feature layer: the penultimate features by default,
or a named intermediate layer of the outputs (``layer=``). The LoRA fine-tuning itself is not part of it:
``oodguard.encoders.lora`` fine-tunes a text encoder and extracts its LoRA layers' features (the ``text`` benchmark's
``bam_lora`` row).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import numpy as np
import torch

from oodguard.detectors.base import SCORE_MEMORY_BUDGET, NotFittedError, OutputDetector, class_counts, register
from oodguard.detectors.params import Integral, Interval, Options, Real, Text
from oodguard.outputs import ModelOutputs, as_outputs

__all__ = ["BAM", "box_score", "cluster_boxes"]

_F64 = torch.float64
#: k-means restarts (scikit-learn's classic default, which the reference monitor ran with).
_KMEANS_RESTARTS = 10


# ---------------------------------------------------------------------- the boxes, as pure functions
def cluster_boxes(
    z: torch.Tensor, assignment: torch.Tensor, enlargement: float, min_half_width: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and half-widths ``[B, D]`` of the boxes around the clusters ``assignment`` (``0..B-1``) of ``z``.

    Box ``b`` spans ``[l_b - g s_b, u_b + g s_b]`` per column, ``l_b``/``u_b`` the column minimum/maximum over the
    cluster, ``s_b`` its (population) standard deviation and ``g = enlargement``; every half-width is at least
    ``min_half_width``. Clusters without rows get no box.
    """
    z = z.to(_F64)
    boxes = int(assignment.max()) + 1 if assignment.numel() else 0
    index = assignment[:, None].expand_as(z)
    lower = z.new_full((boxes, z.shape[1]), torch.inf).scatter_reduce_(0, index, z, reduce="amin")
    upper = z.new_full((boxes, z.shape[1]), -torch.inf).scatter_reduce_(0, index, z, reduce="amax")
    counts = torch.bincount(assignment, minlength=boxes).to(_F64)[:, None]
    mean = z.new_zeros(boxes, z.shape[1]).index_add_(0, assignment, z) / counts.clamp_min(1)
    spread = (z.new_zeros(boxes, z.shape[1]).index_add_(0, assignment, (z - mean[assignment]).square())
              / counts.clamp_min(1)).sqrt()  # fmt: skip
    keep = counts[:, 0] > 0
    centre = 0.5 * (lower + upper)
    half_width = 0.5 * (upper - lower) + float(enlargement) * spread
    return centre[keep], half_width[keep].clamp_min(float(min_half_width))


def box_score(z: torch.Tensor, centres: torch.Tensor, half_widths: torch.Tensor) -> torch.Tensor:
    """``[n, B]``: ``max_j |z_j - m_bj| / h_bj`` for every row and box (at most 1 exactly when inside box ``b``)."""
    return ((z.to(_F64)[:, None, :] - centres).abs_() / half_widths).amax(dim=2)


# ---------------------------------------------------------------------- the detector
@register
class BAM(OutputDetector):
    """Boxed abstraction monitor: normalised L-infinity distance to the nearest box around a cluster of fit features.

    Fit: the rows of the monitored layer (``layer``; the penultimate features by default, other layers flattened
    per row) are grouped, each group is clustered by k-means (scikit-learn, seeded), and each cluster gets an
    axis-aligned box (:func:`cluster_boxes`): its per-column range, enlarged by ``enlargement`` times the cluster's
    per-column standard deviation, with every half-width at least ``min_half_width`` times the mean per-column
    standard deviation of the fit rows. k-means needs scikit-learn (the ``bench`` extra) at fit only.

    Score: ``min_b max_j |z_j - m_bj| / h_bj`` (``m`` box centre, ``h`` half-width; :func:`box_score`), the
    minimum over the boxes of the row's group. It is at most 1 exactly when the row lies inside one of those boxes,
    which is the monitor's decision: :meth:`inside`.

    Parameters
    ----------
    layer : str, optional
        Name of the ``outputs.layers`` entry to monitor (e.g. the output of a LoRA layer); None (default) monitors
        ``outputs.features``.
    grouping : {"class", "all"}, default "class"
        ``"class"``: boxes per class around the correctly classified fit rows of that class, and a row is scored
        against the boxes of its predicted class (the reference monitor; needs labels at fit and logits). ``"all"``:
        one clustering of every fit row and scoring against every box (LoRA-BAM's fine-tuning questions have no
        classes; needs only the monitored layer).
    n_clusters : int, default 3
        k-means clusters per class (``"class"``) or in all (``"all"``); a group with fewer rows gets one cluster per
        row, with a warning.
    enlargement : float >= 0, default 0.0
        ``g`` above: boxes grow by ``g`` standard deviations of their cluster per column (LoRA-BAM enlarges the
        boxes by the within-cluster spread; 0 keeps the exact ranges).
    min_half_width : float > 0, default 0.01
        Smallest half-width, relative to the mean per-column standard deviation of the fit rows. A column that is
        constant within a cluster (a ReLU unit that never fires there) would otherwise divide by ~0 and decide the
        score alone.
    seed : int, default 0
        Seed of k-means.

    Attributes
    ----------
    state_ : ``centres``, ``half_widths`` (float64 ``[B, D]``) and ``box_class`` (``int64 [B]``: the class a box
        belongs to, 0 for every box with ``grouping="all"``).
    meta_ : ``layer_dim`` (D of the monitored layer), ``classes_without_boxes`` (``"class"`` grouping: classes with
        no correctly classified fit row; rows predicted as one are scored against every box).

    Deviations: docs/detectors.md, section ``bam``.

    Paper: Wu, Duan, Bensalem & Cheng, "LoRA-BAM: Input Filtering for Fine-tuned LLMs via Boxed Abstraction
    Monitors over LoRA Layers", arXiv:2506.00998, 2025 (no code released). Box mechanics: Guérin, Delmas, Ferreira &
    Guiochet, "Out-Of-Distribution Detection Is Not All You Need", AAAI 2023; code: jorisguerin/
    neural-network-monitoring-benchmark ``monitors.py`` (``OutsideTheBoxMonitor``), ``Utils/utils_monitors.py``
    (``Box``, ``Boxes``).
    """

    name = "bam"
    summary = "normalised L-infinity distance to the nearest box around a k-means cluster of the fit features"
    paper = (
        "Wu, Duan, Bensalem & Cheng, 'LoRA-BAM: Input Filtering for Fine-tuned LLMs via Boxed Abstraction Monitors "
        "over LoRA Layers', arXiv:2506.00998, 2025"
    )
    code = (
        "no official code; box mechanics: https://github.com/jorisguerin/neural-network-monitoring-benchmark "
        "(monitors.py::OutsideTheBoxMonitor, Utils/utils_monitors.py::Box)"
    )
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features", "logits", "labels"})

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "layer": [None, Text()],
        "grouping": [Options(("class", "all"))],
        "n_clusters": [Interval(Integral, 1, None)],
        "enlargement": [Interval(Real, 0, None)],
        "min_half_width": [Interval(Real, 0, None, closed="neither")],
        "seed": [Interval(Integral, 0, None)],
    }

    def __init__(
        self,
        *,
        layer: str | None = None,
        grouping: str = "class",
        n_clusters: int = 3,
        enlargement: float = 0.0,
        min_half_width: float = 0.01,
        seed: int = 0,
    ) -> None:
        self.layer = layer
        self.grouping = grouping
        self.n_clusters = n_clusters
        self.enlargement = enlargement
        self.min_half_width = min_half_width
        self.seed = seed
        super().__init__()

    # ------------------------------------------------------------------ what the outputs must hold
    def _check_fields(self, outputs: ModelOutputs, fields: frozenset[str], stage: str) -> None:
        """``requires``/``fit_requires`` name the defaults; a named layer replaces the features, and
        ``grouping="all"`` needs neither labels nor logits."""
        needed = set(fields)
        if self.layer is not None:
            needed.discard("features")
        if self.grouping == "all":
            needed -= {"labels", "logits"}
        super()._check_fields(outputs, frozenset(needed), stage)

    def _monitored(self, outputs: ModelOutputs, stage: str) -> torch.Tensor:
        """The monitored layer's rows as ``[n, D]`` (trailing dimensions flattened)."""
        if self.layer is None:
            return cast(torch.Tensor, outputs.features)  # present: _check_fields ran first
        if self.layer not in outputs.layers:
            available = ", ".join(repr(name) for name in sorted(outputs.layers)) or "none"
            raise ValueError(
                f"{self.name}: layer {self.layer!r} is missing from the outputs at {stage} (available: {available}); "
                "extract it with extract(model, data, layers=[...]) or pass layer=None for the features"
            )
        return outputs.layers[self.layer].flatten(1)

    # ------------------------------------------------------------------ fit
    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = self._monitored(outputs, "fit").to(_F64)
        if self.grouping == "class":
            num_classes = outputs.logits.shape[1]
            labels = outputs.labels.to(z.device)
            class_counts(labels, num_classes, self.name, minimum=0)  # validates the label range
            correct = outputs.logits.argmax(dim=1).to(z.device) == labels
            z, groups = z[correct], labels[correct]
        else:
            num_classes, groups = 1, torch.zeros(len(z), dtype=torch.int64, device=z.device)
        if len(z) == 0:
            raise ValueError(
                f"{self.name}: no fit row is correctly classified, so there is nothing to enclose in boxes; check the "
                "labels against the logits, or pass grouping='all'"
            )
        scale = float(z.std(dim=0, unbiased=False).mean())
        if scale <= 0:
            raise ValueError(
                f"{self.name}: the fit rows of the monitored layer are all equal, so every box would be a point; "
                "monitor a layer whose values vary"
            )
        assignment = self._clusters(z, groups, num_classes)
        centres, half_widths = cluster_boxes(z, assignment, float(self.enlargement), float(self.min_half_width) * scale)
        # a cluster lies within one group: the box's class is its rows' group (clusters without rows have no box)
        box_class = torch.zeros(int(assignment.max()) + 1, dtype=torch.int64, device=z.device)
        box_class = box_class.scatter_(0, assignment, groups)[torch.bincount(assignment) > 0]
        without = sorted(set(range(num_classes)) - set(box_class.tolist())) if self.grouping == "class" else []
        if without:
            shown = ", ".join(str(c) for c in without[:10]) + (" and more" if len(without) > 10 else "")
            warnings.warn(
                f"{self.name}: class(es) {shown} have no correctly classified fit row, so no box; rows predicted as "
                "them are scored against every box",
                RuntimeWarning,
                stacklevel=3,
            )
        self.meta_["layer_dim"] = int(z.shape[1])
        self.meta_["classes_without_boxes"] = without
        return {"centres": centres, "half_widths": half_widths, "box_class": box_class}

    def _clusters(self, z: torch.Tensor, groups: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Cluster ids ``[n]``, numbered group after group: k-means with ``n_clusters`` clusters within each group."""
        try:
            from sklearn.cluster import KMeans
            from threadpoolctl import threadpool_limits  # installed with scikit-learn
        except ImportError as error:
            raise ImportError(f"{self.name}: its k-means needs scikit-learn ({error}); "
                              "pip install 'oodguard[bench]'") from error  # fmt: skip

        assignment = torch.empty(len(z), dtype=torch.int64)
        rows = z.cpu().numpy()
        group_of = groups.cpu()
        offset, short = 0, []
        for group in range(num_classes):  # a loop over classes; k-means itself is vectorised
            members = torch.nonzero(group_of == group).flatten()
            if members.numel() == 0:
                continue
            k = min(int(self.n_clusters), int(members.numel()))
            if k < int(self.n_clusters):
                short.append(f"{group}: {members.numel()}" if self.grouping == "class" else str(members.numel()))
            # One thread: after torch's work, scikit-learn's OpenMP threads wait on torch's (up to 50x slower here),
            # and one group's k-means is too small to gain from more. Warnings: repeated rows make k-means say
            # that there are fewer distinct points than clusters.
            with threadpool_limits(limits=1), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kmeans = KMeans(k, n_init=_KMEANS_RESTARTS, random_state=int(self.seed))
                labels = kmeans.fit_predict(rows[members.numpy()])
            assignment[members] = offset + torch.from_numpy(np.asarray(labels, dtype=np.int64))
            offset += k
        if short:
            where = "rows in class " if self.grouping == "class" else "fit rows "
            warnings.warn(
                f"{self.name}: n_clusters={self.n_clusters} but only {where}{', '.join(short[:10])}; those get one "
                "cluster per row",
                RuntimeWarning,
                stacklevel=4,
            )
        return assignment.to(z.device)

    # ------------------------------------------------------------------ score and decision
    def _nearest_box(self, outputs: ModelOutputs, stage: str) -> torch.Tensor:
        z = self._monitored(outputs, stage)
        if z.shape[1] != self.meta_["layer_dim"]:
            raise ValueError(
                f"{self.name}: the monitored layer has D={z.shape[1]} columns at {stage} but D="
                f"{self.meta_['layer_dim']} at fit; use outputs of the same model and layer"
            )
        state = self.state(z.device)
        centres, half_widths = state["centres"], state["half_widths"]
        per_box = []
        rows = max(1, SCORE_MEMORY_BUDGET // self._score_row_bytes(outputs))
        for start in range(0, len(z), rows):
            per_box.append(box_score(z[start : start + rows], centres, half_widths))
        distances = torch.cat(per_box)  # [n, B]
        if self.grouping == "class":
            predicted = outputs.logits.argmax(dim=1).to(z.device)
            own = state["box_class"][None, :] == predicted[:, None]
            own |= ~own.any(dim=1, keepdim=True)  # a class without boxes: every box
            distances = distances.masked_fill(~own, torch.inf)
        return distances.amin(dim=1)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        return self._nearest_box(outputs, "score")

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        centres = (self.state_ or {}).get("centres")
        return 2 * 8 * centres.numel() + 1024 if centres is not None else 64 * 1024

    def inside(self, outputs: ModelOutputs | Mapping[str, Any]) -> np.ndarray | torch.Tensor:
        """True for rows inside at least one box of their group (score <= 1): the monitor accepts them as ID.
        Numpy in, numpy out; torch in, torch out."""
        outputs = as_outputs(outputs)
        if self.state_ is None:
            raise NotFittedError(f"{self.name}: call fit(...) on in-distribution outputs first")
        self._check_fields(outputs, self.requires, "score")
        if len(outputs) == 0:
            raise ValueError(f"{self.name}: inside got empty outputs (N=0); pass at least one row")
        self._check_dims(outputs, "score")
        accepted = self._nearest_box(outputs, "score") <= 1.0
        return accepted.cpu().numpy() if outputs.array_type == "numpy" else accepted
