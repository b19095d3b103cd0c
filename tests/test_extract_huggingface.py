"""Real architectures with random weights (nothing downloads): Hugging Face image and text classifiers through
extract, a guard and a detector, fed the way their users feed them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from oodguard import Guard
from oodguard.detectors import create
from oodguard.extraction import extract

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=4)  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_a_vision_transformer_gives_logits_features_and_head(vit):
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = extract(vit, images, batch_size=4, progress=False)  # returns an ImageClassifierOutput
    with torch.no_grad():
        expected = vit(images).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.features.shape == (10, 32) and out.head[0].shape == (4, 32)
    torch.testing.assert_close(out.features @ out.head[0].T + out.head[1], out.logits, rtol=1e-4, atol=1e-5)
    pooled = extract(vit, images, feature_layer="vit.layernorm", progress=False)  # tokens [B, T, D], averaged
    assert pooled.features.shape == (10, 32)
    assert pooled.head is None  # the classifier reads the [CLS] token, not the mean: it is no head of these features


def token_batches(n: int, seed: int, length: int = 12, batch_size: int = 4, vocab: int = 50):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[::2, length // 2 :] = 0  # padded rows, as a tokenizer gives them
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": int(i % 3)} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size), ids, mask


def test_a_text_classifier_fed_tokenised_dicts(bert):
    loader, ids, mask = token_batches(11, seed=2)
    out = extract(bert, loader, progress=False)  # dict batches: model(**batch), labels from the batch
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.labels.tolist() == [i % 3 for i in range(11)]
    assert out.features.shape == (11, 32)  # the pooled [CLS] state, input of the classifier
    whole = extract(bert, {"input_ids": ids, "attention_mask": mask}, batch_size=5, progress=False)  # one dict
    torch.testing.assert_close(whole.logits, out.logits, rtol=1e-5, atol=1e-5)


def test_a_cached_extraction_of_dict_batches_is_reused_and_keyed_by_content(bert, tmp_path):
    loader, ids, mask = token_batches(8, seed=3)
    first = extract(bert, loader, cache_dir=tmp_path, progress=False)
    again = extract(bert, token_batches(8, seed=3, batch_size=3)[0], cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(first.logits, again.logits)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1  # the batch size does not matter
    extract(bert, token_batches(8, seed=4)[0], cache_dir=tmp_path, progress=False)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2  # other tokens: another entry


def test_detectors_and_a_guard_on_a_text_classifier(bert):
    fit, _, _ = token_batches(40, seed=5)
    calibration, _, _ = token_batches(40, seed=6)
    outputs = extract(bert, fit, progress=False)
    knn = create("knn", k=3).fit(outputs)
    assert np.isfinite(knn.score(extract(bert, calibration, progress=False))).all()
    guard = Guard(bert, detector="energy").fit(fit).calibrate(calibration, tpr=0.9)
    result = guard.guard(token_batches(6, seed=7)[0])
    assert len(result) == 6 and np.isfinite(result.score).all()


def char_tokenizer(texts, padding=True, truncation=True, return_tensors="pt", length=8):
    """A stand-in for a CLIP tokenizer (the real one's vocabulary would need a download): ids of characters."""
    ids = torch.zeros(len(texts), length, dtype=torch.int64)
    mask = torch.zeros(len(texts), length, dtype=torch.int64)
    for row, text in enumerate(texts):
        codes = [1 + ord(c) % 60 for c in text][: length - 1] + [63]  # the last id ends the text, as CLIP's eos
        ids[row, : len(codes)], mask[row, : len(codes)] = torch.tensor(codes), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_a_hugging_face_clip_model_is_a_zero_shot_dual_encoder():
    from oodguard.encoders.dual import HuggingFaceClipEncoder, OpenClipEncoder, class_embeddings

    config = transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 16, "eos_token_id": 63},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64},
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with pytest.raises(TypeError, match="use HuggingFaceClipEncoder"):
        OpenClipEncoder(model, char_tokenizer)
    encoder = HuggingFaceClipEncoder(model, char_tokenizer, batch_size=3, progress=False)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = ["cat", "dog", "ship"]
    tokens = char_tokenizer(labels)
    with torch.no_grad():
        reference = model(pixel_values=images, **tokens)  # CLIP's own forward: normalised image and text embeddings
    torch.testing.assert_close(encoder.encode_inputs(images), reference.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.encode_texts(labels), reference.text_embeds, rtol=1e-5, atol=1e-5)
    label_embeddings = class_embeddings(encoder, labels, templates=["{}"])
    mcm = create("mcm", label_embeddings=label_embeddings)
    scores = mcm.score(encoder.encode_inputs(images))  # a plain embedding tensor is what mcm reads
    assert scores.shape == (5,) and np.isfinite(np.asarray(scores)).all()
