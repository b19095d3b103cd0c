"""Detectors that need the penultimate features and the final linear layer: fDBD, NNGuide, GradNorm, NAC.

Each copies the head ``(W, b)`` into its state at fit, so scoring needs only ``features``; the logits are
recomputed as ``z @ W.T + b`` (the logits field, if present, is not read).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from oodguard.detectors.base import Detector, OutputDetector, percentile, register
from oodguard.detectors.faiss_index import INDEX_CONSTRAINTS, FaissSearch
from oodguard.detectors.params import Integral, Interval, Real
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


# ---------------------------------------------------------------------- shared helpers
def _logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``z @ W.T + b`` in the dtype of the features (one fused matmul)."""
    return torch.addmm(bias, features, weight.T)


def _dims(detector: Detector) -> tuple[int, int]:
    """(C, D) of a fitted detector, for memory estimates."""
    return int(detector.meta_.get("num_classes", 1000)), int(detector.meta_.get("feature_dim", 2048))


def _row_distances(weight: torch.Tensor, close: float = 1e-6, pairs_per_step: int = 4096) -> torch.Tensor:
    """``||w_i - w_j||`` for all row pairs (float64): fast Gram form, exact differences for close pairs.

    The Gram form ``|w_i|^2 + |w_j|^2 - 2 w_i.w_j`` loses relative accuracy only when ``d^2`` is small
    against ``|w_i|^2 + |w_j|^2``; those pairs (threshold ``close``) are recomputed from the differences,
    so every distance is accurate to ~1e-10 relative at the cost of one ``C x C x D`` matmul.
    """
    weight = weight.to(_F64)
    norms = (weight * weight).sum(dim=1)
    scale = norms[:, None] + norms[None, :]
    squared = (scale - 2.0 * (weight @ weight.T)).clamp_min_(0.0)
    rows, cols = torch.nonzero(squared <= close * scale, as_tuple=True)
    for start in range(0, rows.numel(), pairs_per_step):
        i, j = rows[start : start + pairs_per_step], cols[start : start + pairs_per_step]
        squared[i, j] = (weight[i] - weight[j]).square().sum(dim=1)
    return squared.sqrt_()


class _HeadStatistics(OutputDetector):
    """Additive fit statistics that also carry the head, so ``partial_fit`` and ``merge`` stay exact.

    The head is not a sum over samples, so it is summed once per fitted chunk (float64) together with
    the number of chunks, and recovered as ``sum / chunks`` (exactly the head after one ``fit``, within
    an ulp after many chunks). Every chunk must come from the same model, which is checked before
    combining (partial_fit in ``_statistics``, merge in ``merge``).
    """

    head_reductions = {"head_weight": "sum", "head_bias": "sum", "head_chunks": "sum"}

    def _head_statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        weight, bias = (t.to(device="cpu", dtype=_F64) for t in outputs.head)
        if self.stats_ is not None:  # partial_fit: refuse a chunk from another model before combining
            self._check_same_head(self._head_from(self.stats_), (weight, bias), "partial_fit")
        return {"head_weight": weight, "head_bias": bias, "head_chunks": torch.ones(1, dtype=_F64)}

    @staticmethod
    def _head_from(stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return stats["head_weight"] / stats["head_chunks"], stats["head_bias"] / stats["head_chunks"]

    def _check_same_head(self, mine: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...], stage: str) -> None:
        for a, b in zip(mine, theirs, strict=True):
            if a.shape != b.shape:
                return  # the base's C/D check gives the message
            scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-300)
            if a.numel() and float((a - b).abs().max()) > 1e-9 * scale:
                raise ValueError(
                    f"{self.name}: {stage} got data with a different final layer (head) than the data already "
                    "fitted; fit every chunk with outputs of the same model"
                )

    def merge(self, other: Detector) -> OutputDetector:
        if type(other) is type(self) and self.stats_ is not None and other.stats_ is not None:
            self._check_same_head(self._head_from(self.stats_), self._head_from(other.stats_), "merge")
        return super().merge(other)


