"""Dual-encoder helpers: the open_clip adapter, prompt-ensemble class embeddings and NegLabel's NegMining."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from oodguard.encoders import dual as zeroshot
from oodguard.encoders.dual import (
    DualEncoder,
    OpenClipEncoder,
    check_embeddings,
    class_embeddings,
    mine_negative_labels,
)


class FakeClip(torch.nn.Module):
    """A tiny open_clip-like model: images are flattened and projected; texts are mean token embeddings."""

    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.visual = torch.nn.Linear(12, dim)
        self.tokens = torch.nn.Embedding(128, dim)
        with torch.no_grad():
            self.visual.weight.copy_(torch.randn(dim, 12, generator=generator))
            self.tokens.weight.copy_(torch.randn(128, dim, generator=generator))
        self.batches: list[int] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        return 3.0 * self.visual(images.flatten(1))  # not normalised: the adapter must normalise

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(tokens))
        return 2.0 * self.tokens(tokens).mean(dim=1)


def tokenize(texts: list[str]) -> torch.Tensor:
    width = 16
    return torch.tensor([[ord(ch) % 128 for ch in text[:width]] + [0] * (width - len(text[:width])) for text in texts])


class TableEncoder:
    """A text encoder with fixed embeddings per prompt (for known answers)."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts], dtype=torch.float32), dim=1)

    def encode_inputs(self, inputs):
        return self.encode_texts(inputs)


def test_doctests():
    failures, attempted = doctest.testmod(zeroshot)
    assert attempted > 0 and failures == 0


# ---------------------------------------------------------------------- check_embeddings
def test_check_embeddings_normalises_and_converts():
    out = check_embeddings(np.array([[3.0, 4.0], [0.0, -2.0]]), "x")
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([[1.0, 0.0]], TypeError, "tensor or numpy"),
        (torch.ones(3), ValueError, "2-D"),
        (torch.ones(0, 3), ValueError, "empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
        (torch.tensor([[1.0, 1.0], [0.0, 0.0]]), ValueError, "all-zero row"),
        (torch.ones(2, 3, dtype=torch.bool), TypeError, "real numbers"),
    ],
)
def test_check_embeddings_refuses_bad_input(value, error, match):
    with pytest.raises(error, match=match):
        check_embeddings(value, "label_embeddings")


def test_check_embeddings_names_the_width_mismatch():
    with pytest.raises(ValueError, match="negatives has D=3 columns but D=4"):
        check_embeddings(torch.ones(2, 3), "negatives", dim=4)


# ---------------------------------------------------------------------- OpenClipEncoder
def test_open_clip_encoder_batches_normalises_and_keeps_order():
    model = FakeClip()
    encoder = OpenClipEncoder(model.train(), tokenize, batch_size=3, progress=False)
    assert isinstance(encoder, DualEncoder) and not model.training
    images = torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    features = encoder.encode_inputs(images)
    assert model.batches == [3, 3, 1]
    assert features.shape == (7, 5) and features.dtype == torch.float32
    expected = torch.nn.functional.normalize(model.visual(images.flatten(1)), dim=1)
    torch.testing.assert_close(features, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder.encode_inputs(list(images)), features)  # a list of images works too
    texts = ["a cat", "a dog", "a photo of a car", "x"]
    out = encoder.encode_texts(texts)
    one_by_one = torch.cat([encoder.encode_texts([t]) for t in texts])
    torch.testing.assert_close(out, one_by_one)
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1), torch.ones(4))


def test_open_clip_encoder_refuses_bad_use():
    with pytest.raises(TypeError, match="encode_image"):
        OpenClipEncoder(torch.nn.Linear(2, 2), tokenize)
    with pytest.raises(ValueError, match="batch_size"):
        OpenClipEncoder(FakeClip(), tokenize, batch_size=0)
    encoder = OpenClipEncoder(FakeClip(), tokenize, progress=False)
    with pytest.raises(TypeError, match="single string"):
        encoder.encode_texts("a cat")
    with pytest.raises(ValueError, match="empty"):
        encoder.encode_texts([])
    with pytest.raises(ValueError, match="empty"):
        encoder.encode_inputs(torch.zeros(0, 3, 2, 2))

    class Broken(FakeClip):
        def encode_text(self, tokens):
            return super().encode_text(tokens)[:1]

    with pytest.raises(ValueError, match="one embedding row per item"):
        OpenClipEncoder(Broken(), tokenize, progress=False).encode_texts(["a", "b"])


# ---------------------------------------------------------------------- class_embeddings
def test_class_embeddings_is_the_renormalised_mean_of_normalised_prompt_encodings():
    table = {"a cat": [2.0, 0.0, 0.0], "the cat": [0.0, 5.0, 0.0], "a dog": [0.0, 0.0, 1.0], "the dog": [0.0, 0.0, 3.0]}
    encoder = TableEncoder(table)
    out = class_embeddings(encoder, ["cat", "dog"], templates=("a {}", "the {}"))
    # cat: mean of (1,0,0) and (0,1,0) = (.5,.5,0), renormalised; dog: (0,0,1)
    np.testing.assert_allclose(out.numpy(), [[2**-0.5, 2**-0.5, 0.0], [0.0, 0.0, 1.0]], rtol=1e-6)
    assert encoder.calls == [["a cat", "the cat", "a dog", "the dog"]]  # one call, class-major order


