"""Dual encoders (CLIP-like models) and the text side of the zero-shot detectors.

Zero-shot OOD detection with a dual encoder compares an input's embedding ``v`` with embeddings of text: the
ID class prompts ``t_k`` (MCM), mined negative labels (NegLabel, LAPT) or "no" prompts (CLIPN). Every method
takes L2-normalised embeddings, so this module provides:

* :class:`DualEncoder`: the protocol ``encode_inputs(inputs) -> [N, D]`` and ``encode_texts(texts) -> [M, D]``,
  both L2-normalised float32 on the CPU. For a text encoder the inputs are texts too.
* :class:`OpenClipEncoder`: an adapter for open_clip-style models (``encode_image``, ``encode_text``) and their
  tokenizer; open_clip itself is not imported (pass the model you loaded).
* :class:`HuggingFaceClipEncoder`: the same for Hugging Face ``CLIPModel``-style models (``get_image_features``,
  ``get_text_features``) and their tokenizer.
* :func:`class_embeddings`: the prompt-ensemble class embeddings ``t_k``.
* :func:`mine_negative_labels`: NegLabel's NegMining selection (Jiang et al., ICLR 2024, NegMining).

The detectors that use them are ``mcm``, ``neglabel``, ``clipn`` and ``lapt``
(:mod:`oodguard.detectors.zeroshot`): they read the input embeddings as ``features``.

Example
-------
>>> import torch
>>> labels = torch.eye(4)[:2]                        # two ID labels in a 4-d embedding space
>>> candidates = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0.6, 0.8, 0, 0], [0, 0, 0.6, 0.8]])
>>> mine_negative_labels(labels, candidates, fraction=0.5).tolist()   # the two farthest from both labels
[1, 3]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "DualEncoder",
    "OpenClipEncoder",
    "HuggingFaceClipEncoder",
    "class_embeddings",
    "mine_negative_labels",
    "check_embeddings",
]

#: Rows are divided by ``max(||row||, _NORM_EPS)`` when normalised.
_NORM_EPS = 1e-12
#: Candidate rows per chunk when mining (keeps the ``[rows, K]`` similarity block small for large corpora).
_MINING_CHUNK = 4096


@runtime_checkable
class DualEncoder(Protocol):
    """Two encoders into one embedding space: inputs (images, or texts for a text encoder) and label texts.

    Both methods return L2-normalised ``float32`` tensors on the CPU, one row per item, in the given order.
    """

    def encode_inputs(self, inputs: Any) -> torch.Tensor:
        """Embeddings ``[N, D]`` of ``N`` inputs."""
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[M, D]`` of ``M`` texts (label prompts)."""
        ...


def check_embeddings(value: Any, name: str, *, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """``value`` as a float32 CPU tensor ``[M, D]`` with finite entries, rows L2-normalised (when ``normalize``).

    Refuses, with a message naming ``name``: other types, a rank other than 2, no rows, non-finite entries,
    all-zero rows (no direction to compare) and, when ``dim`` is given, a width other than ``dim``.
    """
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"{name} must hold real numbers, got a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array [M, D], got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, D] (one embedding per row), got shape {tuple(value.shape)}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); pass at least one embedding of width >= 1")
    if dim is not None and value.shape[1] != dim:
        raise ValueError(f"{name} has D={value.shape[1]} columns but D={dim} was expected; embed with the same encoder")
    value = value.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).any(dim=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values; re-embed them or drop them")
    zero = torch.linalg.vector_norm(value, dim=1) == 0
    if bool(zero.any()):
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) (first: row {int(zero.nonzero()[0])}), which have no "
            "direction to compare; drop them"
        )
    return F.normalize(value, dim=1, eps=_NORM_EPS).contiguous() if normalize else value.contiguous()


def _check_texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, got a single string; wrap it: [{texts!r}]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty; pass at least one text")
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"{name} must hold strings; item {wrong[0]} is {type(texts[wrong[0]]).__name__}")
    return texts