# ---------------------------------------------------------------------- fDBD
@register
class FDBD(_HeadStatistics):
    """fDBD: feature-space distance to the decision boundaries, normalised by the distance to the train mean.

    ``s(x) = [ sum_{c != yhat} |f_yhat - f_c| / ||w_yhat - w_c|| ] / ||z - mu_train||``, OOD score ``-s(x)``.
    ``|f_yhat - f_c| / ||w_yhat - w_c||`` is the distance from ``z`` to the boundary between the predicted
    class and class ``c``. The paper's ``1/(C-1)`` factor is a constant and omitted, as in the official code.

    Fit: ``mu_train`` (mean training feature, from the additive statistics sum and count, so
    ``partial_fit``/``merge`` are exact) and the ``C x C`` matrix of ``||w_i - w_j||``.

    No parameters. Deviations from the official code: docs/detectors.md, section ``fdbd``.

    Paper: Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
    Official code: litianliu/fDBD-OOD ``run_imagenet.py`` (961621e).
    """

    name = "fdbd"
    summary = "sum of feature-space distances to the decision boundaries, divided by the distance to the train mean"
    paper = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"
    code = "https://github.com/litianliu/fDBD-OOD (run_imagenet.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})
    state_reductions = {"feature_sum": "sum", "count": "sum", **_HeadStatistics.head_reductions}

    _EPS = 1e-12

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        self._check_distinct_rows(outputs.head[0])
        features = outputs.features
        n = features.shape[0]
        total = features.new_zeros(features.shape[1], dtype=_F64)
        for start in range(0, n, 16384):  # float64 accumulation without a full float64 copy
            total += features[start : start + 16384].to(_F64).sum(dim=0)
        stats = {"feature_sum": total.cpu(), "count": torch.tensor([float(n)], dtype=_F64)}
        stats.update(self._head_statistics(outputs))
        return stats

    def _check_distinct_rows(self, weight: torch.Tensor) -> None:
        # ||w_i - w_j|| = 0 exactly when two rows are identical; find them exactly (no distance rounding).
        _, inverse, counts = torch.unique(weight, dim=0, return_inverse=True, return_counts=True)
        if int(counts.max()) > 1:
            group = int(torch.argmax(counts))
            rows = torch.nonzero(inverse == group).flatten()[:2].tolist()
            raise ValueError(
                f"{self.name}: head weight rows {rows[0]} and {rows[1]} are identical, so the distance between "
                "their decision boundary and a feature is undefined (division by zero); remove or merge the "
                "duplicate classes"
            )

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = self._head_from(stats)
        denominators = _row_distances(weight)
        denominators.fill_diagonal_(1.0)
        if bool((denominators == 0).any()):  # defensive: _statistics already refused identical rows
            raise ValueError(f"{self.name}: the head has identical weight rows; remove the duplicate classes")
        return {
            "mean": stats["feature_sum"] / stats["count"],
            "weight": weight,
            "bias": bias,
            "denominators": denominators,
        }

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        st = self.state(z.device, z.dtype)
        exact = self.state(z.device)  # float64 denominators for the small reductions
        logits = _logits(z, st["weight"], st["bias"]).to(_F64)
        top, predicted = logits.max(dim=1)
        # top - f_c >= 0 is |f_yhat - f_c|; the c = yhat term is 0 / 1.
        boundary = ((top[:, None] - logits) / exact["denominators"][predicted]).sum(dim=1)
        distance = torch.linalg.vector_norm(z - st["mean"], dim=1).to(_F64).clamp_min(self._EPS)
        return -(boundary / distance)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        c, d = _dims(self)
        return 8 * (4 * c + 2 * d) + 64


