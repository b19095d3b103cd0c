"""Zero-shot detectors on dual-encoder embeddings: MCM, NegLabel, CLIPN and LAPT.

Every detector here reads ``features`` = the input embeddings ``v`` (L2-normalised again here, defensively;
all-zero rows, which have no direction, are refused) and takes the text side as constructor parameters: ``[K, D]``
ID label embeddings ``t_k`` and, per method, negative label or "no" embeddings (tensors or numpy arrays; see
:mod:`oodguard.encoders.dual` for making them). Those are ``required_params``, so the benchmark runner runs these
detectors only where a benchmark supplies them.

The embedding parameters are stored as given (the tensor or array the caller passed; ``get_params`` returns them
and saving writes them as tensors). Their checked, L2-normalised float32 copies are state, built on first use by
``fit`` or ``score``. Scores follow the library convention, higher = more OOD: each is ``1 - S`` for the method's
ID confidence ``S`` in ``[0, 1]`` (the same ranking as the official ``-S``), computed as the OOD mass itself
(a sum of sigmoids or of non-maximum softmax terms, in float64) so that confident ID inputs do not all round to
the same score.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oodguard.detectors.base import NotFittedError, OutputDetector, register
from oodguard.detectors.params import ArrayLike, Integral, Interval, Options, Real
from oodguard.encoders.dual import check_embeddings
from oodguard.outputs import ModelOutputs

#: Text-side embeddings ``[rows, D]``: a tensor or an array.
Embeddings = torch.Tensor | np.ndarray

_NORM_EPS = 1e-12


def negative_groups(num_negatives: int, groups: int, seed: int) -> torch.Tensor:
    """NegLabel's grouping as an index ``[G, M // G]`` into the negatives.

    As the official ``ScalableClassifier.grouping``: the last ``M mod G`` negatives (in the given order) are dropped,
    the rest permuted at random with a fixed seed (official: ``torch.manual_seed(0)``, on the GPU, so its
    permutation differs from this CPU one) and split into ``G`` equal groups (the paper does not say which ``M mod G``
    are dropped; the code's choice is followed). With fewer negatives than groups
    (``M < G``), ``G = M`` groups of one negative each are used instead of failing.
    """
    groups = min(groups, num_negatives)
    usable = num_negatives - num_negatives % groups
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(usable, generator=generator).reshape(groups, usable // groups)


def neglabel_ood_score(
    features: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    group_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``1 - S_NegLabel`` averaged over the groups, for L2-normalised rows (float64 ``[n]``).

    Per group ``g``: ``S_g = sum_k e^{s_k} / (sum_k e^{s_k} + sum_{j in g} e^{s~_j})`` with ``s = scale * v . t``;
    so ``1 - S_g = sigmoid(LSE_{j in g} s~_j - LSE_k s_k)``, computed in that form (no cancellation).
    """
    id_lse = torch.logsumexp((scale * (features @ labels.T)).to(torch.float64), dim=1)
    negative_logits = (scale * (features @ negatives.T)).to(torch.float64)  # [n, M]
    grouped = negative_logits[:, group_index]  # [n, G, M // G]
    return torch.sigmoid(torch.logsumexp(grouped, dim=2) - id_lse[:, None]).mean(dim=1)


def _sgd_step(
    param: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, lr: float, momentum: float, weight_decay: float
) -> None:
    """One step of ``torch.optim.SGD`` with Nesterov momentum (dampening 0), in place. Written out because
    constructing a torch optimiser costs seconds on its first use (it imports the compiler stack)."""
    grad = grad.add(param, alpha=weight_decay) if weight_decay else grad
    if momentum > 0:
        velocity.mul_(momentum).add_(grad)
        grad = grad.add_(velocity, alpha=momentum) if weight_decay else grad.add(velocity, alpha=momentum)
    param.add_(grad, alpha=-lr)


class _ZeroShot(OutputDetector):
    """Shared checks of the text-side embedding parameters and their normalised copies in the state."""

    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})
    needs_fit = False
    #: Constructor parameters that are ``[rows, D]`` embedding tensors.
    tensor_params: ClassVar[tuple[str, ...]] = ()

    def _check_param_combination(self) -> None:
        # checked here so that bad embeddings fail at construction; the normalised copies are discarded
        # (they become state on first use, see _text_state)
        text = self._checked_text()
        first, width = self.tensor_params[0], text[self.tensor_params[0]].shape[1]
        for key, value in text.items():
            if value.shape[1] != width:
                raise self._param_error(
                    key,
                    f"a matrix as wide as {first} (D={width}; it has D={value.shape[1]}): embed the text side "
                    "with one encoder",
                )
        self._check_text(text)

    def set_params(self, **params: Any) -> _ZeroShot:
        super().set_params(**params)
        self.state_ = None  # the state is built from the embeddings: rebuild it from the new ones
        return self

    # -- hooks for subclasses
    def _check_text(self, text: dict[str, torch.Tensor]) -> None:
        """Further checks of the checked text side (e.g. equal row counts); raise via ``_param_error``."""

    def _initial_state(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(text)

    # -- helpers
    def _checked_text(self) -> dict[str, torch.Tensor]:
        """The embedding parameters as L2-normalised float32 tensors (the parameters themselves stay as given)."""
        return {key: check_embeddings(getattr(self, key), f"{self.name}: {key}") for key in self.tensor_params}

    def _text_state(self) -> dict[str, torch.Tensor]:
        """The text side of the state, built from the parameters on first use (or loaded with a saved detector)."""
        state = self.state_
        if state is None or any(key not in state for key in self.tensor_params):
            state = {**self._initial_state(self._checked_text()), **(state or {})}
            self.state_ = state
        return state

    def _features(self, outputs: ModelOutputs, stage: str) -> torch.Tensor:
        state = self._text_state()
        dim = state[self.tensor_params[0]].shape[1]
        z = outputs.features
        if z.shape[1] != dim:
            raise ValueError(
                f"{self.name}: features have D={z.shape[1]} columns at {stage} but the label embeddings have "
                f"D={dim}; embed inputs and labels with the same dual encoder"
            )
        # all-zero rows have no direction: normalising would leave them at 0 and give them an arbitrary score
        return check_embeddings(z, f"{self.name}: features at {stage}")

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        self._features(outputs, "fit")  # no fitting: only the width is checked
        return dict(self._text_state())

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        rows = sum(value.shape[0] for key, value in (self.state_ or {}).items() if key in self.tensor_params)
        return 8 * 4 * max(rows, 1)


@register
class MCM(_ZeroShot):
    """Maximum Concept Matching: the largest softmax of the cosine similarities to the ID label embeddings.

    ``s_k = v . t_k`` and ``S_MCM = max_k softmax_k(s / T)``; the OOD score is ``1 - S_MCM`` (the official
    code stores ``-S_MCM``: same ranking), computed as ``r / (1 + r)`` with ``r = sum_{j != max} e^{(s_j - s_max)/T}``
    so that it keeps its precision when ``S_MCM`` is close to 1.

    Parameters: ``label_embeddings`` ``[K, D]`` with ``K >= 2`` (required; with one label the score would be a
    constant; official prompt ``"a photo of a {}."``, one template),
    ``temperature`` ``T`` (default 1, the official ``--T``: the softmax is then nearly uniform, but only the ranking
    matters). No fit.

    Paper: Ming, Cai, Gu, Sun, Li & Li, "Delving into Out-of-Distribution Detection with Vision-Language
    Representations", NeurIPS 2022. Code: deeplearning-wisc/MCM ``utils/detection_util.py``
    (``get_ood_scores_clip``); OpenOOD ``mcm_postprocessor.py``.
    """

    name = "mcm"
    summary = "1 - maximum softmax of the cosine similarities to the ID label embeddings (zero-shot)"
    paper = "Ming, Cai, Gu, Sun, Li & Li, NeurIPS 2022"
    code = "github.com/deeplearning-wisc/MCM utils/detection_util.py (get_ood_scores_clip)"

    _parameter_constraints = {
        "label_embeddings": [ArrayLike(ndim=2)],
        "temperature": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, *, label_embeddings: Embeddings | None = None, temperature: float = 1.0) -> None:
        self.label_embeddings = label_embeddings
        self.temperature = temperature
        super().__init__()

    required_params = ("label_embeddings",)
    tensor_params = ("label_embeddings",)

    def _check_text(self, text: dict[str, torch.Tensor]) -> None:
        # with one label the softmax is 1 for every input: the score would be a constant 0
        if text["label_embeddings"].shape[0] < 2:
            raise self._param_error(
                "label_embeddings",
                "at least 2 ID label embeddings (rows): MCM's maximum softmax over one label is 1 for every input, "
                "a constant score (neglabel also works with one label)",
            )

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        v = self._features(outputs, "score")
        logits = (v @ self._text_state()["label_embeddings"].T).to(torch.float64) / float(self.temperature)
        top = logits.argmax(dim=1, keepdim=True)
        shifted = (logits - logits.gather(1, top)).scatter_(1, top, -math.inf)
        others = torch.exp(shifted).sum(dim=1)  # sum_{j != max} e^{(s_j - s_max)/T} = (1 - S) / S
        return others / (1 + others)


@register
class NegLabel(_ZeroShot):
    """NegLabel: the share of softmax mass on the ID labels among ID plus mined negative labels, over groups.

    With ``s_k = scale * v . t_k`` and ``s~_j = scale * v . e_j`` for the negatives ``e_j``,
    ``S = sum_k e^{s_k} / (sum_k e^{s_k} + sum_j e^{s~_j})``. Grouping (on by default, ``groups = 100``): the
    negatives are split into ``G`` random groups (see :func:`negative_groups`: the last ``M mod G`` dropped, the rest
    permuted with ``seed``), ``S`` computed with each group's negatives alone and averaged. The OOD score is
    ``1 - mean_g S_g`` (ranking as the official ``-S``). ``groups=1`` uses all negatives in one softmax. With fewer
    negatives than groups, ``G = M`` groups of one negative each are used.

    Parameters: ``label_embeddings`` ``[K, D]`` and ``negative_embeddings`` ``[M, D]`` (required; mine the
    negatives with :func:`oodguard.encoders.dual.mine_negative_labels`), ``scale`` 100 (CLIP's logit scale, the official
    ``100 *`` with ``t = 1``), ``groups`` 100 (``ngroup``), ``seed`` 0 (the official fixed seed). No fit.

    Paper: Jiang, Liu, Fang, Chen, Liu, Zheng & Han, "Negative Label Guided OOD Detection with Pretrained
    Vision-Language Models", ICLR 2024. Code: github.com/tmlr-group/NegLabel ``mmcls/models/ood/clip_ood.py``
    (``ScalableClassifier.grouping``), ``mmcls/models/classifiers/multi_modal.py``.
    """

    name = "neglabel"
    summary = "1 - softmax mass of the ID labels among ID and mined negative labels, averaged over negative groups"
    paper = "Jiang, Liu, Fang, Chen, Liu, Zheng & Han, ICLR 2024"
    code = "github.com/tmlr-group/NegLabel mmcls/models/ood/clip_ood.py (ScalableClassifier.grouping)"

    def __init__(
        self,
        *,
        label_embeddings: Embeddings | None = None,
        negative_embeddings: Embeddings | None = None,
        scale: float = 100.0,
        groups: int = 100,
        seed: int = 0,
    ) -> None:
        self.label_embeddings = label_embeddings
        self.negative_embeddings = negative_embeddings
        self.scale = scale
        self.groups = groups
        self.seed = seed
        super().__init__()

    required_params = ("label_embeddings", "negative_embeddings")
    tensor_params = ("label_embeddings", "negative_embeddings")

    _parameter_constraints = {
        "label_embeddings": [ArrayLike(ndim=2)],
        "negative_embeddings": [ArrayLike(ndim=2)],
        "scale": [Interval(Real, 0, None, closed="neither")],
        "groups": [Interval(Integral, 1, None)],
        "seed": [Interval(Integral, 0, None)],
    }

    def _initial_state(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = negative_groups(text["negative_embeddings"].shape[0], int(self.groups), int(self.seed))
        return {**text, "group_index": index}

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        self._features(outputs, "fit")
        return dict(self._text_state())

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        v = self._features(outputs, "score")
        state = self._text_state()
        return neglabel_ood_score(
            v, state["label_embeddings"], state["negative_embeddings"], state["group_index"], float(self.scale)
        )


@register
class CLIPN(_ZeroShot):
    """CLIPN's inference rules: CLIP class probabilities combined with per-class "no" probabilities.

    With ``s_k = scale * v . t_k`` (yes prompts) and ``s-_k = scale * v . t-_k`` (no prompts):
    ``p_k = softmax_k(s)`` and ``p_yes_k = sigmoid(s_k - s-_k)`` (a 2-way softmax).

    * ``rule="atd"`` (agreeing-to-differ): ``S_ATD = sum_k p_k p_yes_k``; the OOD score is
      ``p_ood = 1 - S_ATD = sum_k p_k sigmoid(s-_k - s_k)``. Decision: OOD iff ``p_ood > max_k p_k p_yes_k``.
    * ``rule="ctw"`` (competing-to-win): ``y = argmax_k p_k``, ``S_CTW = p_yes_y``; the OOD score is
      ``p_no_y = sigmoid(s-_y - s_y)``. Decision: OOD iff the score exceeds 0.5.

    Parameters: ``label_embeddings`` ``[K, D]`` and ``no_label_embeddings`` ``[K, D]`` (row ``k`` = the no-prompt
    embedding of class ``k``, from CLIPN's trained "no" text encoder; both required), ``rule`` ``"atd"`` (default)
    or ``"ctw"``, ``scale`` 100 (official). No fit. What this implementation leaves out: docs/detectors.md, section
    ``clipn``.

    Paper: Wang, Li, Yao & Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023.
    Code: github.com/xmed-lab/CLIPN ``src/zero_shot_infer.py`` (the CTW and ATD scores), ``src/classification.py``.
    """

    name = "clipn"
    summary = "CLIPN's ATD (1 - sum_k p_k p_yes_k) or CTW (p_no of the predicted class) with 'no' label embeddings"
    paper = "Wang, Li, Yao & Li, ICCV 2023"
    code = "github.com/xmed-lab/CLIPN src/zero_shot_infer.py"

    def __init__(
        self,
        *,
        label_embeddings: Embeddings | None = None,
        no_label_embeddings: Embeddings | None = None,
        rule: str = "atd",
        scale: float = 100.0,
    ) -> None:
        self.label_embeddings = label_embeddings
        self.no_label_embeddings = no_label_embeddings
        self.rule = rule
        self.scale = scale
        super().__init__()

    required_params = ("label_embeddings", "no_label_embeddings")
    tensor_params = ("label_embeddings", "no_label_embeddings")
    RULES: ClassVar[tuple[str, ...]] = ("atd", "ctw")

    _parameter_constraints = {
        "label_embeddings": [ArrayLike(ndim=2)],
        "no_label_embeddings": [ArrayLike(ndim=2)],
        "rule": [Options(RULES)],
        "scale": [Interval(Real, 0, None, closed="neither")],
    }

    def _check_text(self, text: dict[str, torch.Tensor]) -> None:
        rows, no_rows = text["label_embeddings"].shape[0], text["no_label_embeddings"].shape[0]
        if rows != no_rows:
            raise self._param_error(
                "no_label_embeddings",
                f"one no-prompt embedding per class, in class order ({rows} rows, as label_embeddings; it has "
                f"{no_rows})",
            )

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        v = self._features(outputs, "score")
        state = self._text_state()
        scale = float(self.scale)
        yes = (scale * (v @ state["label_embeddings"].T)).to(torch.float64)
        no = (scale * (v @ state["no_label_embeddings"].T)).to(torch.float64)
        p_no = torch.sigmoid(no - yes)  # 1 - p_yes, without cancellation
        if self.rule == "ctw":
            return p_no.gather(1, yes.argmax(dim=1, keepdim=True)).squeeze(1)
        return (torch.softmax(yes, dim=1) * p_no).sum(dim=1)


@register
class LAPT(NegLabel):
    """LAPT-style tuning of the ID and negative label embeddings on frozen embeddings, then the NegLabel score.

    Learns a residual for each label embedding, ``t'_c = normalize(t_c + delta_c)`` for the ``K`` ID and ``M``
    negative labels (``delta`` starts at zero, i.e. at NegLabel), by the released training recipe (multi-class
    cross-entropy over ``K + M`` classes on ``scale * x . t'_c``, wccm cross-modal mixing, SGD with Nesterov momentum
    and a per-step cosine schedule) on the fit split's labelled ID embeddings plus one pseudo-input per negative
    label per epoch; then scores as :class:`NegLabel` with the tuned embeddings.

    Parameters: ``label_embeddings``, ``negative_embeddings``, ``scale``, ``groups`` as :class:`NegLabel`;
    ``seed`` 0 (batch order, pseudo-inputs, mixing and grouping); ``epochs`` 10, ``lr`` 0.01, ``momentum`` 0.9,
    ``weight_decay`` 1e-5 (the released ``train.sh``); ``batch_size`` 256 (official 32); ``alpha`` 1.0 (wccm's
    ``Beta(alpha, alpha)``; 0 turns mixing off); ``negative_samples`` ``"transplant"`` (a random ID input whose
    component along its own label is moved onto the negative label) or ``"label"`` (the negative label embedding
    itself).

    How this differs from official LAPT (which tunes shared prompt vectors through CLIP's text encoder on
    synthesised or retrieved images): docs/detectors.md, section ``lapt``.

    Paper: Zhang, Zhu, He & Zhang, "LAPT: Label-driven Automated Prompt Tuning for OOD Detection with
    Vision-Language Models", ECCV 2024. Code: github.com/YBZh/OpenOOD-VLM ``openood/trainers/oodmixup_trainer.py``
    (``mix_strategy=wccm``, ``loss_components=multice``), ``scripts/ood/lapt/train.sh``.
    """

    name = "lapt"
    summary = "NegLabel score with the ID and negative label embeddings tuned on the fit data (LAPT-style)"
    paper = "Zhang, Zhu, He & Zhang, ECCV 2024"
    code = "github.com/YBZh/OpenOOD-VLM openood/trainers/oodmixup_trainer.py, scripts/ood/lapt/train.sh"
    fit_requires = frozenset({"features", "labels"})
    needs_fit = True

    def __init__(
        self,
        *,
        label_embeddings: Embeddings | None = None,
        negative_embeddings: Embeddings | None = None,
        scale: float = 100.0,
        groups: int = 100,
        seed: int = 0,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        alpha: float = 1.0,
        negative_samples: str = "transplant",
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.alpha = alpha
        self.negative_samples = negative_samples
        super().__init__(
            label_embeddings=label_embeddings, negative_embeddings=negative_embeddings, scale=scale, groups=groups,
            seed=seed,
        )  # fmt: skip

    _parameter_constraints = {
        **NegLabel._parameter_constraints,
        "epochs": [Interval(Integral, 1, None)],
        "batch_size": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "weight_decay": [Interval(Real, 0, None)],
        "alpha": [Interval(Real, 0, None)],
        "negative_samples": [Options(("transplant", "label"))],
    }

    @property
    def is_fitted(self) -> bool:
        return self._state is not None and "tuned_labels" in self._state

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        v = self._features(outputs, "fit")
        state = self._text_state()
        labels, negatives = state["label_embeddings"], state["negative_embeddings"]
        y = outputs.labels.to(torch.long).cpu()
        if int(y.max()) >= labels.shape[0]:
            raise ValueError(
                f"lapt: fit labels reach {int(y.max())} but there are K={labels.shape[0]} label embeddings; "
                "labels must be class indices 0..K-1 in the order of label_embeddings"
            )
        tuned_labels, tuned_negatives = self._tune(v.cpu(), y, labels, negatives)
        return {**state, "tuned_labels": tuned_labels, "tuned_negatives": tuned_negatives}

    def _tune(
        self, v: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        epochs, batch_size, seed = int(self.epochs), int(self.batch_size), int(self.seed)
        scale, alpha, base_lr = float(self.scale), float(self.alpha), float(self.lr)
        momentum, weight_decay = float(self.momentum), float(self.weight_decay)
        anchors = torch.cat([labels, negatives])  # frozen label embeddings: starting point and wccm partners
        targets = torch.cat([y, labels.shape[0] + torch.arange(negatives.shape[0])])
        delta = torch.zeros_like(anchors, requires_grad=True)
        velocity = torch.zeros_like(anchors)
        total = epochs * math.ceil(len(targets) / batch_size)
        step = 0
        generator = torch.Generator().manual_seed(seed)
        mixing = np.random.default_rng(seed)
        along = (v * labels[y]).sum(dim=1, keepdim=True)  # each ID input's component along its own label
        residuals = v - along * labels[y]
        for _ in range(epochs):
            inputs = torch.cat([v, self._negative_samples(negatives, along, residuals, generator)])
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), batch_size):
                batch = order[start : start + batch_size]
                x, target = inputs[batch], targets[batch]
                if alpha > 0:
                    lam = float(mixing.beta(alpha, alpha))
                    x = F.normalize(lam * x + (1 - lam) * anchors[target], dim=1, eps=_NORM_EPS)
                tuned = F.normalize(anchors + delta, dim=1, eps=_NORM_EPS)
                (grad,) = torch.autograd.grad(F.cross_entropy(scale * x @ tuned.T, target), delta)
                # the official cosine_annealing(step, total, 1, 1e-8) factor on the learning rate
                lr = base_lr * (1e-8 + (1 - 1e-8) * 0.5 * (1 + math.cos(step / total * math.pi)))
                with torch.no_grad():
                    _sgd_step(delta, grad, velocity, lr, momentum, weight_decay)
                step += 1
        with torch.no_grad():
            tuned = F.normalize(anchors + delta, dim=1, eps=_NORM_EPS)
        if not bool(torch.isfinite(tuned).all()):
            raise FloatingPointError("lapt: tuning diverged (non-finite label embeddings); lower lr")
        return tuned[: labels.shape[0]].contiguous(), tuned[labels.shape[0] :].contiguous()

    def _negative_samples(
        self, negatives: torch.Tensor, along: torch.Tensor, residuals: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """One pseudo-input per negative label: the label embedding itself (``"label"``), or (``"transplant"``)
        a random ID input with its component along its own label moved onto the negative label:
        ``normalize(v_i - (v_i . t_y)(t_y - e_j))``, so that it relates to ``e_j`` as real inputs relate to theirs."""
        if self.negative_samples == "label":
            return negatives
        donors = torch.randint(len(residuals), (negatives.shape[0],), generator=generator)
        return F.normalize(along[donors] * negatives + residuals[donors], dim=1, eps=_NORM_EPS)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        v = self._features(outputs, "score")
        state = self.state_
        if state is None or "tuned_labels" not in state:
            raise NotFittedError("lapt: call fit(...) on in-distribution outputs before score(...)")
        return neglabel_ood_score(
            v, state["tuned_labels"], state["tuned_negatives"], state["group_index"], float(self.scale)
        )
