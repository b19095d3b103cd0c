"""Test-time scores that belong to a training method: DOS's absent-class score (higher = more OOD).

AbeT's ablated energy is the registered ``energy`` detector applied to its learned-temperature logits, and OE,
MixOE and LogitNorm are scored with ``msp``; DOS's score needs to know that the last logit is the absent class,
so it lives here rather than among the registered detectors, which run on any classifier.
"""

from __future__ import annotations

import numpy as np
import torch


def absent_class_score(logits: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """DOS's score on a (K+1)-way classifier whose last logit is the absent (OOD) category.

    ``S(x) = 1 - softmax(f)_{K+1}`` (higher = ID; official ``detect.py --score abs``). Returned as the OOD score
    ``f_{K+1} - LSE_{k <= K} f_k = log(p_{K+1} / (1 - p_{K+1}))``: a strictly decreasing transform of ``S`` that
    does not saturate when ``p_{K+1}`` is near 0 or 1 (ties would distort FPR@95). Numpy in, numpy out.

    Paper: Jiang, Cheng, Chen, Wang & Wei, "Diverse Outlier Sampling for Out-of-Distribution Detection",
    ICLR 2024. Code: lygjwy/DOS ``detect.py`` (``get_abs_score``).
    """
    as_numpy = isinstance(logits, np.ndarray)
    values = torch.as_tensor(logits)
    if values.ndim != 2 or values.shape[1] < 3:
        raise ValueError(
            f"logits must be [N, K + 1] with K >= 2 known classes and the absent class last, got "
            f"{tuple(values.shape)}; score a model trained with oodguard.train's DOS"
        )
    if not values.is_floating_point():
        values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("logits contain NaN or inf; the absent-class score needs finite logits")
    scores = values[:, -1] - torch.logsumexp(values[:, :-1], dim=1)
    return scores.numpy() if as_numpy else scores