# ---------------------------------------------------------------------- NNGuide
@register
class NNGuide(FaissSearch):
    """NNGuide: energy guided by inner-product nearest neighbours in a confidence-scaled bank.

    Fit: a random bank of ``floor(bank_ratio * N)`` fit samples; bank vectors ``b_i = zhat_i * LSE(f(x_i))``
    with ``zhat = z / max(||z||, 1e-12)``. Score: ``s(x) = LSE(f(x)) * mean of the k largest <b_i, zhat(x)>``;
    OOD score ``-s(x)``. The fit is a random subsample, so there is no ``partial_fit``.

    Parameters
    ----------
    bank_ratio : float in (0, 1], default 0.01
        Share of the fit rows kept in the bank (official); the fit set needs at least ``k / bank_ratio`` rows.
    k : int >= 1, default 10
        Neighbours averaged (official).
    seed : int in [0, 2**32), default 0
        Seed of the ``numpy.random.RandomState`` shuffle that draws the bank (official ``np.random.seed(0)``).
    react_percentile : float in (0, 100] or None, default None
        When set, features are clipped at this percentile of all bank feature entries, for the bank and at
        score time (the official ResNet-50 engine uses 95).
    backend : {"torch", "faiss"}, default "torch"
        ``"torch"``: exact search, a product with the bank and ``topk``. ``"faiss"`` (the ``faiss`` extra): a
        FAISS index of the bank with the inner-product metric, as in ``knn``.
    index : {"flat", "ivf", "hnsw"}, default "flat"
        FAISS index: ``"flat"`` is exact (the torch result up to float32 rounding); ``"ivf"`` and ``"hnsw"`` are
        approximate and can only miss larger inner products, so the guidance is never overestimated. IVF
        indexes the bank lifted to equal norms, which keeps the inner products and lets its lists find the
        large-norm rows. The torch backend takes only ``"flat"``.
    nlist : int >= 1 or None, default None
        IVF lists; None is ``min(N_bank / 39, 4 sqrt(N_bank))``. k-means trains on at most ``256 * nlist`` bank
        rows drawn with ``seed``.
    nprobe : int >= 1, default 8
        IVF lists searched per query.
    M : int >= 2, default 32
        HNSW links per node.
    ef_search : int >= 1, default 128
        HNSW candidates explored per query; at least ``k``.

    A trained IVF or HNSW index is saved in the state as FAISS's own bytes (no pickle), so a loaded detector
    searches the same index.

    Deviations from the official code: docs/detectors.md, section ``nnguide``.

    Paper: Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    Official code: roomo7time/nnguide ``ood_detectors/nnguide.py``, ``dataloaders/factory.py``,
    ``model_engines/resnet50_react.py`` (c123cac).
    """

    name = "nnguide"
    summary = "energy times the mean of the k largest inner products with a confidence-scaled feature bank"
    paper = "Park, Jung & Teoh, Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023"
    code = "https://github.com/roomo7time/nnguide (ood_detectors/nnguide.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})
    _equal_norm_bank = False  # bank rows scaled by their energies

    _parameter_constraints = {
        "bank_ratio": [Interval(Real, 0, 1, closed="right")],
        "k": [Interval(Integral, 1, None)],
        "seed": [Interval(Integral, 0, 2**32, closed="left")],
        "react_percentile": [None, Interval(Real, 0, 100, closed="right")],
        **INDEX_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        bank_ratio: float = 0.01,
        k: int = 10,
        seed: int = 0,
        react_percentile: float | None = None,
        backend: str = "torch",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        M: int = 32,
        ef_search: int = 128,
    ) -> None:
        self.bank_ratio = bank_ratio
        self.k = k
        self.seed = seed
        self.react_percentile = react_percentile
        self._set_search(backend=backend, index=index, nlist=nlist, nprobe=nprobe, M=M, ef_search=ef_search)
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features
        n, k, ratio = features.shape[0], int(self.k), float(self.bank_ratio)
        size = int(n * ratio)  # floor, as the official subsample
        if size < k:
            raise ValueError(
                f"{self.name}: the bank holds {size} sample(s) (bank_ratio={ratio} of N={n}) but k={k}; "
                f"raise bank_ratio (at most 1.0), fit on at least {math.ceil(k / ratio)} rows, or lower k"
            )
        order = np.random.RandomState(int(self.seed)).permutation(n)[:size]
        bank = features[torch.from_numpy(order).to(features.device)]
        weight, bias = (t.to(device=features.device) for t in outputs.head)
        state: dict[str, torch.Tensor] = {"weight": weight.to(_F64), "bias": bias.to(_F64)}
        if self.react_percentile is not None:
            # on the CPU: base.percentile falls back to numpy above 16M entries (a 1 % ImageNet bank has 26M)
            clip = percentile(bank.cpu(), float(self.react_percentile)).reshape(1).to(_F64)
            state["clip"] = clip
            bank = bank.clamp_max(clip.to(device=bank.device, dtype=bank.dtype))  # in the dtype used at score
        bank = bank.to(_F64)
        energy = torch.logsumexp(_logits(bank, state["weight"], state["bias"]), dim=1)
        state["bank"] = (F.normalize(bank, dim=1) * energy[:, None]).to(features.dtype)
        state.update(self._index_state(state["bank"]))
        return state

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        st = self.state(z.device, z.dtype)
        if "clip" in st:
            z = z.clamp_max(st["clip"])
        energy = torch.logsumexp(_logits(z, st["weight"], st["bias"]), dim=1).to(_F64)
        if self.backend == "faiss":
            top = self._faiss_top(F.normalize(z, dim=1), int(self.k))
        else:
            top = (F.normalize(z, dim=1) @ st["bank"].T).topk(int(self.k), dim=1).values
        guidance = top.to(_F64).mean(dim=1)
        return -(energy * guidance)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        c, d = _dims(self)
        if self.backend == "faiss":
            return 8 * (c + 2 * d) + self._faiss_row_bytes(d) + 64
        bank = self.state_["bank"].shape[0] if self.state_ is not None else 1
        return 8 * (2 * bank + c + 2 * d) + 64


