"""A linear classification head trained on frozen embeddings, so every output-based detector applies to text.

``LinearHead`` is one ``nn.Linear``: ``oodguard.extraction.extract`` finds it as the model's final linear layer, so the
extracted ``features`` are the embeddings themselves and ``logits = features @ W.T + b``. It is trained by
multinomial logistic regression (mean cross-entropy + ``weight_decay / 2 * ||W||^2``, the bias unpenalised)
with full-batch L-BFGS (scipy's L-BFGS-B, exact gradients) in float64: the problem is strictly convex, so the
result is the unique optimum and does not depend on the seeded start beyond the solver's tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import optimize
from torch import nn

from oodguard import persist

__all__ = ["LinearHead", "HeadConfig", "train_linear_head", "load_or_train_head"]

#: Bump when the head or its training changes, so that cached heads are not reused.
HEAD_VERSION = "text-linear-head-2"


class LinearHead(nn.Module):
    """``logits = linear(embeddings)``: a linear classifier over ``dim``-dimensional embeddings.

    Parameters
    ----------
    dim : int
        Embedding size (the input).
    num_classes : int
        Number of classes (outputs), at least 2.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.linear = nn.Linear(int(dim), int(num_classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)


@dataclass(frozen=True)
class HeadConfig:
    """Everything besides the data that decides the trained head (and so its cache key)."""

    num_classes: int
    weight_decay: float = 1e-3
    seed: int = 0
    max_iter: int = 500


def _check_data(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings, labels = torch.as_tensor(embeddings), torch.as_tensor(labels)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must have shape [N, D] with N >= 1, got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point() or not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings must be finite floating-point values")
    if labels.shape != (embeddings.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integers of shape [{embeddings.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}; OOD rows (label < 0) do not "
            "belong in the training data"
        )
    return embeddings.detach().cpu().to(torch.float32).contiguous(), labels.detach().cpu().to(torch.int64).contiguous()


def train_linear_head(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    seed: int = 0,
    max_iter: int = 500,
) -> LinearHead:
    """Fit a :class:`LinearHead` by L2-regularised multinomial logistic regression (full-batch L-BFGS).

    Minimises ``mean_i CE(W e_i + b, y_i) + weight_decay / 2 * ||W||_F^2`` in float64 (the same objective as
    scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``, which leaves the intercept unpenalised).

    Parameters
    ----------
    embeddings : float tensor ``[N, D]``
    labels : integer tensor ``[N]`` in ``[0, num_classes)``
    num_classes : int, optional
        Default ``labels.max() + 1``.
    weight_decay : float
        L2 penalty on the weights (> 0 keeps the optimum finite when classes separate).
    seed : int
        Seeds the starting point.
    max_iter : int
        L-BFGS iterations at most.

    Returns
    -------
    LinearHead (float32, eval mode).

    Examples
    --------
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> head = train_linear_head(x, torch.tensor([0, 0, 1, 1]))
    >>> head(x).argmax(1).tolist()
    [0, 0, 1, 1]
    """
    labels_tensor = torch.as_tensor(labels)
    if num_classes is None:
        if labels_tensor.numel() == 0:
            raise ValueError("labels is empty; give at least one labelled embedding")
        num_classes = int(labels_tensor.max()) + 1
    config = HeadConfig(
        num_classes=int(num_classes), weight_decay=float(weight_decay), seed=int(seed), max_iter=int(max_iter)
    )
    return _train(embeddings, labels, config)


def _train(embeddings: torch.Tensor, labels: torch.Tensor, config: HeadConfig) -> LinearHead:
    if not config.weight_decay > 0:
        raise ValueError(
            f"weight_decay must be > 0 (it keeps the weights finite on separable data), got {config.weight_decay}"
        )
    if config.max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {config.max_iter}")
    x, y = _check_data(embeddings, labels, config.num_classes)
    x = x.double()
    n, dim, classes = x.shape[0], x.shape[1], config.num_classes
    targets = nn.functional.one_hot(y, classes).double()
    generator = torch.Generator().manual_seed(config.seed)
    start = torch.cat([0.01 * torch.randn(classes * dim, generator=generator, dtype=torch.float64),
                       torch.zeros(classes, dtype=torch.float64)])  # fmt: skip

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # Loss and its exact gradient: d/dW = (P - Y)^T X / N + weight_decay * W, d/db = mean(P - Y).
        parameters = torch.from_numpy(theta)
        weight, bias = parameters[: classes * dim].view(classes, dim), parameters[classes * dim :]
        log_p = torch.log_softmax(x @ weight.T + bias, dim=1)
        loss = -(targets * log_p).sum() / n + 0.5 * config.weight_decay * weight.pow(2).sum()
        residual = (log_p.exp() - targets) / n
        gradient = torch.cat([(residual.T @ x + config.weight_decay * weight).reshape(-1), residual.sum(0)])
        return float(loss), gradient.numpy()

    # scipy's L-BFGS-B rather than torch.optim.LBFGS: same method, without torch.optim's seconds-long import.
    result = optimize.minimize(
        objective, start.numpy(), jac=True, method="L-BFGS-B",
        options={"maxiter": config.max_iter, "maxcor": 20, "gtol": 1e-9, "ftol": 1e-15},
    )  # fmt: skip
    solution = torch.from_numpy(result.x)
    head = LinearHead(dim, classes)
    with torch.no_grad():
        head.linear.weight.copy_(solution[: classes * dim].view(classes, dim))
        head.linear.bias.copy_(solution[classes * dim :])
    return head.eval()


# ---------------------------------------------------------------------------------------------- cache
def training_key(embeddings: torch.Tensor, labels: torch.Tensor, config: HeadConfig) -> str:
    """sha256 over the head version, the config and the exact training data bytes (hex, 16 chars)."""
    x, y = _check_data(embeddings, labels, config.num_classes)
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": HEAD_VERSION, "config": asdict(config), "shape": list(x.shape)}).encode())
    digest.update(x.numpy().tobytes())
    digest.update(y.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_or_train_head(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cache_dir: str | os.PathLike,
    weight_decay: float = 1e-3,
    seed: int = 0,
    max_iter: int = 500,
) -> LinearHead:
    """Load a cached head for exactly this data and config, or train one (:func:`train_linear_head`) and cache it.

    Stored as safetensors (never pickle) in ``cache_dir`` under a name keyed by :func:`training_key`; an
    unreadable file is replaced; the write is atomic.
    """
    config = HeadConfig(
        num_classes=int(num_classes), weight_decay=float(weight_decay), seed=int(seed), max_iter=int(max_iter)
    )
    key = training_key(embeddings, labels, config)
    path = Path(cache_dir) / f"{HEAD_VERSION}-{key}.safetensors"
    dim = torch.as_tensor(embeddings).shape[1]
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None:
        head = LinearHead(dim, config.num_classes)
        try:
            head.load_state_dict(cached[0])
            return head.eval()
        except RuntimeError:
            pass  # weights of another shape: retrain and overwrite them below
    head = _train(embeddings, labels, config)
    # an unwritable cache directory only costs the retraining next time
    persist.save_cache(path, head.state_dict(), kind=CACHE_KIND, version=1,
                       header={"head_version": HEAD_VERSION, "config": asdict(config)})  # fmt: skip
    return head


#: The kind of a cached text head's file (see oodguard.persist).
CACHE_KIND = "cache.text_head"
