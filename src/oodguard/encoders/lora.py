"""LoRA fine-tuning of a Hugging Face text encoder as a classifier, and the features of its LoRA layers.

LoRA-BAM (Wu, Duan, Bensalem & Cheng, 2025) fine-tunes a model with LoRA adapters, then monitors the features of the
LoRA layers with boxes around clusters of the fine-tuning data (:class:`oodguard.detectors.BAM`). Here the model is a
sentence encoder (e.g. all-MiniLM-L6-v2) with a linear head on its mean-pooled last hidden state, fine-tuned on a
topic task. :class:`LoraClassifier` holds the adapted copy of the encoder; its :meth:`~LoraClassifier.outputs` are
ordinary :class:`~oodguard.outputs.ModelOutputs` whose ``layers["lora"]`` holds the monitored features: the outputs
of every LoRA-adapted layer, mean-pooled over the text's tokens and concatenated.

Training (:func:`train_lora_classifier`) is seeded and runs on one thread, so the same data gives the same weights.
With ``top_layers`` set, only the top layers carry adapters: the frozen layers below run once per text before
training and the training steps run the top layers alone, which makes a few epochs over a few thousand short texts
take seconds per epoch on one CPU core. Fine-tuned classifiers are cached as safetensors (adapter weights and head,
never pickle) under a key of the data, the settings and the base encoder's identity
(:func:`load_or_train_lora_classifier`). LoRA comes from ``peft`` (the ``text`` extra).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard import persist
from oodguard.encoders.text import HuggingFaceEncoder, mean_pool
from oodguard.outputs import ModelOutputs

__all__ = [
    "LAYER",
    "LoraClassifier",
    "LoraSettings",
    "import_peft",
    "load_or_train_lora_classifier",
    "lora_outputs",
    "train_lora_classifier",
]

#: Name of the monitored features in :meth:`LoraClassifier.outputs` (``outputs.layers[LAYER]``).
LAYER = "lora"
#: Bump when the classifier, its training or its features change, so that cached weights and outputs are not reused.
LORA_VERSION = "text-lora-classifier-1"
#: The kind of a cached classifier's file (see oodguard.persist).
CACHE_KIND = "cache.lora_classifier"

_INSTALL_HINT = 'install the text extra: pip install "oodguard[text]"'


def import_peft() -> Any:
    """The ``peft`` package, or an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"LoRA fine-tuning needs peft ({error}); {_INSTALL_HINT}") from error
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """Everything besides the data and the base encoder that decides a fine-tuned :class:`LoraClassifier`.

    Parameters
    ----------
    num_classes : int
        Classes of the task (at least 2).
    rank, alpha : int, float
        LoRA rank ``r`` and scale numerator: an adapted layer computes ``W x + (alpha / r) B A x``.
    targets : tuple of str
        Names of the linear layers to adapt (``query`` and ``value`` of BERT-style attention, LoRA's own choice).
    top_layers : int or None
        Adapt only the targets of the top ``top_layers`` transformer layers (``model.encoder.layer``); the frozen
        layers below then run once per text. None adapts every layer and runs the whole model at every step.
    epochs, batch_size, lr : training length, texts per step and AdamW's learning rate (no weight decay).
    paraphrase_weight : float
        ``lambda`` of LoRA-BAM's paraphrase regulariser ``lambda * mean ||phi(q) - phi(para(q))||^2`` over the
        batch, ``phi`` the monitored features (pooled outputs of the adapted layers). 0 turns it off; above 0 the
        training needs one paraphrase per text.
    max_length : int
        Longest tokenised text kept, in training and in :meth:`LoraClassifier.outputs`.
    seed : int
        Seeds the adapters' and head's initialisation and the batch order.
    """

    num_classes: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    top_layers: int | None = 2
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    paraphrase_weight: float = 0.0
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("num_classes", self.num_classes, 2), ("rank", self.rank, 1), ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1), ("max_length", self.max_length, 2), ("seed", self.seed, 0),
        ]  # fmt: skip
        for name, value, least in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.top_layers is not None and (
            isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 1
        ):
            raise ValueError(f"top_layers must be None (every layer) or an integer >= 1, got {self.top_layers!r}")
        if not self.alpha > 0 or not self.lr > 0:
            raise ValueError(f"alpha and lr must be > 0, got alpha={self.alpha!r}, lr={self.lr!r}")
        if not self.paraphrase_weight >= 0:
            raise ValueError(
                f"paraphrase_weight must be >= 0 (0 turns the regulariser off), got {self.paraphrase_weight}"
            )
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets must be a non-empty tuple of layer names, got {self.targets!r}")


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, 1, T]``: 0 where a token may be attended to, the dtype's minimum on padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class LoraClassifier(nn.Module):
    """A copy of a Hugging Face encoder with LoRA adapters, and a linear head on its mean-pooled last hidden state.

    ``logits = head(mean_t h_t)`` over the real tokens of the last hidden state ``h``. At construction the adapters'
    ``B`` matrices are zero (peft's initialisation), so the adapted encoder computes exactly what the base encoder
    does; the caller's encoder is copied, never changed. Build one with :func:`train_lora_classifier` or
    :func:`load_or_train_lora_classifier`.

    Parameters
    ----------
    encoder : HuggingFaceEncoder
        The base encoder (its model, tokenizer and identity).
    settings : LoraSettings

    Attributes
    ----------
    model : the adapted copy (a peft model).
    head : ``nn.Linear(hidden_size, num_classes)``.
    adapted_names : names of the adapted linear layers, in the order their pooled outputs are concatenated.
    feature_sizes : output size of each adapted layer (its share of ``layers[LAYER]``).
    meta : training facts (``train_seconds``, ``final_loss``, ``from_cache``).
    """

    def __init__(self, encoder: HuggingFaceEncoder, settings: LoraSettings) -> None:
        super().__init__()
        if not isinstance(encoder, HuggingFaceEncoder):
            raise TypeError(
                f"encoder: LoRA fine-tuning needs a HuggingFaceEncoder (a transformers model and its tokenizer, e.g. "
                f"default_text_encoder()), got {type(encoder).__name__}"
            )
        peft = import_peft()
        base = copy.deepcopy(encoder.model)
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.layers_below = 0
        transform = None
        if settings.top_layers is not None:
            stack = _layer_stack(base)
            if settings.top_layers > len(stack):
                raise ValueError(f"top_layers={settings.top_layers} but the model has {len(stack)} layers")
            self.layers_below = len(stack) - settings.top_layers
            transform = list(range(self.layers_below, len(stack)))
        config = peft.LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
            target_modules=list(settings.targets), layers_to_transform=transform,
        )  # fmt: skip
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = peft.get_peft_model(base, config)
        lora_layer = peft.tuners.lora.LoraLayer
        adapted = [(name, module) for name, module in self.model.named_modules() if isinstance(module, lora_layer)]
        if not adapted:
            raise ValueError(f"no layer of the model matches targets={list(settings.targets)}; name its linear layers")
        self.adapted_names = [name.removeprefix("base_model.model.") for name, _ in adapted]
        self.feature_sizes = [int(module.out_features) for _, module in adapted]
        self.tokenizer = encoder.tokenizer
        self.settings = settings
        self.base_identity = encoder.identity
        self.device = next(base.parameters()).device
        self.head = nn.Linear(encoder.dim, settings.num_classes, device=self.device)
        self.meta: dict[str, Any] = {}
        self._captured: list[torch.Tensor] | None = None
        for _, module in adapted:
            module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._captured is not None:
            self._captured.append(output)

    # ------------------------------------------------------------------ forward passes
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="pt"
        )

    def forward_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole adapted model: pooled embedding ``[B, H]`` and the pooled LoRA-layer features ``[B, F]``."""
        self._captured = []
        try:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return mean_pool(hidden, attention_mask), self._features(attention_mask)
        finally:
            self._captured = None

    def states_below(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, H]`` entering the first adapted layer (``top_layers`` set): frozen, no adapters."""
        base = self.model.base_model.model
        hidden = base.embeddings(input_ids=input_ids)
        return self._run(_layer_stack(base)[: self.layers_below], hidden, attention_mask)

    def forward_states(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted top layers from :meth:`states_below`: pooled embedding and pooled LoRA-layer features."""
        self._captured = []
        try:
            hidden = self._run(_layer_stack(self.model.base_model.model)[self.layers_below :], states, attention_mask)
            return mean_pool(hidden, attention_mask), self._features(attention_mask)
        finally:
            self._captured = None

    @staticmethod
    def _run(layers: Any, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        additive = _additive_mask(attention_mask, hidden.dtype)
        for layer in layers:
            output = layer(hidden, attention_mask=additive)
            hidden = output[0] if isinstance(output, tuple) else output  # transformers 4 returns tuples
        return hidden

    def _features(self, attention_mask: torch.Tensor) -> torch.Tensor:
        captured = self._captured or []
        if len(captured) != len(self.adapted_names):
            raise RuntimeError(f"expected the outputs of {len(self.adapted_names)} adapted layers, got {len(captured)}")
        return torch.cat([mean_pool(values, attention_mask) for values in captured], dim=1)

    # ------------------------------------------------------------------ outputs, state, identity
    def outputs(
        self, texts: Sequence[str], labels: Any = None, batch_size: int = 64, progress: bool = False, desc: str = ""
    ) -> ModelOutputs:
        """Run the adapted encoder over ``texts`` (longest first, in batches, no-grad, eval mode).

        Returns ModelOutputs with ``features`` (the pooled embedding, the head's input), ``logits``, ``head``,
        ``layers[LAYER]`` (the pooled outputs of the adapted layers, concatenated in ``adapted_names`` order) and
        ``labels`` when given.
        """
        from tqdm.auto import tqdm

        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        embeddings = torch.zeros(len(texts), self.head.in_features)
        features = torch.zeros(len(texts), self.feature_dim)
        self.eval()
        with torch.no_grad(), tqdm(total=len(texts), desc=desc or "LoRA features", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = torch.tensor(order[start : start + batch_size])
                batch = self.tokenize([texts[i] for i in rows.tolist()])
                ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                pooled, lora = self.forward_tokens(ids, mask)
                embeddings[rows], features[rows] = pooled.float().cpu(), lora.float().cpu()
                bar.update(len(rows))
            weight, bias = self.head.weight.detach().float().cpu(), self.head.bias.detach().float().cpu()
            logits = embeddings @ weight.T + bias
        head = (weight.clone(), bias.clone())
        return ModelOutputs(logits=logits, features=embeddings, labels=labels, layers={LAYER: features}, head=head)

    @property
    def feature_dim(self) -> int:
        """Size of ``layers[LAYER]``: the summed output sizes of the adapted layers."""
        return sum(self.feature_sizes)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changes: the adapters' ``A`` and ``B`` and the head (what the cache stores)."""
        state = {f"model.{name}": p.detach() for name, p in self.model.named_parameters() if "lora_" in name}
        state.update({f"head.{name}": p.detach() for name, p in self.head.named_parameters()})
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trained_state`'s tensors; every one must be present with its shape."""
        own = self.trained_state()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError("the stored LoRA state does not match this classifier (other settings or base model)")
        with torch.no_grad():
            for name, parameter in [*self.model.named_parameters(prefix="model"), *self.head.named_parameters("head")]:
                if name in state:
                    parameter.copy_(state[name])

    @property
    def identity(self) -> str:
        """sha256 over the base encoder's identity, the settings and the trained tensors (keys output caches)."""
        digest = hashlib.sha256(
            json.dumps(
                {"version": LORA_VERSION, "base": self.base_identity, "settings": asdict(self.settings)}
            ).encode()
        )
        for name, tensor in sorted(self.trained_state().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    stack = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(
            f"top_layers needs a BERT-style model whose transformer layers are model.encoder.layer; "
            f"{type(model).__name__} has none: pass top_layers=None to adapt every layer"
        )
    return stack


# ---------------------------------------------------------------------------------------------- training
def _check_data(
    texts: Sequence[str], labels: Any, paraphrases: Sequence[str] | None, settings: LoraSettings
) -> tuple[list[str], torch.Tensor, list[str] | None]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a list of strings, got one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(texts),) or labels.is_floating_point():
        raise ValueError(
            f"labels must be {len(texts)} integers (one per text), got {labels.dtype} {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= settings.num_classes:
        raise ValueError(
            f"labels must lie in [0, {settings.num_classes - 1}]; OOD rows (label < 0) do not belong in training data"
        )
    if settings.paraphrase_weight > 0 and paraphrases is None:
        raise ValueError("paraphrase_weight > 0 needs one paraphrase per text (paraphrases=[...]); or set it to 0")
    if paraphrases is not None:
        paraphrases = list(paraphrases)
        if len(paraphrases) != len(texts) or not all(isinstance(t, str) for t in paraphrases):
            raise ValueError(f"paraphrases must be {len(texts)} strings, one per text, got {len(paraphrases)}")
        if settings.paraphrase_weight == 0:
            paraphrases = None  # the regulariser is off: they would only cost time
    return texts, labels.to(torch.int64), paraphrases


def train_lora_classifier(
    encoder: HuggingFaceEncoder,
    texts: Sequence[str],
    labels: Any,
    settings: LoraSettings,
    paraphrases: Sequence[str] | None = None,
    progress: bool = False,
) -> LoraClassifier:
    """Fine-tune LoRA adapters and a linear head on ``(texts, labels)``: seeded, one thread, AdamW, no dropout.

    Loss per batch: mean cross-entropy of ``head(mean-pooled last hidden state)``, plus, when
    ``settings.paraphrase_weight > 0``, LoRA-BAM's paraphrase regulariser ``lambda * mean_b ||phi(q_b) -
    phi(p_b)||^2`` with ``p_b`` the paraphrase of ``q_b`` and ``phi`` the pooled outputs of the adapted layers (the
    features the monitor reads). Batches are runs of texts of similar token length (little padding), visited in a
    seeded random order each epoch. Dropout stays off (the model is in eval mode while its adapters train), so the
    two views of a text differ only by their words. With ``settings.top_layers``, the frozen layers below the
    adapters run once per text before training; a check on a few texts first makes sure that running the layers in
    two parts gives what the whole model gives.

    Returns the classifier in eval mode; ``meta`` holds ``train_seconds`` and the last epoch's mean losses.
    """
    from tqdm.auto import tqdm

    from oodguard.detectors.trained import seeded

    texts, labels, paraphrases = _check_data(texts, labels, paraphrases, settings)
    started = time.perf_counter()
    with seeded(settings.seed):
        classifier = LoraClassifier(encoder, settings).eval()
        views = [_tokens(classifier, texts)] + ([] if paraphrases is None else [_tokens(classifier, paraphrases)])
        states: list[list[torch.Tensor] | None] = [None] * len(views)
        if settings.top_layers is not None:
            states = list(_states_below(classifier, views))
        lengths = [len(ids) for ids in views[0]]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        trainable = [p for p in classifier.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(settings.seed)
        targets = labels.to(classifier.device)
        losses = {"cross_entropy": 0.0, "paraphrase": 0.0}
        with tqdm(total=settings.epochs * len(batches), desc="LoRA fine-tuning", disable=not progress) as bar:
            for _ in range(settings.epochs):
                losses = dict.fromkeys(losses, 0.0)
                for index in torch.randperm(len(batches), generator=generator).tolist():
                    rows = batches[index]
                    pooled, features = _forward_rows(classifier, views[0], states[0], rows)
                    loss = nn.functional.cross_entropy(classifier.head(pooled), targets[rows])
                    losses["cross_entropy"] += float(loss.detach()) / len(batches)
                    if paraphrases is not None:
                        _, paraphrased = _forward_rows(classifier, views[1], states[1], rows)
                        penalty = (features - paraphrased).square().sum(1).mean()
                        losses["paraphrase"] += float(penalty.detach()) / len(batches)
                        loss = loss + settings.paraphrase_weight * penalty
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    bar.update(1)
    classifier.meta.update(train_seconds=time.perf_counter() - started, final_loss=losses, from_cache=False)
    return classifier


def _tokens(classifier: LoraClassifier, texts: list[str]) -> list[torch.Tensor]:
    """Token ids of each text, unpadded (truncated at ``max_length``)."""
    batch = classifier.tokenize(texts)
    return [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def _padded(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T, ...]`` with zeros, and the mask ``[B, T]`` of real positions."""
    width = max(len(row) for row in rows)
    padded = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)], mask[i, : len(row)] = row, 1
    return padded.to(device), mask.to(device)


def _states_below(classifier: LoraClassifier, views: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per view and text, the frozen hidden states ``[T_i, H]`` entering the first adapted layer."""
    result: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for view in views:
            states: list[torch.Tensor] = [torch.empty(0)] * len(view)
            order = sorted(range(len(view)), key=lambda i: len(view[i]))
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                ids, mask = _padded([view[i] for i in rows], classifier.device)
                hidden = classifier.states_below(ids, mask)
                for j, i in enumerate(rows):
                    states[i] = hidden[j, : len(view[i])]
            result.append(states)
        # The layers are called directly (BERT-style): the two parts must give what the whole model gives.
        sample = list(range(min(4, len(views[0]))))
        ids, mask = _padded([views[0][i] for i in sample], classifier.device)
        whole = classifier.forward_tokens(ids, mask)
        parts = classifier.forward_states(_padded([result[0][i] for i in sample], classifier.device)[0], mask)
    if not all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(whole, parts, strict=True)):
        raise ValueError(
            "running this model's layers from cached states does not reproduce the whole model (its layers take other "
            "arguments); pass top_layers=None to adapt every layer"
        )
    return result


def _forward_rows(
    classifier: LoraClassifier, view: list[torch.Tensor], states: list[torch.Tensor] | None, rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    if states is not None:
        hidden, mask = _padded([states[i] for i in rows], classifier.device)
        return classifier.forward_states(hidden, mask)
    ids, mask = _padded([view[i] for i in rows], classifier.device)
    return classifier.forward_tokens(ids, mask)


# ---------------------------------------------------------------------------------------------- caches
def training_key(
    encoder: HuggingFaceEncoder,
    texts: Sequence[str],
    labels: Any,
    settings: LoraSettings,
    paraphrases: Sequence[str] | None = None,
) -> str:
    """sha256 over the version, the settings, the base encoder's identity and the exact training data (hex, 16)."""
    texts, labels, paraphrases = _check_data(texts, labels, paraphrases, settings)
    digest = hashlib.sha256()
    head = {"version": LORA_VERSION, "settings": asdict(settings), "encoder": encoder.identity}
    for part in (head, texts, labels.tolist(), paraphrases):
        digest.update(json.dumps(part, ensure_ascii=False).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_or_train_lora_classifier(
    encoder: HuggingFaceEncoder,
    texts: Sequence[str],
    labels: Any,
    settings: LoraSettings,
    paraphrases: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> LoraClassifier:
    """:func:`train_lora_classifier`, cached: the adapters and head are stored as safetensors in ``cache_dir`` under
    :func:`training_key` (a damaged or foreign file is retrained and replaced; the write is atomic). ``meta`` says
    whether the classifier came from the cache and how long its training took."""
    if cache_dir is None:
        return train_lora_classifier(encoder, texts, labels, settings, paraphrases, progress=progress)
    key = training_key(encoder, texts, labels, settings, paraphrases)
    path = Path(cache_dir).expanduser() / f"{LORA_VERSION}-{key}.safetensors"
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None:
        from oodguard.detectors.trained import seeded

        with seeded(settings.seed):
            classifier = LoraClassifier(encoder, settings)
        try:
            classifier.load_trained_state(cached[0])
        except ValueError:
            pass  # another layout under the same key (cannot happen unless edited): retrain and overwrite it below
        else:
            classifier.meta.update(cached[1].get("meta", {}), from_cache=True)
            return classifier.eval()
    classifier = train_lora_classifier(encoder, texts, labels, settings, paraphrases, progress=progress)
    header = {"version": LORA_VERSION, "settings": asdict(settings), "encoder": encoder.identity,
              "meta": {k: v for k, v in classifier.meta.items() if k != "from_cache"}}  # fmt: skip
    persist.save_cache(path, classifier.trained_state(), kind=CACHE_KIND, version=1, header=header)
    return classifier


def lora_outputs(
    classifier: LoraClassifier,
    texts: Sequence[str],
    labels: Any = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    desc: str = "",
) -> ModelOutputs:
    """:meth:`LoraClassifier.outputs`, cached as an outputs file in ``cache_dir`` under a key of the classifier's
    identity (base encoder, settings, trained tensors) and the exact texts; labels are attached after loading."""
    texts = list(texts)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"oodguard-lora-outputs-1\n{classifier.identity}\n".encode())
        digest.update(json.dumps(texts, ensure_ascii=False).encode())
        path = Path(cache_dir).expanduser() / f"outputs-{digest.hexdigest()[:32]}.safetensors"
        try:
            cached = ModelOutputs.load(path)
        except (OSError, ValueError):
            cached = None  # missing, damaged or foreign: recompute and replace
        if cached is not None and len(cached) == len(texts) and cached.layers.get(LAYER) is not None:
            return _with_labels(cached, labels)
    outputs = classifier.outputs(texts, progress=progress, desc=desc)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            outputs.save(path)
        except OSError:
            pass  # an unwritable cache only costs recomputing next time
    return _with_labels(outputs, labels)


def _with_labels(outputs: ModelOutputs, labels: Any) -> ModelOutputs:
    return outputs if labels is None else outputs.with_fields(labels=labels)