class OpenClipEncoder:
    """:class:`DualEncoder` adapter for an open_clip-style model (CLIP, OpenCLIP, CLIPN's "yes" tower).

    The model needs ``encode_image(images) -> [B, D]`` and ``encode_text(tokens) -> [B, D]``; the tokenizer maps a
    list of strings to the token tensor ``encode_text`` takes. open_clip is not imported here: load the model and
    its preprocessing yourself (weights are never downloaded by oodguard), e.g.::

        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="/path/to/weights.bin")
        encoder = OpenClipEncoder(model.eval(), open_clip.get_tokenizer("ViT-B-16"), device="cuda")
        images = torch.stack([preprocess(img) for img in pil_images])
        features = encoder.encode_inputs(images)

    Parameters
    ----------
    model : the dual-encoder module (put in eval mode here).
    tokenizer : callable ``list[str] -> tensor of token ids`` (e.g. ``open_clip.get_tokenizer(name)``).
    device : where the model runs; embeddings are returned on the CPU.
    batch_size : inputs or texts per forward pass.
    progress : show a tqdm progress bar over batches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        for method in ("encode_image", "encode_text"):
            if not callable(getattr(model, method, None)):
                if callable(getattr(model, "get_image_features", None)):
                    raise TypeError(
                        "OpenClipEncoder: this is a Hugging Face CLIP model (get_image_features); use "
                        "HuggingFaceClipEncoder(model, tokenizer)"
                    )
                raise TypeError(
                    f"OpenClipEncoder: model has no {method}() method; pass an open_clip-style model "
                    "(with encode_image and encode_text), or implement the DualEncoder protocol yourself"
                )
        self._configure(model, tokenizer, device, batch_size, progress)

    def _configure(
        self, model: torch.nn.Module, tokenizer: Callable[..., Any], device: Any, batch_size: Any, progress: bool
    ) -> None:
        """The checks and settings both adapters share (the model's methods are checked by each)."""
        owner = type(self).__name__
        if not callable(tokenizer):
            raise TypeError(f"{owner}: tokenizer must be callable (list of strings -> token tensor)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        self.model: Any = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.progress = progress

    def _prepare_images(self, inputs: Any) -> Callable[[Any], torch.Tensor]:
        """Refuse empty image inputs; the function that stacks a batch and moves it to the device."""
        owner = type(self).__name__
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim == 0 or inputs.shape[0] == 0:
                raise ValueError(f"{owner}.encode_inputs: inputs are empty; pass at least one image")
        elif not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise ValueError(f"{owner}.encode_inputs: pass a non-empty [N, C, H, W] tensor or list of tensors")

        def prepare(batch: Any) -> torch.Tensor:
            batch = batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))
            return batch.to(self.device)

        return prepare

    def _run(self, items: Any, encode: Callable[..., Any], prepare: Callable[[Any], Any], what: str) -> torch.Tensor:
        starts = range(0, len(items), self.batch_size)
        pieces = []
        with torch.no_grad():
            for start in tqdm(starts, desc=f"encode {what}", unit="batch", disable=not self.progress, leave=False):
                batch = prepare(items[start : start + self.batch_size])
                pieces.append(encode(batch).detach().to(device="cpu", dtype=torch.float32))
        embeddings = torch.cat(pieces)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
            raise ValueError(
                f"OpenClipEncoder: the model's {what} encoder returned shape {tuple(embeddings.shape)} for "
                f"{len(items)} item(s); it must return one embedding row per item"
            )
        return check_embeddings(embeddings, f"OpenClipEncoder: {what} embeddings")

    def encode_inputs(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` of preprocessed images (a ``[N, C, H, W]`` tensor or a list)."""
        return self._run(inputs, self.model.encode_image, self._prepare_images(inputs), "image")

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[M, D]``."""
        texts = _check_texts(texts, "OpenClipEncoder.encode_texts: texts")

        def prepare(batch):
            return self.tokenizer(list(batch)).to(self.device)

        return self._run(texts, self.model.encode_text, prepare, "text")


def _embedding_tensor(output: Any, what: str) -> torch.Tensor:
    """The embedding in what a Hugging Face ``get_*_features`` returns: a tensor, or an output whose pooled
    (projected) embedding is ``pooler_output`` (transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise ValueError(f"HuggingFaceClipEncoder: the {what} features are a {type(output).__name__} without pooler_output")


class HuggingFaceClipEncoder(OpenClipEncoder):
    """:class:`DualEncoder` adapter for a Hugging Face ``CLIPModel``-style model and its tokenizer.

    The model needs ``get_image_features(pixel_values=...)`` and ``get_text_features(input_ids=..., ...)``; the
    tokenizer is called as ``tokenizer(texts, padding=True, truncation=True, return_tensors="pt")`` and returns the
    keyword inputs of ``get_text_features``. Nothing is downloaded: load the model and processor yourself, e.g.
    ``CLIPModel.from_pretrained(local_folder)``, ``CLIPTokenizer.from_pretrained(local_folder)``.

    Examples
    --------
    Images go in as the processor makes them (``pixel_values [N, 3, H, W]``)::

        encoder = HuggingFaceClipEncoder(model, tokenizer)
        mcm = detectors.create("mcm", label_embeddings=class_embeddings(encoder, ["cat", "dog"]))
        scores = mcm.score(encoder.encode_inputs(pixel_values))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[..., Any],
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"HuggingFaceClipEncoder: model has no {method}() method; pass a Hugging Face CLIPModel-style "
                    "model (for open_clip models use OpenClipEncoder)"
                )
        self._configure(model, tokenizer, device, batch_size, progress)

    def encode_inputs(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` of processed images (``pixel_values``)."""

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return _embedding_tensor(self.model.get_image_features(pixel_values=pixels), "image")

        return self._run(inputs, encode, self._prepare_images(inputs), "image")

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[M, D]``."""
        texts = _check_texts(texts, "HuggingFaceClipEncoder.encode_texts: texts")

        tokenizer: Any = self.tokenizer  # a Hugging Face tokenizer: keyword options, a dict of tensors back

        def prepare(batch: Any) -> dict[str, torch.Tensor]:
            tokens = tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt")
            return {key: value.to(self.device) for key, value in dict(tokens).items()}

        def encode(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
            return _embedding_tensor(self.model.get_text_features(**tokens), "text")

        return self._run(texts, encode, prepare, "text")


def class_embeddings(
    encoder: DualEncoder, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)
) -> torch.Tensor:
    """Prompt-ensemble class embeddings ``t_k`` ``[K, D]``: for each class, the mean of the L2-normalised
    encodings of ``template.format(name)`` over the templates, renormalised (CLIP's and CLIPN's
    ``classification.py`` do the same).

    MCM's official prompt is the single template ``"a photo of a {}."``; NegLabel's ID prompt is ``"the nice {}"``.
    All ``K x T`` prompts go to the encoder in one call (it batches them).
    """
    names = _check_texts(class_names, "class_embeddings: class_names")
    templates = _check_texts(templates, "class_embeddings: templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"class_embeddings: every template needs a '{{}}' for the class name; {bad[0]!r} has none")
    prompts = [template.format(name) for name in names for template in templates]
    encoded = check_embeddings(encoder.encode_texts(prompts), "class_embeddings: the encoder's text embeddings")
    if encoded.shape[0] != len(prompts):
        raise ValueError(
            f"class_embeddings: the encoder returned {encoded.shape[0]} embeddings for {len(prompts)} prompts"
        )
    mean = encoded.reshape(len(names), len(templates), -1).mean(dim=1)
    # opposite prompts can cancel exactly; such a class has no direction left to compare with
    return check_embeddings(mean, "class_embeddings: the prompt-ensemble mean")


def _percentile_similarity(labels: torch.Tensor, candidates: torch.Tensor, percentile: float) -> torch.Tensor:
    """``q_j = Quantile_percentile({c_j . t_k : k})`` for every candidate (linear interpolation, as torch.quantile)."""
    pieces = [
        torch.quantile(candidates[start : start + _MINING_CHUNK] @ labels.T, percentile, dim=1)
        for start in range(0, candidates.shape[0], _MINING_CHUNK)
    ]
    return torch.cat(pieces)


def _plain_number(value: Any) -> Any:
    """A numpy real scalar (``np.float32(0.15)``, ``np.int64(1)``) as the Python number it holds; anything else
    unchanged (and left for the caller's checks to refuse)."""
    if isinstance(value, np.generic) and np.issubdtype(value.dtype, np.number):
        if not np.issubdtype(value.dtype, np.complexfloating):
            return value.item()
    return value


def mine_negative_labels(
    label_embeddings: Any,
    candidate_embeddings: Any,
    fraction: float = 0.15,
    percentile: float = 0.95,
    kinds: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Indices of the negative labels NegMining selects from a candidate corpus (NegLabel's NegMining).

    For every candidate ``c_j``, ``q_j`` is the ``percentile`` quantile (linear interpolation, ``torch.quantile``)
    of its cosine similarities to the ``K`` ID label embeddings; the candidates are sorted by ascending ``q_j``
    (the farthest from the ID labels first) and the first ``floor(fraction * count)`` are kept.

    Parameters
    ----------
    label_embeddings : ``[K, D]`` ID label embeddings (normalised here).
    candidate_embeddings : ``[M_all, D]`` embeddings of the candidate words' prompts (normalised here), e.g.
        WordNet nouns as ``"the nice {}"`` and adjectives as ``"This is a {} photo"`` (deduplicated beforehand).
    fraction : share kept (official ``neg_topk = 0.15``), in ``(0, 1]``; a Python or numpy real number.
    percentile : quantile level in ``[0, 1]`` (official ``pencentile = 0.95``; the paper's ``eta = 0.05``); a Python
        or numpy real number.
    kinds : optional kind per candidate (e.g. ``"noun"``/``"adj"``). When given, the selection is made
        **separately within each kind**, as the official code does for nouns and adjectives, and the result lists
        the kinds in the order they first appear in ``kinds``. When omitted, all candidates form one kind (call it
        once per kind and concatenate to get the same result).

    Returns
    -------
    LongTensor of candidate indices: kind by kind, each in ascending ``q_j`` (ties keep the corpus order).

    The official code (``multi_modal.py``) also floors ``len * neg_topk`` and concatenates nouns before adjectives;
    its ``torch.argsort`` is not stable, so ties may be ordered differently there.
    """
    labels = check_embeddings(label_embeddings, "mine_negative_labels: label_embeddings")
    candidates = check_embeddings(
        candidate_embeddings, "mine_negative_labels: candidate_embeddings", dim=labels.shape[1]
    )
    fraction, percentile = _plain_number(fraction), _plain_number(percentile)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"mine_negative_labels: fraction must lie in (0, 1] (official 0.15), got {fraction!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 1:
        hint = f"; for the {percentile}th percentile pass {percentile / 100}" if isinstance(percentile, (int, float)) \
            and 1 < percentile <= 100 else ""  # fmt: skip
        raise ValueError(
            f"mine_negative_labels: percentile is a quantile level in [0, 1] (official 0.95), got {percentile!r}{hint}"
        )
    if kinds is None:
        kind_ids = torch.zeros(candidates.shape[0], dtype=torch.long)
    else:
        kinds = list(kinds)
        if len(kinds) != candidates.shape[0]:
            raise ValueError(
                f"mine_negative_labels: kinds has {len(kinds)} entries but there are {candidates.shape[0]} "
                "candidates; give one kind per candidate"
            )
        order: dict[Any, int] = {}
        kind_ids = torch.tensor([order.setdefault(kind, len(order)) for kind in kinds], dtype=torch.long)
    distance = _percentile_similarity(labels, candidates, float(percentile))
    selected = []
    for kind in range(int(kind_ids.max()) + 1):
        members = torch.nonzero(kind_ids == kind).flatten()
        ranked = members[torch.sort(distance[members], stable=True).indices]
        selected.append(ranked[: int(len(members) * fraction)])
    chosen = torch.cat(selected)
    if chosen.numel() == 0:
        raise ValueError(
            f"mine_negative_labels: fraction={fraction} of {candidates.shape[0]} candidate(s) selects none "
            "(the count is floored per kind); give more candidates or a larger fraction"
        )
    return chosen
