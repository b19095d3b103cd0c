"""BERT-family text encoders opened up: attention heads masked, the top layers re-run or fine-tuned on cached inputs.

Everything here needs the layout of BERT, RoBERTa, MiniLM, ELECTRA and the like in Hugging Face ``transformers``:
``model.encoder.layer[l].attention.output.dense`` is the linear projection that mixes the concatenated outputs
of layer ``l``'s ``model.config.num_attention_heads`` heads.

**Head masks.** ``head_mask[l, h] = 0`` removes head ``h`` of layer ``l``: its slice of the concatenated head
outputs is multiplied by 0 before the output projection (a forward pre-hook on that projection). This is what
Hugging Face's ``head_mask`` argument did (it multiplied the head's attention probabilities, and a head's
output is those probabilities times its values, so both zero the same vector); ``transformers`` 5 removed the
argument, so it is done here with a hook that works with every version. A mask of ones multiplies by 1.0, which
leaves every float unchanged: the encoder's outputs are then bit for bit those without a mask.

**Top layers.** :class:`TopLayers` runs the encoder once over a list of texts and keeps what enters layer
``start``; layers ``start..L-1`` can then be re-run from there (with a head mask, or after training them) at a
fraction of a full pass. This makes searching over head masks of the last layer, and fine-tuning it, cheap.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodguard import persist
from oodguard.encoders.text import HuggingFaceEncoder, TextEncoder, mean_pool

__all__ = [
    "HeadMaskedEncoder",
    "TopLayers",
    "check_head_mask",
    "encoder_layers",
    "fine_tune_top_layers",
    "head_mask_hooks",
    "head_shape",
]


# ---------------------------------------------------------------------------------------------- layout
def _projection(layer: nn.Module) -> nn.Linear | None:
    attention = getattr(layer, "attention", None)
    dense = getattr(getattr(attention, "output", None), "dense", None)
    return dense if isinstance(dense, nn.Linear) else None


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-family model (``model.encoder.layer``); refuses any other layout."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or any(_projection(x) is None for x in layers):
        raise ValueError(
            f"{type(model).__name__}: expected a BERT-family encoder whose layers are model.encoder.layer[l] with "
            "an attention output projection attention.output.dense (BERT, RoBERTa, MiniLM, ELECTRA, ...); head "
            "masks and top-layer re-runs need that layout"
        )
    return layers


def head_shape(model: nn.Module) -> tuple[int, int]:
    """``(layers, heads per layer)`` of a BERT-family model."""
    layers = encoder_layers(model)
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{type(model).__name__}: model.config.num_attention_heads is missing")
    width = _projection(layers[0]).in_features  # type: ignore[union-attr]
    if width % heads:
        raise ValueError(
            f"{type(model).__name__}: the attention output projection takes {width} inputs, not a multiple of "
            f"num_attention_heads={heads}"
        )
    return len(layers), heads


def check_head_mask(head_mask: Any, shape: tuple[int, int]) -> torch.Tensor:
    """``head_mask`` as a float32 ``[layers, heads]`` tensor of finite values (1 keeps a head, 0 removes it)."""
    mask = torch.as_tensor(head_mask)
    if mask.is_complex() or mask.dtype == torch.bool:
        mask = mask.to(torch.float32)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"head_mask must have shape [layers, heads] = {list(shape)} for this encoder, got {list(mask.shape)}"
        )
    mask = mask.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(mask).all()):
        raise ValueError("head_mask holds NaN or infinite values; use 1 to keep a head and 0 to remove it")
    return mask.contiguous()


@contextlib.contextmanager
def head_mask_hooks(model: nn.Module, head_mask: Any) -> Iterator[None]:
    """Within the block, ``model`` runs with head ``h`` of layer ``l`` scaled by ``head_mask[l, h]``.

    Every layer's attention output projection gets a forward pre-hook that multiplies the slice of its input
    belonging to each head (``dim / heads`` columns per head, in head order) by that head's mask value. The hooks
    are removed on exit, also when the block raises. They change the shared model, so do not run it from another
    thread meanwhile.
    """
    layers = encoder_layers(model)
    shape = head_shape(model)
    mask = check_head_mask(head_mask, shape)
    handles = []
    try:
        for index, layer in enumerate(layers):
            projection = _projection(layer)
            assert projection is not None  # encoder_layers checked it
            scale = mask[index].repeat_interleave(projection.in_features // shape[1])

            def hook(module: nn.Module, args: tuple, scale: torch.Tensor = scale) -> tuple:
                inputs = args[0]
                return (inputs * scale.to(device=inputs.device, dtype=inputs.dtype), *args[1:])

            handles.append(projection.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _masked_heads(mask: torch.Tensor) -> str:
    if bool(((mask == 0) | (mask == 1)).all()):
        return ",".join(f"{int(layer)}.{int(head)}" for layer, head in (mask == 0).nonzero().tolist()) or "none"
    return "sha256=" + hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16]


class HeadMaskedEncoder(TextEncoder):
    """A :class:`~oodguard.encoders.HuggingFaceEncoder` (BERT family) whose attention heads are masked.

    Embeddings are those of ``encoder`` with ``head_mask`` applied (see :func:`head_mask_hooks`): same tokenizer,
    pooling and normalisation. With a mask of ones they equal ``encoder``'s exactly. The identity (part of
    embedding cache keys) is the encoder's plus the masked heads.

    Parameters
    ----------
    encoder : HuggingFaceEncoder
        Its model must have the BERT layout (:func:`encoder_layers`).
    head_mask : tensor ``[layers, heads]``
        1 keeps a head, 0 removes it.

    Examples
    --------
    >>> encoder = default_text_encoder()  # doctest: +SKIP
    >>> mask = torch.ones(6, 12); mask[5, 10] = 0  # doctest: +SKIP
    >>> HeadMaskedEncoder(encoder, mask).encode_texts(["a small dog"]).shape  # doctest: +SKIP
    torch.Size([1, 384])
    """

    def __init__(self, encoder: HuggingFaceEncoder, head_mask: Any) -> None:
        if not isinstance(encoder, HuggingFaceEncoder):
            raise TypeError(
                f"encoder: expected a HuggingFaceEncoder (e.g. default_text_encoder()), got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.head_mask = check_head_mask(head_mask, head_shape(encoder.model))
        self.batch_size = encoder.batch_size

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        with head_mask_hooks(self.encoder.model, self.head_mask):
            return self.encoder._encode_batch(texts)

    def _fingerprint(self) -> str:
        return f"{self.encoder.identity}:masked-heads={_masked_heads(self.head_mask)}"


# ---------------------------------------------------------------------------------------------- top layers
class TopLayers:
    """What enters layer ``start`` of a BERT-family encoder for a list of texts, so that layers ``start..L-1`` can be
    re-run without the layers below.

    The encoder runs once over ``texts`` in batches of ``batch_size`` (longest first, unless ``sort`` is false:
    then in the order given); a forward
    pre-hook on layer ``start`` keeps its arguments (hidden states and attention mask, as the model passes them)
    and the tokenizer's attention mask is kept for pooling. ``embeddings`` are that pass's ordinary embeddings.
    The first batch is re-run from its kept inputs and must reproduce the pass exactly; a model whose layers do
    not simply follow one another (anything after the last layer besides pooling) is refused there.

    Parameters
    ----------
    encoder : HuggingFaceEncoder
        BERT layout (:func:`encoder_layers`); it runs in eval mode under no-grad.
    texts : list of str
    start : int
        First layer to re-run (negative counts from the end: -1 is the last layer).
    batch_size : int, optional
        Texts per batch (default: the encoder's).
    progress : callable, optional
        Called with the number of texts after each batch of the pass.
    sort : bool
        Batch the texts longest first (little padding), or in the order given (e.g. random batches for training).
    """

    def __init__(
        self,
        encoder: HuggingFaceEncoder,
        texts: Sequence[str],
        start: int = -1,
        batch_size: int | None = None,
        progress: Callable[[int], Any] | None = None,
        sort: bool = True,
    ) -> None:
        if not isinstance(encoder, HuggingFaceEncoder):
            raise TypeError(
                f"encoder: expected a HuggingFaceEncoder (e.g. default_text_encoder()), got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.layers = encoder_layers(encoder.model)
        count = len(self.layers)
        if not -count <= int(start) < count:
            raise ValueError(f"start must name a layer, -{count}..{count - 1} for this encoder, got {start}")
        self.start = int(start) % count
        self.texts = list(texts)
        if not self.texts:
            raise ValueError("texts: expected at least one text")
        size = int(batch_size or encoder.batch_size)
        order = list(range(len(self.texts)))
        if sort:
            order.sort(key=lambda i: -len(self.texts[i]))
        self._batches: list[tuple[torch.Tensor, tuple, dict, torch.Tensor]] = []
        kept: list[tuple[tuple, dict]] = []

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kept.append((args, kwargs))

        handle = self.layers[self.start].register_forward_pre_hook(keep, with_kwargs=True)
        pooled = torch.empty(len(self.texts), encoder.dim, dtype=torch.float32)
        first_output = None
        try:
            with torch.no_grad():
                for begin in range(0, len(order), size):
                    rows = torch.tensor(order[begin : begin + size])
                    batch = self._tokens([self.texts[i] for i in rows.tolist()])
                    hidden = encoder.model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    if first_output is None:
                        first_output = hidden
                    args, kwargs = kept.pop()
                    self._batches.append((rows, args, kwargs, mask))
                    pooled[rows] = mean_pool(hidden, mask).to("cpu", torch.float32)
                    if progress is not None:
                        progress(len(rows))
        finally:
            handle.remove()
        self.embeddings = F.normalize(pooled, dim=1)
        with torch.no_grad():
            again = self._run(0, self.layers[self.start :], pool=False)
        if first_output is None or not torch.equal(again, first_output):
            raise ValueError(
                f"{type(encoder.model).__name__}: re-running layers {self.start}..{count - 1} from their inputs does "
                "not reproduce the model's last hidden state; this model is not a plain stack of layers"
            )

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoder = self.encoder
        batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length,
                                  return_tensors="pt")  # fmt: skip
        device = encoder._device()
        return {key: value.to(device) for key, value in batch.items()}

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def _run(self, index: int, layers: Iterable[nn.Module], pool: bool = True) -> torch.Tensor:
        """Batch ``index`` through ``layers`` from its kept inputs: mean-pooled ``[B, D]`` (or the hidden states)."""
        _, args, kwargs, mask = self._batches[index]
        hidden = args[0]
        for layer in layers:
            output = layer(hidden, *args[1:], **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output  # transformers < 5 returns tuples
        return mean_pool(hidden, mask) if pool else hidden

    def rows(self, index: int) -> torch.Tensor:
        """Positions in ``texts`` of batch ``index``'s rows."""
        return self._batches[index][0]

    def embed(self, head_mask: Any = None, layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Embeddings ``float32 [N, D]`` (unit rows, in the order of ``texts``) from layers ``start..L-1`` re-run.

        ``head_mask`` (``[layers, heads]``, see :func:`head_mask_hooks`) masks heads; only those of the re-run
        layers act (the kept inputs already hold the layers below). ``layers`` replaces the re-run layers (e.g.
        fine-tuned copies of them).
        """
        stack = list(self.layers[self.start :]) if layers is None else list(layers)
        pooled = torch.empty(len(self.texts), self.encoder.dim, dtype=torch.float32)
        masking = head_mask_hooks(self.encoder.model, head_mask) if head_mask is not None else contextlib.nullcontext()
        with torch.no_grad(), masking:
            for index in range(self.num_batches):
                pooled[self.rows(index)] = self._run(index, stack).to("cpu", torch.float32)
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError("the re-run layers produced non-finite embeddings; check the model's weights")
        return F.normalize(pooled, dim=1)


# ---------------------------------------------------------------------------------------------- fine-tuning
#: Bump when the fine-tuning recipe changes, so that cached weights are not reused.
FINE_TUNE_VERSION = 1
#: The kind of a cached fine-tuned layers file (see oodguard.persist).
FINE_TUNE_CACHE_KIND = "cache.fine_tuned_layers"


def fine_tune_top_layers(
    encoder: HuggingFaceEncoder,
    texts: Sequence[str],
    labels: Any,
    *,
    layers: int = 1,
    head: nn.Linear | None = None,
    epochs: int = 4,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[HuggingFaceEncoder, nn.Linear]:
    """A copy of ``encoder`` whose top ``layers`` transformer layers are fine-tuned to classify ``texts``, and the
    head trained with them (``logits = head(normalize(embedding))``, as a :class:`oodguard.heads.LinearHead` on
    the encoder's embeddings).

    A light fine-tuning that runs on a CPU in well under a minute for a few thousand short texts: the layers below
    stay frozen (their outputs are computed once, :class:`TopLayers`), and the top layers plus a linear head on
    the normalised mean-pooled embedding are trained with cross-entropy (AdamW, weight decay 0.01, layers at
    ``lr``, head at ``head_lr``, dropout on, seeded shuffled mini-batches of ``batch_size``, ``epochs`` passes,
    one thread). ``head`` (``[classes, dim]``, e.g. a linear probe trained on the frozen embeddings) initialises
    the head, which is linear probing then fine-tuning; without it the head starts at zero.

    With ``cache_dir``, the trained layers and head are stored as safetensors under ``cache_dir/fine-tuned/``, keyed
    by a sha256 of the encoder's identity, the texts, labels, initial head and every setting, and reused. The
    returned encoder's identity extends ``encoder``'s with that key, so its embeddings cache apart from the
    pre-trained ones.
    """
    from tqdm.auto import tqdm

    from oodguard.detectors.trained import seeded

    if not isinstance(encoder, HuggingFaceEncoder):
        raise TypeError(
            f"encoder: expected a HuggingFaceEncoder (e.g. default_text_encoder()), got {type(encoder).__name__}"
        )
    texts = list(texts)
    targets = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if len(texts) != len(targets) or not texts:
        raise ValueError(f"texts and labels must be non-empty and of one length, got {len(texts)} and {len(targets)}")
    if int(targets.min()) < 0:
        raise ValueError("labels must be class indices >= 0 (fine-tune on in-distribution texts only)")
    count = len(encoder_layers(encoder.model))
    if not 1 <= int(layers) <= count:
        raise ValueError(f"layers must be 1..{count} (the top layers to train), got {layers}")
    for name, count_value in (("epochs", epochs), ("batch_size", batch_size)):
        if int(count_value) < 1:
            raise ValueError(f"{name} must be at least 1, got {count_value}")
    for name, rate in (("lr", lr), ("head_lr", head_lr)):
        if not float(rate) > 0:
            raise ValueError(f"{name} must be > 0, got {rate}")
    classes = int(targets.max()) + 1
    if head is not None and (head.in_features != encoder.dim or head.out_features < classes):
        raise ValueError(
            f"head must be an nn.Linear({encoder.dim}, C >= {classes}), got nn.Linear({head.in_features}, "
            f"{head.out_features})"
        )
    classes = head.out_features if head is not None else classes
    settings = {"version": FINE_TUNE_VERSION, "layers": int(layers), "epochs": int(epochs), "lr": float(lr),
                "head_lr": float(head_lr), "batch_size": int(batch_size), "seed": int(seed),
                "torch": torch.__version__}  # fmt: skip
    digest = hashlib.sha256(json.dumps({"encoder": encoder.identity, **settings}, sort_keys=True).encode())
    digest.update(json.dumps(texts, ensure_ascii=False).encode())
    digest.update(targets.numpy().tobytes())
    if head is not None:
        digest.update(head.weight.detach().cpu().to(torch.float64).numpy().tobytes())
        digest.update(head.bias.detach().cpu().to(torch.float64).numpy().tobytes())
    key = digest.hexdigest()[:32]
    model = copy.deepcopy(encoder.model).eval()
    top = encoder_layers(model)[count - int(layers) :]
    path = Path(cache_dir).expanduser() / "fine-tuned" / f"{key}.safetensors" if cache_dir is not None else None
    cached = persist.load_cache(path, kind=FINE_TUNE_CACHE_KIND, versions=1) if path is not None else None
    weights = cached[0] if cached is not None else None
    linear = nn.Linear(encoder.dim, classes, dtype=torch.float32)
    if weights is not None:
        try:
            top.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("top.")})
            linear.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
        except (RuntimeError, KeyError):  # a file of another architecture under this key: train again
            weights = None
    if weights is None:
        # fixed random batches (a seeded permutation, not sorted by length), visited in a new order every epoch
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(int(seed)))
        inputs = TopLayers(encoder, [texts[i] for i in order.tolist()], start=count - int(layers),
                           batch_size=int(batch_size), sort=False)  # fmt: skip
        shuffled = targets[order]
        with torch.no_grad():
            if head is None:
                linear.weight.zero_()
                linear.bias.zero_()
            else:
                linear.weight.copy_(head.weight)
                linear.bias.copy_(head.bias)
        optimiser = torch.optim.AdamW(
            [{"params": top.parameters(), "lr": float(lr)}, {"params": linear.parameters(), "lr": float(head_lr)}],
            weight_decay=0.01,
        )
        steps = int(epochs) * inputs.num_batches
        with seeded(int(seed)), tqdm(total=steps, desc="fine-tune", disable=not progress) as bar:
            top.train()
            for _ in range(int(epochs)):
                for index in torch.randperm(inputs.num_batches).tolist():
                    optimiser.zero_grad(set_to_none=True)
                    logits = linear(F.normalize(inputs._run(index, top), dim=1))
                    F.cross_entropy(logits, shuffled[inputs.rows(index)]).backward()
                    optimiser.step()
                    bar.update(1)
            top.eval()
        if path is not None:
            tensors = {f"top.{k}": v.detach().contiguous() for k, v in top.state_dict().items()}
            tensors.update({f"head.{k}": v.detach().contiguous() for k, v in linear.state_dict().items()})
            persist.save_cache(
                path, tensors, kind=FINE_TUNE_CACHE_KIND, version=1, header={"encoder": encoder.identity}
            )
    identity = f"{encoder.identity}:fine-tuned={key}"
    tuned = HuggingFaceEncoder(model, encoder.tokenizer, max_length=encoder.max_length,
                               batch_size=encoder.batch_size, identity=identity)  # fmt: skip
    return tuned, linear.eval()