# ---------------------------------------------------------------------- GradNorm
@register
class GradNorm(OutputDetector):
    """GradNorm: L1 norm of the gradient of the KL to the uniform distribution w.r.t. the last-layer weight.

    ``L = sum_c -log softmax(f / T)_c`` (all-ones target). The gradient ``dL/dW = (1/T)(C p - 1) z^T`` with
    ``p = softmax(f / T)`` is an outer product, so its L1 norm has the closed form
    ``s(x) = (1/T) (sum_d |z_d|) (sum_c |C p_c - 1|)``; OOD score ``-s(x)``. ``fit`` only records the head
    ``(W, b)``. The gradient through the model is the separate detector ``gradnorm_autograd``
    (:class:`oodguard.detectors.model.gradient.GradNormAutograd`).

    Parameters
    ----------
    temperature : float > 0, default 1.0
        ``T`` (official ``--temperature_gradnorm``).

    Deviations from the official code: docs/detectors.md, section ``gradnorm``.

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
    Wild", NeurIPS 2021. Official code: deeplearning-wisc/gradnorm_ood ``test_ood.py``
    (``iterate_data_gradnorm``, 18d5d33); OpenOOD ``gradnorm_postprocessor.py`` is equivalent.
    """

    name = "gradnorm"
    summary = "L1 norm of the last-layer weight gradient of the KL divergence to uniform (closed form)"
    paper = (
        "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, NeurIPS 2021"
    )
    code = "https://github.com/deeplearning-wisc/gradnorm_ood (test_ood.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})  # fit only records the head; D is checked at score

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature: float = 1.0) -> None:
        self.temperature = temperature
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        weight, bias = outputs.head  # type: ignore[misc]  # fit_requires names the head
        return {"weight": weight.to(_F64), "bias": bias.to(_F64)}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        st = self.state(z.device, z.dtype)
        t = float(self.temperature)
        logits = _logits(z, st["weight"], st["bias"]).to(_F64)
        p = torch.softmax(logits / t, dim=1)
        spread = (p * logits.shape[1] - 1.0).abs().sum(dim=1)
        return -(torch.linalg.vector_norm(z, ord=1, dim=1).to(_F64) * spread / t)  # no |z| temporary

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        c, d = _dims(self)
        return 8 * (4 * c + d) + 64


# ---------------------------------------------------------------------- NAC
def nac_bin_edges(num_edges: int) -> torch.Tensor:
    """NAC's ``M`` bin edges in [0, 1.2] (float64): log-spaced towards 0 and 1, symmetric about 0.5.

    ``t = linspace(1, sqrt(1000), M/2)``, ``x_l = log_1000(t)`` in [0, 0.5], ``x_r = reverse(1 - x_l)``;
    edges ``= concat(x_l[:-1], x_r)`` with the last edge raised to 1.01, then 1.2 appended (as the
    official ``logspace(1e3, M)``). Bins are ``[e_i, e_{i+1})``; the last one, ``[1.01, 1.2)``, is never hit.
    """
    half = num_edges // 2
    t = np.linspace(1.0, np.sqrt(1000.0), num=half)
    left = np.log(t) / np.log(1000.0)
    right = (1.0 - left)[::-1]
    edges = np.concatenate([left[:-1], right])
    edges[-1] += 1e-2
    return torch.from_numpy(np.append(edges, 1.2))


