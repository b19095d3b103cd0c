"""Outlier samplers: which auxiliary outliers a training step uses.

``TakeAll`` uses the outlier batch as it comes (OE, energy fine-tuning, MixOE). ``DiverseOutlierSampler`` is DOS's
per-iteration sampler: cluster a candidate batch on normalised features and keep the most informative outlier
of each cluster.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from oodguard.extraction.extract import find_head


class TakeAll:
    """Use every outlier of the batch (the default of OE, energy fine-tuning and MixOE)."""

    def __call__(self, model: nn.Module, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return candidates

    def __repr__(self) -> str:
        return "TakeAll()"


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    n_init: int = 5,
    max_iter: int = 300,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Euclidean k-means (k-means++ seeding, Lloyd iterations), the best of ``n_init`` runs by inertia.

    As scikit-learn's ``KMeans``: convergence when the squared centre shift falls to ``tol`` times the mean
    per-dimension variance of the points. Differences: plain (not greedy) k-means++ seeding, and an empty cluster
    keeps its previous centre. Computed in float64.

    Returns
    -------
    labels ``int64 [N]``, centres ``[k, D]``, inertia (sum of squared distances to the assigned centres).
    """
    if points.ndim != 2 or points.shape[0] < num_clusters or num_clusters < 1:
        raise ValueError(f"kmeans needs [N, D] points with N >= num_clusters >= 1, got {tuple(points.shape)} and "
                         f"num_clusters={num_clusters}")  # fmt: skip
    x = points.to(torch.float64)
    threshold = tol * float(x.var(dim=0, unbiased=False).mean())
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(n_init):
        centres = _kmeans_plus_plus(x, num_clusters, generator)
        for _ in range(max_iter):
            labels = torch.cdist(x, centres).argmin(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=num_clusters).to(x.dtype)[:, None]
            updated = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            shift = float((updated - centres).pow(2).sum())
            centres = updated
            if shift <= threshold:
                break
        distances = torch.cdist(x, centres).pow(2)
        labels = distances.argmin(dim=1)
        inertia = float(distances.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[2]:
            best = (labels, centres, inertia)
    if best is None:  # n_init >= 1 is checked by the caller
        raise ValueError("kmeans: n_init must be at least 1")
    return best


def _random_device(generator: torch.Generator | None) -> torch.device:
    """Where random draws happen: on the generator's device (the training loop's is on the CPU), whatever device
    the data is on, so the draws (and the chosen outliers) do not depend on where the model runs."""
    return torch.device("cpu") if generator is None else generator.device


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    draw_on = _random_device(generator)
    first = int(torch.randint(0, x.shape[0], (1,), generator=generator, device=draw_on))
    centres = [x[first]]
    closest = (x - centres[0]).pow(2).sum(dim=1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0:
            pick = int(torch.multinomial((closest / total).to(draw_on), 1, generator=generator)[0])
        else:  # every point sits on a centre already: any point will do
            pick = int(torch.randint(0, x.shape[0], (1,), generator=generator, device=draw_on)[0])
        centres.append(x[pick])
        closest = torch.minimum(closest, (x - x[pick]).pow(2).sum(dim=1))
    return torch.stack(centres)


class DiverseOutlierSampler:
    """DOS: keep the most informative outlier of each cluster of normalised candidate features.

    Per step, with the model in eval mode and no gradient: penultimate features ``h`` (the input of the final
    linear layer) and the absent-class probability ``w = softmax(f)_{K+1}`` (the last logit) of every candidate;
    k-means (``num_clusters``, ``n_init``) on ``h / ||h||``; from each of the first ``min(k, num_keep)`` clusters
    the ``q`` members with the **smallest** ``w`` (the most ID-like, hardest outliers), with ``q = 1`` if
    ``k > num_keep`` else ``num_keep // k``, all members of a cluster with at most ``q``; any shortfall to
    ``num_keep`` is filled with random candidates not yet chosen. The model's train/eval mode is restored.

    Defaults (official ``train_diverse.py``): ``num_clusters = 64``, ``n_init = 5``, ``num_keep = 64`` (batch 64 x
    ``size_factor_sampled_ood`` 1). The candidate batch is the outlier loader's batch; the official size is
    ``pool / ID-train-size x batch`` (300000 / 50000 x 64 = 384). k-means runs in torch (for speed; k and n_init
    as the official scikit-learn call), see ``kmeans``.

    Paper: Jiang, Cheng, Chen, Wang, Wei, "Diverse Outlier Sampling for Out-of-Distribution Detection", ICLR 2024.
    Code: lygjwy/DOS ``train_diverse.py``.
    """

    def __init__(self, num_keep: int = 64, num_clusters: int = 64, n_init: int = 5, head_name: str | None = None):
        for name, value in (("num_keep", num_keep), ("num_clusters", num_clusters), ("n_init", n_init)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_keep, self.num_clusters, self.n_init, self.head_name = num_keep, num_clusters, n_init, head_name

    def __repr__(self) -> str:
        s = self
        return f"DiverseOutlierSampler(num_keep={s.num_keep}, num_clusters={s.num_clusters}, n_init={s.n_init})"

    def select(
        self, features: torch.Tensor, absent_probability: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Indices of the chosen candidates, given their features ``[N, D]`` and absent-class probabilities ``[N]``.

        Clustering uses ``features / ||features||``. Returns ``min(num_keep, N)`` distinct indices: the per-cluster
        choices in cluster order, then the random fill.
        """
        n = features.shape[0]
        if absent_probability.shape != (n,):
            raise ValueError(f"absent_probability must have shape [{n}], got {tuple(absent_probability.shape)}")
        if n <= self.num_keep:
            return torch.arange(n)
        k = min(self.num_clusters, n)
        labels, _, _ = kmeans(F.normalize(features.to(torch.float64), dim=1), k, self.n_init, generator=generator)
        return choose_per_cluster(labels, absent_probability, k, self.num_keep, generator)

    @torch.no_grad()
    def __call__(self, model: nn.Module, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        found = find_head(model, self.head_name)
        if found is None:
            raise ValueError("DiverseOutlierSampler needs the model's penultimate features: pass head_name= naming "
                             "the final linear layer")  # fmt: skip
        captured: dict[str, torch.Tensor] = {}
        handle = found[1].register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0]))
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            logits = model(candidates)
        finally:
            handle.remove()
            for module, training in modes:
                module.training = training
        absent = F.softmax(logits.to(torch.float64), dim=1)[:, -1]
        features = captured["h"].flatten(1)
        return candidates[self.select(features, absent, generator).to(candidates.device)]


def choose_per_cluster(
    labels: torch.Tensor,
    absent_probability: torch.Tensor,
    num_clusters: int,
    num_keep: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DOS's choice given cluster labels: from each of the clusters ``0 .. min(k, num_keep) - 1`` the ``q`` members
    with the smallest absent-class probability (``q = 1`` if ``k > num_keep`` else ``num_keep // k``; all members of
    a smaller cluster), then random unchosen candidates up to ``num_keep``. Ties in ``w`` keep index order."""
    n = labels.shape[0]
    if absent_probability.shape != (n,):
        raise ValueError(f"absent_probability must have shape [{n}] like labels, got {tuple(absent_probability.shape)}")
    absent_probability = absent_probability.to(labels.device)
    quota = 1 if num_clusters > num_keep else num_keep // num_clusters
    # sort by (cluster, w) with stable sorts, the secondary key first
    order = torch.argsort(absent_probability, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    rank = torch.arange(n, device=labels.device) - torch.searchsorted(sorted_labels, sorted_labels, right=False)
    chosen = order[(rank < quota) & (sorted_labels < min(num_clusters, num_keep))]
    shortfall = min(num_keep, n) - chosen.numel()
    if shortfall > 0:
        free = torch.ones(n, dtype=torch.bool, device=labels.device)
        free[chosen] = False
        rest = torch.nonzero(free).squeeze(1)
        permutation = torch.randperm(rest.numel(), generator=generator, device=_random_device(generator))
        chosen = torch.cat([chosen, rest[permutation[:shortfall].to(labels.device)]])
    return chosen


def dos_candidate_size(pool_size: int, id_train_size: int, batch_size: int) -> int:
    """DOS's candidate batch ``floor(pool_size / id_train_size * batch_size)`` (official: 300000/50000*64 = 384)."""
    for name, value in (("pool_size", pool_size), ("id_train_size", id_train_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return max(1, math.floor(pool_size / id_train_size * batch_size))
