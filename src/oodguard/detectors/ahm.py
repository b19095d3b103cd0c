"""Attention head masking (AHM): a feature detector on the embeddings of a text encoder with some heads removed.

AHM changes the representation rather than the decision rule: chosen attention heads of a transformer encoder
are masked at inference, and a distance detector scores the resulting embeddings. The detector here fits and
scores **raw texts** through an attached BERT-family :class:`~oodguard.encoders.HuggingFaceEncoder`
(``input_kind = "texts"``); the heads are chosen on the fit texts alone (see :class:`AttentionHeadMasking`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from oodguard import metrics
from oodguard.detectors.base import NotFittedError, OutputDetector, Source, create, refuse_non_finite, register
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.detectors.params import Mapping as MappingOf
from oodguard.detectors.trained import cached_training, one_thread, seeded
from oodguard.outputs import ModelOutputs

__all__ = ["AttentionHeadMasking", "leave_one_class_out_auroc"]

#: Prefix of the feature detector's state tensors inside this detector's state.
DETECTOR_PREFIX = "detector."
#: The feature detectors AHM may use (the paper reports kNN and Mahalanobis).
FEATURE_DETECTORS = ("knn", "mahalanobis")


def _fold_rows(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of the rows into two halves, stratified by class (each class split as evenly as possible)."""
    generator = torch.Generator().manual_seed(int(seed))
    first, second = [], []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        first.append(rows[: len(rows) // 2])
        second.append(rows[len(rows) // 2 :])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def leave_one_class_out_auroc(
    features: torch.Tensor, labels: torch.Tensor, detector: str = "knn", params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> float:  # fmt: skip
    """How well a feature detector separates an unseen ID class from the seen ones, using ID rows only.

    The rows are split in two halves, stratified by class (seeded). For each half as the bank and each class ``c``:
    ``detector`` is fitted on the bank's rows of every class but ``c`` and scores the other half; the AUROC of its
    rows of class ``c`` (playing OOD) against its rows of the other classes (ID) is taken. The result is the mean
    over both halves and every class. For ``knn``, ``k`` is scaled to the bank's share of the rows
    (``round(k * bank / N)``, at least 1), so that it reaches about as far into the data as ``k`` on all of them.
    """
    params = dict(params or {})
    labels = torch.as_tensor(labels).to(torch.int64)
    classes = torch.unique(labels).tolist()
    halves = _fold_rows(labels, seed)
    values = []
    for bank, query in (halves, halves[::-1]):
        for held_out in classes:
            kept = bank[labels[bank] != held_out]
            inside = query[labels[query] != held_out]
            outside = query[labels[query] == held_out]
            kept_labels = labels[kept]
            remap = {c: i for i, c in enumerate(sorted(set(kept_labels.tolist())))}
            fit = ModelOutputs(features=features[kept], labels=torch.tensor([remap[c] for c in kept_labels.tolist()]))
            settings = dict(params)
            if detector == "knn":
                k = int(settings.get("k", 50))
                settings["k"] = max(1, min(len(kept), round(k * len(kept) / len(labels))))
            scorer = create(detector, **settings)
            if not isinstance(scorer, OutputDetector):
                raise ValueError(f"detector must name an output detector (e.g. 'knn'), got {detector!r}")
            scorer.fit(fit)
            values.append(
                metrics.auroc(
                    np.asarray(scorer.score(ModelOutputs(features=features[inside]))),
                    np.asarray(scorer.score(ModelOutputs(features=features[outside]))),
                )
            )
    return float(np.mean(values))


@register
class AttentionHeadMasking(ModelDetector):
    """AHM: a kNN (or Mahalanobis) detector on text embeddings computed with chosen attention heads masked.

    Fit (labelled ID texts only): the encoder runs once over the fit texts and keeps the input of the first
    searched layer (:class:`~oodguard.encoders.bert.TopLayers`). Starting from no mask, a greedy forward search
    then masks, one at a time, the head of ``layers`` whose removal most raises the leave-one-class-out AUROC of
    the feature detector on the fit texts (:func:`leave_one_class_out_auroc`: one ID class at a time plays OOD
    against the others, on two seeded halves), until ``max_heads`` heads are masked or no head raises it by more
    than ``min_gain``. The first step tries every head of ``layers``; later steps try only the ``shortlist`` heads
    whose removal alone scored best. Each try costs one re-run of the searched layers over the fit texts, so the
    search costs at most ``n_candidates + (max_heads - 1) * shortlist`` re-runs (12 + 4 = 16 for the last layer of
    all-MiniLM-L6-v2, about a sixth of a full pass each). The feature detector is then fitted on the fit texts'
    embeddings with the chosen mask. Score: the feature detector's score of the texts' embeddings with the
    same mask (higher = more OOD).

    Embeddings are the encoder's own (mean pooled, L2-normalised) with heads removed as Hugging Face's
    ``head_mask`` did (:func:`~oodguard.encoders.bert.head_mask_hooks`); with no head masked they are exactly the
    encoder's. The encoder runs on one intra-op thread (as the ``text`` benchmark does).

    Parameters
    ----------
    detector : {"knn", "mahalanobis"}, default "knn"
        The registered feature detector that scores the masked embeddings (and the search criterion).
    detector_params : dict, optional
        Its parameters (e.g. ``{"k": 50}``).
    layers : list of int, default (-1,)
        Layers whose heads are candidates (negative counts from the end; -1 is the last layer).
    max_heads : int, default 2
        Most heads masked.
    shortlist : int, default 4
        Heads tried after the first step (those whose removal alone scored best).
    min_gain : float >= 0, default 0
        A head is masked only if it raises the criterion by more than this.
    seed : int, default 0
        The halves of the criterion.
    cache_dir : str, optional
        Cache the search (mask, criterion, fit embeddings) keyed by the encoder's identity, the fit texts, labels
        and parameters, and the embeddings of scored texts (``cache_dir/text-embeddings``); the benchmark runner
        sets it.

    The encoder is attached, not a parameter: ``create("ahm").attach(default_text_encoder())``; a consumer that
    holds texts and an encoder (the ``text`` benchmark) hands both through a :class:`~oodguard.detectors.Source`.
    Scoring with an encoder of another identity than at fit is refused.

    Deviations from the paper: docs/detectors.md, section ``ahm``.

    Paper: Constantinou, Ioannides, Chadha, Elkins & Simpson, "Out-of-Distribution Detection with Attention Head
    Masking for Multimodal Document Classification", arXiv:2408.11237, 2024. Code:
    constantinouchristos/OOD-AHM (data preparation only; the method's code is not published there).

    Examples
    --------
    >>> from oodguard.encoders import default_text_encoder  # doctest: +SKIP
    >>> ahm = AttentionHeadMasking().attach(default_text_encoder())  # doctest: +SKIP
    >>> ahm.fit(train_texts, labels=train_labels).score(["a verb definition"]).shape  # doctest: +SKIP
    torch.Size([1])
    """

    name = "ahm"
    summary = "kNN on text-encoder embeddings with attention heads masked (heads chosen greedily on ID fit texts)"
    paper = (
        "Constantinou, Ioannides, Chadha, Elkins & Simpson, 'Out-of-Distribution Detection with Attention Head "
        "Masking for Multimodal Document Classification', arXiv:2408.11237, 2024"
    )
    code = "https://github.com/constantinouchristos/OOD-AHM (data preparation only)"
    input_kind: ClassVar[str] = "texts"
    requires = frozenset({"texts"})
    fit_requires = frozenset({"texts", "labels"})
    _parameter_constraints = {
        "detector": [Options(FEATURE_DETECTORS)],
        "detector_params": [None, MappingOf()],
        "layers": [SequenceOf(Integral)],
        "max_heads": [Interval(Integral, 1, None)],
        "shortlist": [Interval(Integral, 1, None)],
        "min_gain": [Interval(Real, 0, None)],
        "seed": [Interval(Integral, 0, None)],
        "cache_dir": [None, Text()],
    }

    def __init__(
        self,
        *,
        detector: str = "knn",
        detector_params: Mapping[str, Any] | None = None,
        layers: Sequence[int] = (-1,),
        max_heads: int = 2,
        shortlist: int = 4,
        min_gain: float = 0.0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.detector = detector
        self.detector_params = detector_params
        self.layers = layers
        self.max_heads = max_heads
        self.shortlist = shortlist
        self.min_gain = min_gain
        self.seed = seed
        self.cache_dir = cache_dir
        self.encoder_: Any = None
        super().__init__()

    def _check_param_combination(self) -> None:
        try:
            self._new_detector()
        except (TypeError, ValueError) as error:
            raise self._param_error("detector_params", f"parameters of {self.detector!r} ({error})") from None

    def _new_detector(self) -> OutputDetector:
        detector = create(self.detector, **dict(self.detector_params or {}))
        assert isinstance(detector, OutputDetector)  # the parameter's options are output detectors
        return detector

    @classmethod
    def encoder_problem(cls, encoder: Any) -> str | None:
        from oodguard.encoders.bert import head_shape
        from oodguard.encoders.text import HuggingFaceEncoder

        if not isinstance(encoder, HuggingFaceEncoder):
            return (
                f"masks the attention heads of a Hugging Face BERT-family encoder (HuggingFaceEncoder), not a "
                f"{type(encoder).__name__}"
            )
        try:
            head_shape(encoder.model)
        except ValueError as error:
            return str(error)
        return None

    # ------------------------------------------------------------------ encoder
    def attach(self, runner: Any, **runner_options: Any) -> AttentionHeadMasking:
        """Give the detector its text encoder (a BERT-family :class:`~oodguard.encoders.HuggingFaceEncoder`)."""
        if runner_options:
            raise ValueError(f"{self.name}: attach takes the text encoder only, got options {sorted(runner_options)}")
        problem = self.encoder_problem(runner)
        if problem is not None:
            raise TypeError(f"{self.name}: {problem}; attach e.g. oodguard.encoders.default_text_encoder()")
        self.encoder_ = runner
        return self

    @property
    def encoder(self) -> Any:
        if self.encoder_ is None:
            raise RuntimeError(
                f"{self.name}: no text encoder attached; call .attach(default_text_encoder()) (or the encoder the "
                "texts were embedded with) first; a loaded detector must be attached again"
            )
        return self.encoder_

    def _texts(self, data: Any, what: str) -> list[str]:
        from oodguard.encoders.text import check_texts

        if isinstance(data, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"{self.name}: {what} takes raw texts (a list of str), got a {type(data).__name__}; AHM embeds the "
                "texts itself with heads masked, so it cannot use embeddings computed before"
            )
        texts = check_texts(data, what)
        if not texts:
            raise ValueError(f"{self.name}: {what} got no texts")
        return texts

    # ------------------------------------------------------------------ fit
    def fit(self, data: Any = None, *, labels: Any = None) -> AttentionHeadMasking:
        """Choose the heads and fit the feature detector on labelled ID texts; returns ``self``."""
        if data is None:
            raise ValueError(f"{self.name}: fit needs in-distribution texts (data=) and their labels")
        texts = self._texts(data, "fit")
        if labels is None:
            raise ValueError(f"{self.name}: fit needs the class labels of the texts (labels=): the heads are chosen "
                             "by how well held-out ID classes separate")  # fmt: skip
        targets = torch.as_tensor(np.asarray(labels)).to(torch.int64).reshape(-1)
        if len(targets) != len(texts):
            raise ValueError(f"{self.name}: got {len(texts)} texts but {len(targets)} labels")
        if int(targets.min()) < 0:
            raise ValueError(
                f"{self.name}: the fit labels hold {int((targets < 0).sum())} OOD-labelled row(s) (label < 0); fit "
                "on in-distribution texts only"
            )
        counts = torch.bincount(targets)
        present = counts[counts > 0]
        if len(present) < 2 or int(present.min()) < 4:
            raise ValueError(
                f"{self.name}: the head search needs at least 2 classes with at least 4 fit texts each (it holds out "
                f"one class at a time on two halves), got class sizes {present.tolist()}"
            )
        encoder = self.encoder
        identity = encoder.identity
        inputs = json.dumps([identity, texts], ensure_ascii=False).encode()
        rows = {"inputs": torch.frombuffer(bytearray(inputs), dtype=torch.uint8), "labels": targets}
        self.stats_ = None
        self._state_cache = {}
        with one_thread():
            searched = cached_training(self, rows, lambda: self._search(encoder, texts, targets))
        inner = self._new_detector().fit(ModelOutputs(features=searched["features"], labels=targets))
        mask = searched["head_mask"]
        self.meta_ = {
            "encoder": identity,
            "masked_heads": searched["masked_heads"].tolist(),  # [layer, head] in the order chosen
            "criterion": searched["criterion"].tolist(),
            "detector_meta": dict(inner.meta_),
        }
        state = {"head_mask": mask, "criterion": searched["criterion"], "masked_heads": searched["masked_heads"]}
        state.update({DETECTOR_PREFIX + k: v.detach().clone() for k, v in (inner.state_ or {}).items()})
        self.state_ = state
        return self

    def _search(self, encoder: Any, texts: list[str], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        from oodguard.encoders.bert import TopLayers, head_shape

        count, heads = head_shape(encoder.model)
        layers = sorted({int(layer) % count for layer in self.layers if -count <= int(layer) < count})
        if len(layers) != len(set(self.layers)):
            raise ValueError(f"{self.name}: layers must name distinct layers, -{count}..{count - 1} for this encoder, "
                             f"got {list(self.layers)}")  # fmt: skip
        params = dict(self.detector_params or {})
        with seeded(self.seed):
            cached = TopLayers(encoder, texts, start=layers[0])

            def criterion(features: torch.Tensor) -> float:
                return leave_one_class_out_auroc(features, labels, self.detector, params, self.seed)

            mask = torch.ones(count, heads)
            best = criterion(cached.embeddings)
            trace = [best]
            chosen: list[list[int]] = []
            candidates = [(layer, head) for layer in layers for head in range(heads)]
            for step in range(int(self.max_heads)):
                trials = []
                for layer, head in candidates:
                    if mask[layer, head] == 0:
                        continue
                    trial = mask.clone()
                    trial[layer, head] = 0
                    trials.append((criterion(cached.embed(trial)), -layer, -head))
                if not trials:
                    break
                trials.sort(reverse=True)  # best first; ties go to the lowest layer, then head
                value, layer, head = trials[0]
                if not value > best + float(self.min_gain):
                    break
                mask[-layer, -head] = 0
                best = value
                trace.append(value)
                chosen.append([-layer, -head])
                if step == 0:  # later steps try only the heads that did best on their own
                    candidates = [(-layer, -head) for _, layer, head in trials[1 : 1 + int(self.shortlist)]]
            features = cached.embed(mask) if bool((mask == 0).any()) else cached.embeddings
        return {
            "head_mask": mask,
            "criterion": torch.tensor(trace, dtype=torch.float64),
            "masked_heads": torch.tensor(chosen, dtype=torch.int64).reshape(-1, 2),
            "features": features,
        }

    # ------------------------------------------------------------------ score
    def feature_detector(self) -> OutputDetector:
        """The fitted feature detector (kNN or Mahalanobis) that scores the masked embeddings."""
        state = self.state_
        if state is None:
            raise NotFittedError(f"{self.name}: call fit(texts, labels=...) first")
        key = ("feature_detector",)
        if key not in self._state_cache:
            inner = self._new_detector()
            inner.state_ = {k[len(DETECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
            inner.meta_ = dict(self.meta_.get("detector_meta", {}))
            self._state_cache[key] = inner  # type: ignore[assignment]
        return self._state_cache[key]  # type: ignore[return-value]

    def embed(self, data: Any, progress: bool | None = None) -> torch.Tensor:
        """Embeddings ``float32 [N, D]`` of the texts with the fitted head mask (cached under ``cache_dir``)."""
        from oodguard.encoders.bert import HeadMaskedEncoder
        from oodguard.encoders.text import embed_texts

        if not self.is_fitted or self.state_ is None:
            raise NotFittedError(f"{self.name}: call fit(texts, labels=...) on in-distribution texts first")
        texts = self._texts(data, "score")
        encoder = self.encoder
        if encoder.identity != self.meta_.get("encoder"):
            raise ValueError(
                f"{self.name}: the attached encoder ({encoder.identity}) is not the one the detector was fitted with "
                f"({self.meta_.get('encoder')}); attach that encoder, or fit again"
            )
        with one_thread():
            return embed_texts(HeadMaskedEncoder(encoder, self.state_["head_mask"]), texts,
                               progress=bool(progress), cache_dir=self.cache_dir, desc="ahm embed")  # fmt: skip

    def score(self, data: Any, *, labels: Any = None, progress: bool | None = None) -> torch.Tensor:
        """OOD scores ``float64 [N]`` of the texts, higher = more likely OOD."""
        features = self.embed(data, progress)
        scores = torch.as_tensor(np.asarray(self.feature_detector().score(ModelOutputs(features=features))))
        scores = scores.to("cpu", torch.float64)
        refuse_non_finite(self.name, scores)
        return scores

    __call__ = score

    # ------------------------------------------------------------------ the consumers' protocol
    def _take_encoder(self, source: Source) -> None:
        if self.encoder_ is not None:
            return
        encoder = getattr(source, "encoder", None)
        if encoder is None:
            raise ValueError(
                f"{self.name}: embeds raw texts with a text encoder, but the source carries none; attach one "
                "(create('ahm').attach(default_text_encoder())) or give a Source(texts=..., encoder=...)"
            )
        self.attach(encoder)

    def _source_texts(self, source: Source) -> Any:
        texts = getattr(source, "texts", None)
        if texts is not None:
            return texts
        if isinstance(source.data, (list, tuple)) and all(isinstance(item, str) for item in source.data):
            return source.data
        raise ValueError(
            f"{self.name}: scores raw texts, but the source holds none (its data are "
            f"{type(source.data).__name__}); give the texts as Source(texts=...)"
        )

    def fit_from(self, source: Source) -> AttentionHeadMasking:
        texts = self._source_texts(source)
        self._take_encoder(source)
        return self.fit(texts, labels=source.labels)

    def score_from(self, source: Source) -> torch.Tensor:
        texts = self._source_texts(source)
        self._take_encoder(source)
        return self.score(texts)
