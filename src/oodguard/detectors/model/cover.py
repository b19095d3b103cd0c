"""CoVer: a base detector's score averaged over test-time corrupted views of the input.

The views come from :mod:`oodguard.views` (seeded ImageNet-C corruptions in torch); each view costs one forward
pass of the model through the attached :class:`~oodguard.extraction.ModelRunner`, and any output-based
detector (one that needs logits, features and/or the final linear layer) can be the base.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodguard.detectors.base import _REGISTRY, Detector, create, register
from oodguard.detectors.model.base import ModelDetector
from oodguard.extraction.model_runner import ModelRunner
from oodguard.views.corruptions import CORRUPTIONS, SEVERITIES, View, ViewDataset, all_views, recommended_views
from oodguard.views.outputs import average_over_views

__all__ = ["CoVer", "parse_views"]

#: Prefix of the base detector's state tensors inside CoVer's state (saved and loaded with it).
BASE_PREFIX = "base."
#: Output fields a base detector may need; views are extracted with logits, features and head.
_OUTPUT_FIELDS = frozenset({"logits", "features", "head", "labels"})
_VIEW_PATTERN = re.compile(r"^(?P<corruption>[a-z_]+)-s?(?P<severity>\d+)(?:-seed(?P<seed>\d+))?$")


def _view_error(entry: Any, why: str) -> ValueError:
    return ValueError(
        f"views: {why} in entry {entry!r}; give 'identity' or '<corruption>-<severity>' (e.g. 'fog-2', or a view key "
        f"such as 'fog-s2-seed0') with a corruption from: {', '.join(CORRUPTIONS)} and a severity from "
        f"{SEVERITIES[0]} to {SEVERITIES[-1]}; or views='recommended' / 'all'"
    )


def parse_views(views: Any, seed: int = 0, pixel_scale: float | None = None) -> list[View]:
    """The :class:`~oodguard.views.View` list named by CoVer's ``views`` parameter.

    ``"recommended"`` (13 views), ``"all"`` (identity + every corruption at severities 1-5), or a list of entries
    ``"identity"``, ``"<corruption>-<severity>"`` or a view key ``"<corruption>-s<severity>[-seed<k>]"`` (an
    explicit seed overrides ``seed``). Every view gets ``pixel_scale``.

    Examples
    --------
    >>> [v.key for v in parse_views(["identity", "fog-2", "brightness-s1-seed4"])]
    ['identity', 'fog-s2-seed0', 'brightness-s1-seed4']
    """
    if isinstance(views, str):
        if views == "recommended":
            return recommended_views(seed, pixel_scale=pixel_scale)
        if views == "all":
            return all_views(seed, pixel_scale=pixel_scale)
        raise _view_error(views, "a single string must be 'recommended' or 'all'")
    if not isinstance(views, (list, tuple)) or not views:
        raise _view_error(views, "expected 'recommended', 'all' or a non-empty list of view names")
    parsed: list[View] = []
    for entry in views:
        if not isinstance(entry, str):
            raise _view_error(entry, "view names are strings")
        if entry == "identity":
            parsed.append(View("identity"))
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
        parsed.append(View(f"{corruption}-{severity}", corruption, severity, view_seed, pixel_scale))
    keys = [view.key for view in parsed]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"views: {duplicates} listed more than once; give each view once (the average is unweighted)")
    return parsed


@register
class CoVer(ModelDetector):
    """CoVer (Confidence aVerage): the mean of a base detector's scores over corrupted views of each input.

    ``s(x) = (1/|V|) Σ_{v ∈ V} S_base(model(v(x)))`` — a plain, unweighted average of the base detector's raw
    scores (higher = more OOD, as every base score here). ``V`` is the identity plus ImageNet-C corruptions at
    given severities (:mod:`oodguard.views`): ``views="recommended"`` (default) is the identity plus brightness,
    fog, saturate, motion_blur, defocus_blur, gaussian_blur at severities 1 and 2 (13 views, the official
    "recommended corruption types from validation set"); ``views="all"`` is the identity plus every available
    corruption at severities 1-5 (what the official ``eval_ood_detection.py`` enables at HEAD: 18 types, 91
    views, as here, see :mod:`oodguard.views`); or a list such as ``["identity", "fog-1",
    "gaussian_blur-s2-seed3"]``.

    Parameters
    ----------
    base : registry name of an output-based detector (needs logits, features and/or the final linear layer;
        not one that runs the model or needs inner layers). Default ``"msp"``: for CNNs the official code
        (``utils/detection_util.py``, ``get_ood_scores_resnet``) averages the negative maximum softmax unless
        ``--score energy`` is given, and its energy branch is DICE's energy (the plain-energy line is
        commented out). ``"energy"`` is the other official CNN choice.
    base_params : hyperparameters of the base detector (dict).
    views : ``"recommended"``, ``"all"`` or a list of view names (see :func:`parse_views`).
    seed : seed of the corruptions' random draws (motion-blur angles, fog fractal, noise).
    pixel_scale : multiplier of the corruption tables' pixel parameters (see :func:`oodguard.views.corrupt`).
        ``None`` (default) scales the 224-pixel tables to the image: on 28 x 28 digits that is 0.125, and the
        recommended blurs at severities 1-2 are then nearly the identity (gaussian_blur sigma 0.125-0.25 px,
        motion_blur of 1-2 px); pass ``pixel_scale=1.0`` for the tables in the image's own pixels.

    Fit: the base detector is fitted on the identity-view outputs (logits, features, head, labels) of the fit
    inputs (one forward pass). When the base has no fitted state (``msp``, ``energy``, ...) ``fit`` is optional.
    Score: ``|V|`` forward passes per input, no gradients; inputs must be images ``[N, C, H, W]`` in ``[0, 1]``
    (corrupt before normalising: put the normalisation inside the model), as a tensor, numpy array, pair
    ``(images, labels)`` or map-style ``Dataset``. The fitted base detector's state is saved inside this
    detector's state (tensors prefixed ``base.``, its dimensions in ``meta_["base_meta"]``).

    Paper: Zhang, Zhu et al., "What If the Input is Expanded in OOD Detection?", NeurIPS 2024. Official code:
    tmlr-group/CoVer (``eval_ood_detection.py`` view dictionary; ``utils/detection_util.py``
    ``get_ood_scores_resnet`` / ``get_ood_scores_clip``: per-view scores stacked and averaged).

    Deviations: corruptions are applied to float tensors in torch, without the official uint8/JPEG-85 round
    trip and the extra 256/224 zoom of corrupted views (see :mod:`oodguard.views`). The base score is this
    library's: ``msp`` returns the log-odds ``log((1 - MSP) / MSP)`` rather than ``-MSP``, so the average is
    of log-odds, not of probabilities (with the identity view only the ranking is the same; with several
    views the average of a monotone transform can rank differently from the official ``mean(-MSP)``). The
    CLIP/MCM base of the paper needs text prompts and is not provided here.

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

    def __init__(
        self,
        *,
        base: str = 'msp',
        base_params: Any = {},
        views: str = 'recommended',
        seed: int = 0,
        pixel_scale: Any = None,
    ) -> None:
        self.base = base
        self.base_params = base_params
        self.views = views
        self.seed = seed
        self.pixel_scale = pixel_scale
        super().__init__()


    # ------------------------------------------------------------------ parameters
    def _check_param_combination(self) -> None:
        base = self.params["base"]
        if not isinstance(base, str) or base not in _REGISTRY:
            names = ", ".join(n for n in sorted(_REGISTRY) if not getattr(_REGISTRY[n], "needs_model", False))
            raise ValueError(f"{self.name}: base must name an output-based detector, got {base!r}; available: {names}")
        cls = _REGISTRY[base]
        if getattr(cls, "needs_model", False):
            raise ValueError(
                f"{self.name}: base {base!r} runs the model itself; CoVer averages an output-based score "
                "(e.g. 'msp', 'energy'): pick one of those"
            )
        extra = sorted((set(cls.requires) | set(cls.fit_requires)) - _OUTPUT_FIELDS)
        if extra:
            raise ValueError(
                f"{self.name}: base {base!r} needs {', '.join(extra)}, but views are extracted with logits, features "
                "and the final linear layer only; pick a base that needs no more (e.g. 'msp', 'energy', 'vim')"
            )
        base_params = self.params["base_params"]
        if base_params is None:
            base_params = {}
        if not isinstance(base_params, dict) or not all(isinstance(k, str) for k in base_params):
            raise ValueError(f"{self.name}: base_params must be a dict of the base's parameters, got {base_params!r}")
        self.params["base_params"] = dict(base_params)
        create(base, **self.params["base_params"])  # validates the base's parameters now, not at score time
        seed = self.params["seed"]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"{self.name}: seed must be a non-negative integer, got {seed!r}")
        self.params["seed"] = int(seed)
        scale = self.params["pixel_scale"]
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(
                    f"{self.name}: pixel_scale must be None (min(H, W) / 224) or a finite number > 0, got {scale!r}"
                )
            self.params["pixel_scale"] = float(scale)
        views = self.params["views"]
        if isinstance(views, tuple):
            self.params["views"] = list(views)  # JSON round trip keeps a list
        self.views_ = parse_views(self.params["views"], self.params["seed"], self.params["pixel_scale"])

    @property
    def base_needs_fit(self) -> bool:
        return bool(_REGISTRY[self.params["base"]].needs_fit)

    @property
    def is_fitted(self) -> bool:
        return self._state is not None or not self.base_needs_fit

    # ------------------------------------------------------------------ base detector
    def base_detector(self) -> Detector:
        """The base detector, with the fitted state stored in this detector (unfitted if none was fitted)."""
        base = create(self.params["base"], **self.params["base_params"])
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
        self._view_data(data, View("identity"))  # refuses loaders and iterators with CoVer's message
        ((_, outputs),) = runner.forward_views(data, [View("identity")], labels=labels, desc="cover fit")
        base = create(self.params["base"], **self.params["base_params"]).fit(outputs)
        self.meta_ = {"base_meta": dict(base.meta_)}
        return {BASE_PREFIX + k: v.detach().clone() for k, v in (base.state_ or {}).items()}

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        base = self.base_detector()
        self._view_data(data, View("identity"))  # refuses loaders and iterators with CoVer's message
        # One forward pass per view, each vectorised over the inputs; a runner with a cache_dir reuses the cached
        # outputs of every view it has seen (oodguard.views.outputs), so a second call runs no model at all.
        views = runner.forward_views(data, self.views_, progress=progress, desc="cover")
        return average_over_views(base, (outputs for _, outputs in views))
