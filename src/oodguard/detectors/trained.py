"""Scores of models trained for OOD detection: DOS's absent-class probability.

(AbeT's ablated energy is the ``energy`` detector on its learned-temperature logits, and OE, MixOE and LogitNorm
are scored with ``msp``; see ``oodguard.train``.)
"""

from __future__ import annotations

import torch

from ..outputs import ModelOutputs
from .base import Detector, register


@register
class AbsentClass(Detector):
    """DOS's score on a (K+1)-way classifier whose last logit is the absent (OOD) category.

    ``S(x) = 1 - softmax(f)_{K+1}`` (higher = ID, ``detect.py --score abs``); the OOD score is the log-odds of the
    absent class, ``f_{K+1} - LSE_{k <= K} f_k = log(p_{K+1} / (1 - p_{K+1}))``, a strictly decreasing transform
    of ``S`` that does not saturate when ``p_{K+1}`` is near 0 or 1 (ties would distort FPR@95).

    Paper: Jiang, Cheng, Chen, Wang & Wei, "Diverse Outlier Sampling for Out-of-Distribution Detection",
    ICLR 2024. Code: lygjwy/DOS ``detect.py`` (``get_abs_score``). No fit.

    Parameters
    ----------
    known_classes : int, required
        K, the number of in-distribution classes; the logits must have K + 1 columns. Required so that the score is
        never applied by accident to a plain K-way classifier (its last class would pass for the absent one), and
        so that default benchmark runs leave it out unless the benchmark's model has the extra output.
    """

    name = "absent-class"
    summary = "log-odds of the absent (last) class of a (K+1)-way classifier trained with outliers (DOS)"
    paper = "Jiang et al., ICLR 2024"
    code = "lygjwy/DOS detect.py"
    requires = frozenset({"logits"})
    needs_fit = False
    defaults = {"known_classes": None}
    required_params = ("known_classes",)

    def _check_params(self) -> None:
        value = self.params["known_classes"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{self.name}: known_classes must be an integer >= 2 (K, the number of ID classes; the "
                             f"model has K + 1 outputs), got {value!r}")  # fmt: skip

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        return {}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 16 * outputs.logits.shape[1]

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.logits
        expected = self.params["known_classes"] + 1
        if logits.shape[1] != expected:
            raise ValueError(
                f"{self.name}: known_classes={expected - 1} means logits with {expected} columns (the absent class "
                f"last), got {logits.shape[1]}; score a model trained with oodguard.train's DOS, or fix known_classes"
            )
        return logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=1)
