"""CoVer: a base detector's score averaged over test-time corrupted views of the input.

The views come from :mod:`oodguard.views` (seeded ImageNet-C corruptions in torch); each view costs one forward
pass of the model through the attached :class:`~oodguard.extraction.ModelRunner`, and any output-based
detector (one that needs logits, features and/or the final linear layer) can be the base.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodguard.detectors.base import Detector, OutputDetector, available, create, implementation, protocol, register
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.detectors.params import Mapping as MappingOf
from oodguard.extraction.model_runner import ModelRunner
from oodguard.views.corruptions import CORRUPTIONS, SEVERITIES, View, ViewDataset, all_views, recommended_views
from oodguard.views.outputs import average_over_views

__all__ = ["CoVer", "parse_views"]

#: Prefix of the base detector's state tensors inside CoVer's state (saved and loaded with it).
BASE_PREFIX = "base."
#: Output fields a base detector may need; views are extracted with logits, features and head.
_OUTPUT_FIELDS = frozenset({"logits", "features", "head", "labels"})
_VIEW_PATTERN = re.compile(r"^(?P<corruption>[a-z_]+)-s?(?P<severity>\d+)(?:-seed(?P<seed>\d+))?$")


_VIEW_HINT = (
    f"give 'identity' or '<corruption>-<severity>' (e.g. 'fog-2', or a view key such as 'fog-s2-seed0') with a "
    f"corruption from: {', '.join(CORRUPTIONS)} and a severity from {SEVERITIES[0]} to {SEVERITIES[-1]}; or "
    "views='recommended' / 'all'"
)


class _ViewError(ValueError):
    """A ``views`` value that names no list of views; ``problem`` says what is wrong, ``fix`` what to give."""

    def __init__(self, problem: str, fix: str = _VIEW_HINT) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"views: {problem}; {fix}")


def _view_error(entry: Any, why: str) -> _ViewError:
    return _ViewError(f"{why} in entry {entry!r}")


class _BaseNeedsFit:
    """``CoVer.needs_fit``: on the class True (fit may be needed), on a detector whether its base needs a fit."""

    def __get__(self, detector: CoVer | None, owner: type) -> bool:
        return True if detector is None else detector.base_needs_fit


def parse_views(
    views: Any,
    seed: int = 0,
    pixel_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[View]:
    """The :class:`~oodguard.views.View` list named by CoVer's ``views`` parameter.

    ``"recommended"`` (13 views), ``"all"`` (identity + every corruption at severities 1-5), or a list of entries
    ``"identity"``, ``"<corruption>-<severity>"`` or a view key ``"<corruption>-s<severity>[-seed<k>]"`` (an
    explicit seed overrides ``seed``). Every view gets ``pixel_scale`` and the normalisation ``mean``/``std``.

    Examples
    --------
    >>> [v.key for v in parse_views(["identity", "fog-2", "brightness-s1-seed4"])]
    ['identity', 'fog-s2-seed0', 'brightness-s1-seed4']
    """
    if isinstance(views, str):
        if views == "recommended":
            return recommended_views(seed, pixel_scale=pixel_scale, mean=mean, std=std)
        if views == "all":
            return all_views(seed, pixel_scale=pixel_scale, mean=mean, std=std)
        raise _view_error(views, "a single string must be 'recommended' or 'all'")
    if not isinstance(views, (list, tuple)) or not views:
        raise _view_error(views, "expected 'recommended', 'all' or a non-empty list of view names")
    parsed: list[View] = []
    for entry in views:
        if not isinstance(entry, str):
            raise _view_error(entry, "view names are strings")
        if entry == "identity":
            parsed.append(View("identity", mean=mean, std=std))
            continue
        match = _VIEW_PATTERN.match(entry)
        if match is None:
            raise _view_error(entry, "cannot read a corruption and a severity")
        corruption = match["corruption"]
        if corruption not in CORRUPTIONS:
            raise _view_error(entry, f"unknown corruption {corruption!r}")
        severity = int(match["severity"])
        if severity not in SEVERITIES:
            raise _view_error(entry, f"severity {severity} is outside 1-5")
        view_seed = seed if match["seed"] is None else int(match["seed"])
        parsed.append(View(f"{corruption}-{severity}", corruption, severity, view_seed, pixel_scale, mean, std))
    keys = [view.key for view in parsed]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise _ViewError(f"{duplicates} listed more than once", "give each view once (the average is unweighted)")
    return parsed


@register
class CoVer(ModelDetector):
    """CoVer (Confidence aVerage): the mean of a base detector's scores over corrupted views of each input.

    ``s(x) = (1/|V|) Σ_{v ∈ V} S_base(model(v(x)))``, an unweighted average of the base detector's scores (higher
    = more OOD). Inputs are images ``[N, C, H, W]`` (a tensor, numpy array, pair ``(images, labels)`` or map-style
    ``Dataset``) in ``[0, 1]``, or normalised per channel with ``mean`` and ``std`` (a torchvision ``Normalize``
    pipeline): each view then undoes the normalisation, corrupts the pixels and normalises again.

    Parameters
    ----------
    base : str, default "msp"
        Registry name of an output detector that needs no more than logits, features, the final linear layer
        and labels (``"msp"`` and ``"energy"`` are the official CNN choices).
    base_params : dict, optional
        Parameters of the base detector; None (default) means none.
    views : "recommended", "all" or list of str, default "recommended"
        ``"recommended"``: the identity plus six corruptions at severities 1 and 2 (13 views); ``"all"``: the
        identity plus every corruption at severities 1-5; or view names (see :func:`parse_views`).
    seed : int >= 0, default 0
        Seed of the corruptions' random draws.
    pixel_scale : float > 0, optional
        Multiplier of the corruption tables' pixel parameters (see :func:`oodguard.views.corrupt`); None (default)
        scales the 224-pixel tables to the image (``min(H, W) / 224``).
    mean, std : sequences of floats, one per channel, optional
        The normalisation the inputs went through (``Normalize(mean, std)``); None (default): inputs in [0, 1].

    ``fit`` fits the base detector on the identity view of the fit inputs (a no-op, and optional, when the base has
    no fitted state: ``needs_fit`` is the base's); its state is saved inside this detector's (tensors prefixed
    ``base.``).

    Paper: Zhang, Zhu et al., "What If the Input is Expanded in OOD Detection?", NeurIPS 2024. Official code:
    tmlr-group/CoVer (``eval_ood_detection.py``, view dictionary; ``utils/detection_util.py``,
    ``get_ood_scores_resnet`` / ``get_ood_scores_clip``).

    Examples
    --------
    >>> import torch
    >>> from oodguard.benchmark.digits_model import DigitsCNN
    >>> _ = torch.manual_seed(0)
    >>> det = CoVer(views=["identity", "brightness-1", "fog-2"]).attach(DigitsCNN())
    >>> det.score(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4])
    """

    name = "cover"
    summary = "a base detector's score averaged over corrupted test-time views (identity + ImageNet-C corruptions)"
    paper = "Zhang, Zhu et al., What If the Input is Expanded in OOD Detection?, NeurIPS 2024"
    code = "https://github.com/tmlr-group/CoVer (eval_ood_detection.py, utils/detection_util.py)"
    input_ndim = 4  # corruptions act on images [N, C, H, W]
    needs_fit = _BaseNeedsFit()
    _parameter_constraints = {
        "base": [Text()],
        "base_params": [None, MappingOf()],
        "views": [Options(("recommended", "all")), SequenceOf(Text())],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "pixel_scale": [None, Interval(Real, 0, None, closed="neither")],
        "mean": [None, SequenceOf(Real)],
        "std": [None, SequenceOf(Interval(Real, 0, None, closed="neither"))],
    }

    def __init__(
        self,
        *,
        base: str = "msp",
        base_params: Mapping[str, Any] | None = None,
        views: str | Sequence[str] = "recommended",
        seed: int = 0,
        pixel_scale: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.base = base
        self.base_params = base_params
        self.views = views
        self.seed = seed
        self.pixel_scale = pixel_scale
        self.mean = mean
        self.std = std
        super().__init__()

    # ------------------------------------------------------------------ parameters
    def _check_param_combination(self) -> None:
        outputs = available(protocol="outputs")
        if self.base not in available():
            raise self._param_error(
                "base", f"the registry name of an output detector (available: {', '.join(outputs)})"
            )
        if protocol(self.base) != "outputs":
            raise self._param_error(
                "base",
                "an output detector (this one runs the model itself); CoVer averages a score of the model's "
                "outputs, e.g. 'msp' or 'energy'",
            )
        cls = implementation(self.base)
        extra = sorted((set(cls.requires) | set(cls.fit_requires)) - _OUTPUT_FIELDS)
        if extra:
            raise self._param_error(
                "base",
                f"a detector needing no more than logits, features, the final linear layer and labels, "
                f"which is all views are extracted with ({self.base!r} needs {', '.join(extra)}); e.g. 'msp', "
                "'energy', 'vim'",
            )
        try:  # the base's own rules, checked now rather than at fit or score time
            self._new_base()
        except (TypeError, ValueError) as error:
            raise self._param_error("base_params", f"parameters of {self.base!r} ({error})") from None
        if (self.mean is None) != (self.std is None) or (
            self.mean is not None and self.std is not None and len(self.mean) != len(self.std)
        ):
            raise self._param_error("std", "one positive value per channel, as many as mean (give both or neither)")
        try:
            self.view_list()
        except _ViewError as error:
            raise self._param_error("views", f"'recommended', 'all' or a list of view names: {error.problem}; "
                                    f"{error.fix}") from None  # fmt: skip

    def view_list(self) -> list[View]:
        """The views named by ``views``, with ``seed``, ``pixel_scale`` and the normalisation."""
        scale = None if self.pixel_scale is None else float(self.pixel_scale)
        return parse_views(self.views, self.seed, scale, self.mean, self.std)

    def _new_base(self) -> OutputDetector:
        base = create(self.base, **dict(self.base_params or {}))
        if not isinstance(base, OutputDetector):  # validation refuses model detectors as bases already
            raise TypeError(f"{self.name}: base {self.base!r} is not an output detector")
        return base

    @property
    def base_needs_fit(self) -> bool:
        return bool(implementation(self.base).needs_fit)

    # ------------------------------------------------------------------ base detector
    def base_detector(self) -> Detector:
        """The base detector, with the fitted state stored in this detector (unfitted if none was fitted)."""
        base = self._new_base()
        state = self.state_
        if state is not None:
            base.state_ = {k[len(BASE_PREFIX) :]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
        base.meta_ = dict(self.meta_.get("base_meta", {}))
        return base

    # ------------------------------------------------------------------ data
    def _view_data(self, data: Any, view: View) -> ViewDataset:
        if isinstance(data, DataLoader) or not isinstance(data, (torch.Tensor, np.ndarray, tuple, list, Dataset)):
            raise ValueError(
                f"{self.name}: data must be images [N, C, H, W] in [0, 1] as a tensor or numpy array, a pair "
                f"(images, labels) or a map-style Dataset, got {type(data).__name__}; CoVer corrupts whole images, "
                "so pass the dataset rather than a DataLoader or an iterator of batches"
            )
        return ViewDataset(data, view)

    # ------------------------------------------------------------------ hooks
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        identity = View("identity", mean=self.mean, std=self.std)
        self._view_data(data, identity)  # refuses loaders and iterators with CoVer's message
        ((_, outputs),) = runner.forward_views(data, [identity], labels=labels, desc="cover fit")
        base = self._new_base().fit(outputs)
        self.meta_ = {"base_meta": dict(base.meta_)}
        return {BASE_PREFIX + k: v.detach().clone() for k, v in (base.state_ or {}).items()}

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        base = self.base_detector()
        self._view_data(data, View("identity"))  # refuses loaders and iterators with CoVer's message
        # One forward pass per view, each vectorised over the inputs; a runner with a cache_dir reuses the cached
        # outputs of every view it has seen (oodguard.views.outputs), so a second call runs no model at all.
        views = runner.forward_views(data, self.view_list(), progress=progress, desc="cover")
        return average_over_views(base, (outputs for _, outputs in views))
