"""SDM: the Similarity-Distance-Magnitude activation of Schmaltz (2025) as an OOD score.

A test row's prediction ``ŷ = argmax z`` is checked against the training rows nearest to its feature vector:

* **Similarity** ``q``: how many of the nearest training rows, in order of L2 distance and starting from the
  nearest, are correctly predicted *and* predicted as ``ŷ`` (the count stops at the first that is not);
* **Distance** ``d``: where the L2 distance ``d0`` to the nearest training row falls among the same distances of
  held-out calibration rows, ``d = min_c (fraction of class c's calibration distances >= d0)`` in [0, 1]
  (1 = as close as the closest calibration rows, 0 = farther than all of them);
* **Magnitude**: the logits ``z``.

They combine into the SDM activation ``sdm(z)_k = (2 + q)^(d z_k) / sum_j (2 + q)^(d z_j)``, a softmax of
``d ln(2 + q) z``: many correct look-alikes and a short distance sharpen it, ``q = 0`` or ``d = 0`` flattens it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from oodguard.detectors.base import SCORE_MEMORY_BUDGET, NotFittedError, OutputDetector, class_counts, register
from oodguard.detectors.faiss_index import faiss_module
from oodguard.detectors.params import Integral, Interval, Options
from oodguard.outputs import ModelOutputs, as_outputs

__all__ = ["SDM", "class_sorted_table", "distance_quantile", "sdm_activation", "sdm_log_odds", "similarity_q"]

#: Added to q in the base of the activation (official ``constants.q_rescale_offset``): q = 0 gives base 2.
Q_OFFSET = 2
#: Neighbours searched per row (official ``constants.maxQAvailableFromIndexer``), so the largest q.
DEFAULT_MAX_Q = 1000


# ---------------------------------------------------------------------- the formulas, as pure functions
def similarity_q(matches: torch.Tensor) -> torch.Tensor:
    """``q`` per row of ``matches [n, k]`` (neighbours in order of distance): the number of leading True entries."""
    return matches.to(torch.int64).cumprod(dim=1).sum(dim=1)


def class_sorted_table(
    values: torch.Tensor, classes: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's values sorted ascending, as rows of a ``[C, M]`` table padded with +inf, and the counts ``[C]``.

    The empirical CDF of class ``c`` is then ``torch.searchsorted(table[c], x)`` divided by ``counts[c]``; the
    padding never counts as below a finite ``x``.
    """
    values = values.to(torch.float64)
    counts = torch.bincount(classes, minlength=num_classes)
    table = values.new_full((num_classes, max(1, int(counts.max()) if counts.numel() else 1)), math.inf)
    if values.numel():
        order = torch.argsort(values, stable=True)
        order = order[torch.argsort(classes[order], stable=True)]  # by class, ascending values within each
        sorted_classes = classes[order]
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(order), device=classes.device) - starts[sorted_classes]
        table[sorted_classes, position] = values[order]
    return table, counts


def distance_quantile(
    nearest: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, predicted: torch.Tensor | None = None
) -> torch.Tensor:
    """``d`` in [0, 1] for each nearest distance ``d0``, from the per-class calibration distances ``table``/``counts``
    (:func:`class_sorted_table` over the calibration rows with ``q > 0``).

    ``d_c = 1 - #{calibration distances of class c < d0} / n_c`` is the fraction of class ``c``'s calibration
    distances at or above ``d0``. Without ``predicted``: ``d = min_c d_c`` over the classes that have calibration
    distances (the official code also takes the minimum, but counts a class without any as ``d_c = 0``, which makes
    ``d = 0`` for every input). With ``predicted`` (ŷ per row): ``d = d_ŷ``, 0 where class ŷ has none.
    """
    nearest = nearest.to(torch.float64)
    sizes = counts.to(torch.float64)
    if predicted is not None:
        below = torch.searchsorted(table.index_select(0, predicted), nearest[:, None].contiguous(), side="left")
        size = sizes.index_select(0, predicted)
        return torch.where(size > 0, 1.0 - below.squeeze(1).to(torch.float64) / size.clamp_min(1), 0.0)
    queries = nearest.reshape(1, -1).expand(table.shape[0], -1).contiguous()
    below = torch.searchsorted(table, queries, side="left").to(torch.float64)  # [C, n]
    fraction = 1.0 - below / sizes.clamp_min(1)[:, None]
    fraction[counts == 0] = math.inf
    return fraction.amin(dim=0)