@register
class NAC(_HeadStatistics):
    """NAC-UE on the penultimate layer: how well the training data covered each neuron's state.

    Neuron state, per sample and unit ``n``: ``state_n = sigmoid(alpha * z_n * g_n)`` with ``g = dL/dz =
    W^T (p - 1/C)`` the gradient of ``L = sum_c -(1/C) log softmax(f)_c`` (closed form, no autograd). Bins:
    ``M`` edges from :func:`nac_bin_edges`, ``M - 1`` right-open bins. Fit: ``count[m, n]`` = fit samples whose
    state of unit ``n`` lies in bin ``m`` (additive, so ``partial_fit``/``merge`` are exact);
    ``cov = min(count / O, 1)``. Score: ``s(x) = mean_n cov[bin(state_n(x)), n]``; OOD score ``-s(x)``.
    NAC on inner layers, with gradients through the model, is the separate detector ``nac_layers``
    (:class:`oodguard.detectors.model.nac_layers.NACLayers`).

    Parameters
    ----------
    alpha : float > 0, default 100.0
        Sigmoid steepness.
    M : even int >= 4, default 50
        Number of bin edges.
    O : float > 0, default 50
        Count at which a bin is fully covered.

    The defaults are the official penultimate setting for ResNet-18 CIFAR-10; docs/detectors.md, section
    ``nac``, lists the other official settings and the deviations from the official code.

    Paper: Liu, Tian, Li, Ma & Wang, "Neuron Activation Coverage: Rethinking Out-of-distribution Detection
    and Generalization", ICLR 2024. Official code: BierOne/ood_coverage
    ``openood/postprocessors/nac/{coverage,instr_state,utils}.py`` (``KMNC``, ``Estimator``, ``logspace``,
    ``kl_grad``, ``sigmoid``; b002780).
    """

    name = "nac"
    summary = "mean training coverage of the histogram bins hit by sigmoid(alpha * z * dKL/dz) (penultimate NAC)"
    paper = (
        "Liu, Tian, Li, Ma & Wang, Neuron Activation Coverage: Rethinking Out-of-distribution Detection and "
        "Generalization, ICLR 2024"
    )
    code = "https://github.com/BierOne/ood_coverage (openood/postprocessors/nac/coverage.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})

    state_reductions = {"counts": "sum", **_HeadStatistics.head_reductions}
    _parameter_constraints = {
        "alpha": [Interval(Real, 0, None, closed="neither")],
        "M": [Interval(Integral, 4, None)],  # bin edges; even (checked below)
        "O": [Interval(Real, 0, None, closed="neither")],
    }

    _FIT_CHUNK = 16384

    def __init__(self, *, alpha: float = 100.0, M: int = 50, O: float = 50) -> None:  # noqa: N803
        self.alpha = alpha
        self.M = M
        self.O = O
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.M % 2:
            raise self._param_error("M", "an even integer >= 4 (the number of bin edges)")

    def _states(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """sigmoid(alpha * z * dL/dz) in the dtype of ``z``; weight and bias already in that dtype."""
        log_p = torch.log_softmax(_logits(z, weight, bias), dim=1)
        grad = (log_p.exp_() - 1.0 / weight.shape[0]) @ weight
        # the official 1 / (1 + exp(-alpha * o * g)), in place to spare [n, D] temporaries
        return grad.mul_(z).mul_(-float(self.alpha)).exp_().add_(1.0).reciprocal_()

    @staticmethod
    def _edges_for(edges: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Edges in ``dtype`` rounded up, so ``state >= edge`` is decided exactly as against float64 edges."""
        cast = edges.to(dtype)
        low = cast.to(_F64) < edges
        return torch.where(low, torch.nextafter(cast, torch.full_like(cast, math.inf)), cast)

    @staticmethod
    def _slots(states: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Row of the padded coverage table per state: 0 below e_0, 1..M-1 for bin [e_{i-1}, e_i), M above.

        The padded table has zero rows 0 and M, so a state outside every bin (impossible for a sigmoid,
        which lies in [0, 1] while the bins span [0, 1.2)) gets coverage 0 without any masking.
        """
        return torch.searchsorted(edges, states, right=True, out_int32=True)

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        weight, bias = (t.to(device=z.device, dtype=z.dtype) for t in outputs.head)
        edges = self._edges_for(nac_bin_edges(int(self.M)), z.dtype).to(z.device)
        m, d = edges.numel(), z.shape[1]
        counts = torch.zeros((m + 1) * d, dtype=_F64, device=z.device)
        units = torch.arange(d, device=z.device)
        for start in range(0, z.shape[0], self._FIT_CHUNK):  # bounds memory; one bincount per chunk
            slots = self._slots(self._states(z[start : start + self._FIT_CHUNK], weight, bias), edges)
            counts += torch.bincount((slots.long() * d + units).flatten(), minlength=(m + 1) * d).to(_F64)
        stats = {"counts": counts.reshape(m + 1, d)[1:m].cpu()}
        stats.update(self._head_statistics(outputs))
        return stats

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = self._head_from(stats)
        coverage = (stats["counts"] / float(self.O)).clamp_max(1.0)
        zero = coverage.new_zeros(1, coverage.shape[1])
        return {
            "coverage": torch.cat([zero, coverage, zero]),  # [M + 1, D], see _slots
            "edges": nac_bin_edges(int(self.M)),
            "weight": weight,
            "bias": bias,
        }

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        st = self.state(z.device, z.dtype)
        exact = self.state(z.device)  # float64 edges and coverage
        edges = self._edges_for(exact["edges"], z.dtype)
        slots = self._slots(self._states(z, st["weight"], st["bias"]), edges)
        d = z.shape[1]
        flat = slots.mul_(d).add_(torch.arange(d, device=z.device, dtype=slots.dtype))
        return -exact["coverage"].reshape(-1)[flat].mean(dim=1)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        c, d = _dims(self)
        return 8 * (3 * c + 4 * d) + 64