def test_class_embeddings_refuses_bad_templates_and_cancelling_prompts():
    encoder = TableEncoder({"a x": [1.0, 0.0], "not a x": [-1.0, 0.0]})
    with pytest.raises(ValueError, match="needs a"):
        class_embeddings(encoder, ["x"], templates=("a photo",))
    with pytest.raises(ValueError, match="all-zero"):
        class_embeddings(encoder, ["x"], templates=("a {}", "not a {}"))
    with pytest.raises(TypeError, match="single string"):
        class_embeddings(encoder, "x")


# ---------------------------------------------------------------------- mine_negative_labels
def reference_mining(labels, candidates, fraction, percentile, kinds):
    """Independent numpy version of the official selection (multi_modal.py)."""
    labels = labels / np.linalg.norm(labels, axis=1, keepdims=True)
    candidates = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    distance = np.quantile(candidates @ labels.T, percentile, axis=1)  # linear interpolation
    chosen = []
    for kind in dict.fromkeys(kinds):  # kinds in order of first appearance
        members = np.flatnonzero(np.asarray(kinds) == kind)
        order = members[np.argsort(distance[members], kind="stable")]
        chosen.extend(order[: int(len(members) * fraction)])
    return np.array(chosen)


def test_mining_uses_the_percentile_not_the_maximum():
    labels = torch.eye(4)[:3]  # similarities to the labels = the first three coordinates of unit rows

    def unit(*sims):
        return [*sims, (1 - sum(x * x for x in sims)) ** 0.5]

    near_two = unit(0.0, 0.7, 0.7)  # sorted sims (0, .7, .7): 95th percentile .7, maximum .7
    near_one = unit(0.0, 0.0, 0.75)  # sorted sims (0, 0, .75): 95th percentile .9 * .75 = .675, maximum .75
    close = unit(0.05, 0.72, 0.69)  # 95th percentile .69 + .9 * .03 = .717, maximum .72
    candidates = torch.tensor([near_two, near_one, close])
    assert mine_negative_labels(labels, candidates, fraction=0.34, percentile=0.95).tolist() == [1]
    assert mine_negative_labels(labels, candidates, fraction=0.34, percentile=1.0).tolist() == [0]
    assert mine_negative_labels(labels, candidates, fraction=1.0).tolist() == [1, 0, 2]


def test_mining_selects_per_kind_like_the_official_code():
    rng = np.random.default_rng(3)
    labels = rng.normal(size=(5, 8))
    candidates = rng.normal(size=(37, 8))
    kinds = ["adj" if i % 3 == 0 else "noun" for i in range(1, 38)]  # nouns appear first
    got = mine_negative_labels(labels, candidates, fraction=0.15, percentile=0.95, kinds=kinds).numpy()
    expected = reference_mining(labels, candidates, 0.15, 0.95, kinds)
    np.testing.assert_array_equal(got, expected)
    nouns, adjectives = kinds.count("noun"), kinds.count("adj")
    assert len(got) == int(nouns * 0.15) + int(adjectives * 0.15)  # floored per kind: 3 + 1
    assert all(kinds[i] == "noun" for i in got[: int(nouns * 0.15)])
    # without kinds: one selection over the whole corpus
    whole = mine_negative_labels(labels, candidates, fraction=0.3).numpy()
    np.testing.assert_array_equal(whole, reference_mining(labels, candidates, 0.3, 0.95, ["w"] * 37))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"percentile": 95}, "pass 0.95"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"kinds": ["noun"]}, "one kind per candidate"),
        ({"fraction": 0.1}, "selects none"),
    ],
)
def test_mining_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mine_negative_labels(torch.eye(3)[:2], torch.eye(3), **kwargs)


def test_mining_accepts_numpy_scalars_as_python_numbers():
    rng = np.random.default_rng(4)
    labels, candidates = rng.normal(size=(3, 6)), rng.normal(size=(40, 6))
    expected = mine_negative_labels(labels, candidates, fraction=0.25, percentile=0.5).tolist()
    for fraction, percentile in [(np.float32(0.25), np.float32(0.5)), (np.float64(0.25), np.float16(0.5))]:
        got = mine_negative_labels(labels, candidates, fraction=fraction, percentile=percentile)
        assert got.tolist() == expected
    assert mine_negative_labels(labels, candidates, fraction=np.int64(1)).tolist() == (
        mine_negative_labels(labels, candidates, fraction=1).tolist()
    )
    # numpy scalars out of range get the same messages as Python numbers
    with pytest.raises(ValueError, match="pass 0.95"):
        mine_negative_labels(labels, candidates, percentile=np.float32(95))
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        mine_negative_labels(labels, candidates, fraction=np.bool_(True))


def test_mining_refuses_mismatched_widths():
    with pytest.raises(ValueError, match="candidate_embeddings has D=4"):
        mine_negative_labels(torch.eye(3), torch.ones(2, 4))