def sdm_activation(logits: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``sdm(z)_k = (2 + q)^(d z_k) / sum_j (2 + q)^(d z_j)`` row by row (float64), via ``softmax(d ln(2 + q) z)``."""
    sharpness = d.to(torch.float64) * torch.log(Q_OFFSET + q.to(torch.float64))
    return torch.softmax(sharpness[:, None] * logits.to(torch.float64), dim=1)


def sdm_log_odds(logits: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``log((1 - p) / p)`` of ``p = sdm(z)_ŷ``, ``ŷ = argmax z``, as ``LSE_{j != ŷ} d ln(2 + q) (z_j - z_ŷ)``.

    Strictly decreasing in ``p`` and free of its saturation: ``p`` is exactly 1.0 in float64 for logit gaps past
    ~37 / (d ln(2 + q)), which would tie many in-distribution rows.
    """
    logits = logits.to(torch.float64)
    sharpness = d.to(torch.float64) * torch.log(Q_OFFSET + q.to(torch.float64))
    gaps = sharpness[:, None] * (logits - logits.amax(dim=1, keepdim=True))
    gaps.scatter_(1, logits.argmax(dim=1, keepdim=True), -math.inf)
    return torch.logsumexp(gaps, dim=1)


def _output_quantile(probability: torch.Tensor, predicted: torch.Tensor, table: torch.Tensor, counts: torch.Tensor):
    """Where ``sdm(z)_ŷ`` falls among the calibration outputs of class ŷ (official ``getCDFIndex`` with
    ``val_in_0to1``): 0 for a class without calibration rows, 1 at or above its largest, else the fraction below."""
    rows = table.index_select(0, predicted)
    size = counts.index_select(0, predicted)
    below = torch.searchsorted(rows, probability[:, None].contiguous(), side="left").squeeze(1).to(torch.float64)
    top = rows.gather(1, (size - 1).clamp_min(0)[:, None]).squeeze(1)
    quantile = torch.where(probability >= top, 1.0, below / size.clamp_min(1).to(torch.float64))
    return torch.where(size > 0, quantile, 0.0)


# ---------------------------------------------------------------------- the detector
@register
class SDM(OutputDetector):
    """SDM activation: ``1 - sdm(z)_ŷ`` from Similarity ``q``, Distance ``d`` and Magnitude ``z`` (as log-odds).

    Fit (ID training rows with features, logits and true labels): the support set is the fit features (centred on
    their mean: distances do not change, float32 cancellation does), with each row's class if the model predicts
    it correctly, else no class. For any row, its ``k = min(max_q, N)`` nearest support rows by exact L2 distance
    give ``q`` (leading neighbours whose class is ``ŷ``) and ``d0`` (distance to the nearest).

    Calibration: per true class ``c``, the sorted ``d0`` of the calibration rows with ``q > 0`` (the distance CDFs
    behind ``d``) and the sorted ``sdm(z)_c`` of all calibration rows of class ``c`` (the output CDFs behind
    :meth:`is_ood`). :meth:`calibrate` computes them on a held-out split (a validation split), as the paper does.
    Until then ``fit`` computes them on the fit rows themselves, each one leaving itself out of the search (the
    official code's convention for training rows): distances of the rows the model was trained on, so typically
    smaller and with larger ``q`` than those of unseen rows.

    Score: ``log((1 - p) / p)`` with ``p = sdm(z)_ŷ`` (:func:`sdm_log_odds`), higher = more OOD; the same ranking
    as ``1 - p`` without its saturation at 1. Every row with ``d = 0`` (farther from the support than the
    calibration rows) scores ``log(C - 1)``, the flat activation's value.

    Parameters
    ----------
    max_q : int, default 1000
        Neighbours searched per row, so the largest ``q`` (official ``maxQAvailableFromIndexer``); capped at the
        support size (minus one for a row of the support itself).
    backend : {"torch", "faiss"}, default "torch"
        Exact search as a chunked ``[n, D] x [D, N]`` product and ``topk`` in torch, or FAISS's ``IndexFlatL2``
        (the official index; needs the ``faiss`` extra). Both are exact; only ties may order differently.
    distance : {"min", "predicted"}, default "min"
        ``d`` is the minimum over classes of the distance quantiles (official), or the quantile among the
        calibration distances of the predicted class alone (see :func:`distance_quantile`). Either way one ``d``
        scales every logit, so the activation keeps the argmax of ``z``. With ``"min"`` the class whose calibration
        rows lie closest to the support sets ``d`` for every input, so ``d = 0`` (and a tied score) is common when
        that class is much tighter than the others.

    Attributes
    ----------
    state_ : ``support`` (centred fit features), ``support_mean``, ``support_class`` (``int64 [N]``: the predicted
        class of correctly predicted rows, -1 for the others), ``distance_table``/``distance_counts`` and
        ``output_table``/``output_counts`` (see :func:`class_sorted_table`).
    meta_ : ``calibration`` (``"fit rows, each left out of its own search"`` or ``"held-out rows"``),
        ``calibration_rows``.

    Deviations from the official code: docs/detectors.md, section ``sdm``.

    Paper: Schmaltz, "Similarity-Distance-Magnitude Universal Verification", arXiv:2502.20167, 2025 (ACL Findings
    2026 as "Similarity-Distance-Magnitude Activations").
    Code: ReexpressAI/sdm ``research_code/code/sdm_model.py`` (``soft_sdm_max``, ``set_summary_stats_for_support``,
    ``get_distance_quantiles``, ``getCDFIndex``), ``constants.py``.
    """

    name = "sdm"
    summary = "1 - SDM activation of the predicted class from similar correct neighbours, distance quantile and logits"
    paper = "Schmaltz, 'Similarity-Distance-Magnitude Universal Verification', arXiv:2502.20167, 2025"
    code = "https://github.com/ReexpressAI/sdm (research_code/code/sdm_model.py: soft_sdm_max, getCDFIndex)"
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features", "logits", "labels"})

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "max_q": [Interval(Integral, 1, None)],
        "backend": [Options(("torch", "faiss"))],
        "distance": [Options(("min", "predicted"))],
    }

    def __init__(self, *, max_q: int = DEFAULT_MAX_Q, backend: str = "torch", distance: str = "min") -> None:
        self.max_q = max_q
        self.backend = backend
        self.distance = distance
        self._faiss_index: Any = None
        super().__init__()

    # ------------------------------------------------------------------ fit and calibration
    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features, logits, labels = outputs.features, outputs.logits, outputs.labels
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ValueError(f"{self.name}: the logits have C=1 column; SDM needs at least 2 classes")
        if len(features) < 2:
            raise ValueError(f"{self.name}: fit got N=1 row; the support set needs at least 2 rows")
        class_counts(labels, num_classes, self.name, minimum=0)  # validates the label range
        predicted = logits.argmax(dim=1)
        mean = features.to(torch.float64).mean(dim=0)
        state = {
            "support": (features.to(torch.float64) - mean).to(features.dtype),
            "support_mean": mean,
            "support_class": torch.where(predicted == labels.to(predicted.device), predicted, -1).to(torch.int64),
        }
        self._faiss_index = None  # built for the new support on first search
        q, nearest = self._similarity_and_distance(state, features, predicted, leave_self_out=True)
        state.update(self._calibration_tables(logits, labels, predicted, q, nearest, num_classes))
        self.meta_["calibration"] = "fit rows, each left out of its own search"
        self.meta_["calibration_rows"] = len(features)
        return state

    def calibrate(self, outputs: ModelOutputs | Any, *, drop_ood: bool = False) -> SDM:
        """Recompute the distance and output CDFs on held-out ID rows (a validation split); returns ``self``.

        ``outputs`` need features, logits and labels from the same model as the fit rows; rows labelled OOD
        (label < 0) are refused unless ``drop_ood=True`` drops them. The support set stays the fit rows.
        """
        if self.state_ is None:
            raise NotFittedError(f"{self.name}: call fit(...) on the training rows before calibrate(...)")
        outputs = as_outputs(outputs)
        self._check_fields(outputs, self.fit_requires, "calibrate")
        outputs = self._prepare_fit(outputs, drop_ood)  # OOD-labelled and empty inputs: refused as in fit
        self._check_dims(outputs, "calibrate")
        num_classes = int(self.meta_["num_classes"])
        class_counts(outputs.labels, num_classes, self.name, minimum=0)
        predicted = outputs.logits.argmax(dim=1)
        state = self.state(outputs.features.device)
        q, nearest = self._similarity_and_distance(state, outputs.features, predicted, leave_self_out=False)
        tables = self._calibration_tables(outputs.logits, outputs.labels, predicted, q, nearest, num_classes)
        self.state_ = {**self.state_, **tables}
        self.meta_["calibration"] = "held-out rows"
        self.meta_["calibration_rows"] = len(outputs)
        return self

    def _calibration_tables(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        predicted: torch.Tensor,
        q: torch.Tensor,
        nearest: torch.Tensor,
        num_classes: int,
    ) -> dict[str, torch.Tensor]:
        """The distance CDFs (rows with ``q > 0``, by true class) and the output CDFs (``sdm(z)_y`` of every row, by
        true class ``y``; official ``trueClass_To_unrescaledOutputCDF``)."""
        labels = labels.to(q.device)
        similar = q > 0  # q = 0 rows are OOD by definition: their nearest distance is not to a similar row
        distance_table, distance_counts = class_sorted_table(nearest[similar], labels[similar], num_classes)
        if int(distance_counts.sum()) == 0:
            raise ValueError(
                f"{self.name}: no calibration row has q > 0 (none has a nearest training row that is correctly "
                "predicted as its own prediction), so the distance quantiles are undefined; check that features and "
                "logits come from the same model, and calibrate on more rows"
            )
        missing = torch.nonzero(distance_counts == 0).flatten().tolist()
        if missing:
            shown = ", ".join(str(c) for c in missing[:10]) + (" and more" if len(missing) > 10 else "")
            warnings.warn(
                f"{self.name}: class(es) {shown} have no calibration row with q > 0, so no distance quantiles ("
                + ("left out of the minimum" if self.distance == "min" else "d = 0 where predicted")
                + "); calibrate on more rows of those classes",
                RuntimeWarning,
                stacklevel=4,
            )
        d = self._quantile(nearest, distance_table, distance_counts, predicted)
        true_class_output = sdm_activation(logits, q, d).gather(1, labels[:, None]).squeeze(1)
        output_table, output_counts = class_sorted_table(true_class_output, labels, num_classes)
        return {
            "distance_table": distance_table,
            "distance_counts": distance_counts,
            "output_table": output_table,
            "output_counts": output_counts,
        }

    # ------------------------------------------------------------------ neighbour search
    def _similarity_and_distance(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, predicted: torch.Tensor, *, leave_self_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` (int64) and the nearest L2 distance ``d0`` (float64) of each row against the support set of
        ``state``. ``leave_self_out``: the rows *are* the support set, in order; each skips its own entry.
        """
        support, support_class = state["support"].to(features.dtype), state["support_class"]
        queries = (features.to(torch.float64) - state["support_mean"]).to(features.dtype)
        k = min(int(self.max_q), support.shape[0] - int(leave_self_out))
        rows = max(1, SCORE_MEMORY_BUDGET // self._search_row_bytes(support.shape[0], k))
        q_parts, nearest_parts = [], []
        for start in range(0, len(queries), rows):
            chunk = queries[start : start + rows]
            own = torch.arange(start, start + len(chunk), device=chunk.device) if leave_self_out else None
            _, index = self._nearest(chunk, support, k, own)
            q_parts.append(similarity_q(support_class[index] == predicted[start : start + rows, None].to(index.device)))
            # the search's |x|^2 - 2 x.b + |b|^2 loses digits to cancellation: d0 again, directly and in float64
            nearest = support.index_select(0, index[:, 0]).to(torch.float64) - chunk.to(torch.float64)
            nearest_parts.append(torch.linalg.vector_norm(nearest, dim=1))
        return torch.cat(q_parts), torch.cat(nearest_parts)

    def _nearest(
        self, queries: torch.Tensor, support: torch.Tensor, k: int, own: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of the ``k`` nearest support rows, nearest first (``own``: skip these)."""
        if self.backend == "faiss":
            return self._faiss_nearest(queries, support, k, own)
        squared = torch.addmm(support.square().sum(dim=1), queries, support.T, alpha=-2.0)  # [n, N]
        squared.add_(queries.square().sum(dim=1, keepdim=True))
        if own is not None:
            squared[torch.arange(len(own), device=own.device), own] = math.inf
        return torch.topk(squared, k, dim=1, largest=False, sorted=True)

    def _faiss_nearest(
        self, queries: torch.Tensor, support: torch.Tensor, k: int, own: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._faiss_index is None:  # rebuilt per state (dropped on copy and by fit)
            index = faiss_module().IndexFlatL2(support.shape[1])
            index.add(np.ascontiguousarray(support.detach().cpu().to(torch.float32).numpy()))
            self._faiss_index = index
        vectors = np.ascontiguousarray(queries.detach().cpu().to(torch.float32).numpy())
        squared, index = self._faiss_index.search(vectors, k + (own is not None))
        squared, index = torch.from_numpy(squared), torch.from_numpy(index)
        if own is not None:  # drop each row's own entry, or its last one when a tie pushed it past k + 1
            drop = index == own.cpu()[:, None]
            drop[:, -1] |= ~drop.any(dim=1)
            squared, index = squared[~drop].reshape(len(own), k), index[~drop].reshape(len(own), k)
        return squared.to(queries.device), index.to(queries.device)

    def _search_row_bytes(self, support_rows: int, k: int) -> int:
        per_neighbour = 32 * k  # distances, indices, classes, matches
        if self.backend == "faiss":
            return per_neighbour + 4096  # FAISS blocks the [n, N] distances itself
        return per_neighbour + 8 * support_rows

    # ------------------------------------------------------------------ scoring
    def components(self, outputs: ModelOutputs | Any) -> dict[str, Any]:
        """The quantities behind the score, per row: ``q``, ``nearest_distance`` (``d0``), ``d``, ``prediction``
        (ŷ), ``probability`` (``sdm(z)_ŷ``) and ``soft_bin`` (``ln((2 + q)^F)``, ``F`` the quantile of
        ``sdm(z)_ŷ`` among the calibration outputs of class ŷ). Numpy in, numpy out; torch in, torch out."""
        outputs = self._scoring_outputs(outputs)
        parts = self._components_in_chunks(outputs)
        if outputs.array_type == "numpy":
            return {key: value.cpu().numpy() for key, value in parts.items()}
        return parts

    def is_ood(self, outputs: ModelOutputs | Any) -> np.ndarray | torch.Tensor:
        """The paper's "strictly OOD" rule: ``floor(soft_bin) == 0``, i.e. ``(2 + q)^F < e``.

        It holds whenever ``q = 0`` (``ln 2 < 1``) and whenever ``d = 0`` (the activation is flat: no prediction).
        """
        outputs = self._scoring_outputs(outputs)
        parts = self._components_in_chunks(outputs)
        flagged = (parts["soft_bin"] < 1.0) | (parts["d"] == 0)
        return flagged.cpu().numpy() if outputs.array_type == "numpy" else flagged

    def _scoring_outputs(self, outputs: ModelOutputs | Any) -> ModelOutputs:
        """``outputs`` checked as ``score`` checks them."""
        outputs = as_outputs(outputs)
        if self.state_ is None:
            raise NotFittedError(f"{self.name}: call fit(...) on in-distribution outputs first")
        self._check_fields(outputs, self.requires, "score")
        if len(outputs) == 0:
            raise ValueError(f"{self.name}: got empty outputs (N=0); pass at least one row")
        self._check_dims(outputs, "score")
        return outputs

    def _components_in_chunks(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        width = (self.state_ or {})["output_table"].shape[1]  # the [n, M] rows of the output CDFs gathered per row
        rows = max(1, SCORE_MEMORY_BUDGET // (self._score_row_bytes(outputs) + 16 * width))
        parts = [self._components(outputs[start : start + rows]) for start in range(0, len(outputs), rows)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _similarity_distance_quantile(self, outputs: ModelOutputs) -> tuple[torch.Tensor, ...]:
        """ŷ, ``q``, ``d0`` and ``d`` of each row of ``outputs``."""
        predicted = outputs.logits.argmax(dim=1)
        state = self.state(outputs.features.device)
        q, nearest = self._similarity_and_distance(state, outputs.features, predicted, leave_self_out=False)
        predicted = predicted.to(q.device)
        d = self._quantile(nearest, state["distance_table"], state["distance_counts"], predicted)
        return predicted, q, nearest, d

    def _quantile(
        self, nearest: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        return distance_quantile(
            nearest, table, counts, predicted.to(table.device) if self.distance == "predicted" else None
        )

    def _components(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        predicted, q, nearest, d = self._similarity_distance_quantile(outputs)
        state = self.state(q.device)
        probability = sdm_activation(outputs.logits.to(q.device), q, d).gather(1, predicted[:, None]).squeeze(1)
        quantile = _output_quantile(probability, predicted, state["output_table"], state["output_counts"])
        soft_bin = quantile * torch.log(Q_OFFSET + q.to(torch.float64))
        return {"q": q, "nearest_distance": nearest, "d": d, "prediction": predicted, "probability": probability,
                "soft_bin": soft_bin}  # fmt: skip

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        _, q, _, d = self._similarity_distance_quantile(outputs)
        return sdm_log_odds(outputs.logits.to(q.device), q, d)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        support = (self.state_ or {}).get("support")
        rows = support.shape[0] if support is not None else 65536
        classes = self.meta_.get("num_classes") or 1024
        return self._search_row_bytes(rows, min(int(self.max_q), rows)) + 48 * classes
