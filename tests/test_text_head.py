"""The linear head on embeddings: same optimum as scikit-learn's logistic regression, found by extract, cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.extraction.extract import extract, find_head
from oodguard.heads.text import LinearHead, load_or_train_head, train_linear_head


def blobs(n_per_class: int = 40, dim: int = 6, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    x = torch.cat([c + 0.8 * torch.randn(n_per_class, dim, generator=generator) for c in centres])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def test_same_optimum_as_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs()
    weight_decay = 0.05
    head = train_linear_head(x, y, weight_decay=weight_decay)
    # sklearn minimises 0.5 ||W||^2 + C * sum_i CE_i (intercept unpenalised): C = 1 / (weight_decay * N).
    reference = sklearn.LogisticRegression(C=1 / (weight_decay * len(x)), tol=1e-10, max_iter=10_000)
    reference.fit(x.numpy().astype(np.float64), y.numpy())
    with torch.no_grad():
        probabilities = torch.softmax(head(x), dim=1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(x.numpy().astype(np.float64)), atol=1e-4)


@pytest.mark.slow  # three trainings to convergence
def test_stronger_weight_decay_gives_smaller_weights_and_seed_does_not_matter():
    x, y = blobs()
    weak, strong = train_linear_head(x, y, weight_decay=1e-3), train_linear_head(x, y, weight_decay=1.0)
    assert strong.linear.weight.norm() < weak.linear.weight.norm()
    other_start = train_linear_head(x, y, weight_decay=1e-3, seed=5)
    torch.testing.assert_close(other_start.linear.weight, weak.linear.weight, atol=1e-3, rtol=0)  # convex: one optimum


def test_extract_finds_the_head_and_features_are_the_embeddings():
    x, y = blobs()
    head = train_linear_head(x, y)
    assert find_head(head)[0] == "linear"
    outputs = extract(head, x, labels=y, progress=False)
    torch.testing.assert_close(outputs.features, x)
    with torch.no_grad():
        torch.testing.assert_close(outputs.logits, head(x))
    torch.testing.assert_close(outputs.head[0], head.linear.weight.detach())
    torch.testing.assert_close(outputs.head[1], head.linear.bias.detach())


@pytest.mark.slow  # three trainings to convergence
def test_head_cache_reuses_and_retrains_on_new_data(tmp_path):
    x, y = blobs()
    first = load_or_train_head(x, y, 3, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    stamp = entry.stat().st_mtime_ns
    again = load_or_train_head(x, y, 3, cache_dir=tmp_path)
    assert entry.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.linear.weight, first.linear.weight)
    x2 = x.clone()
    x2[0, 0] += 1
    load_or_train_head(x2, y, 3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    entry.write_bytes(b"damaged")
    torch.testing.assert_close(load_or_train_head(x, y, 3, cache_dir=tmp_path).linear.weight, first.linear.weight)


def test_bad_input_is_refused():
    x, y = blobs()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        train_linear_head(x, y - 1, num_classes=3)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        train_linear_head(x[0], y[:1])
    with pytest.raises(ValueError, match="finite"):
        train_linear_head(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="weight_decay must be > 0"):
        train_linear_head(x, y, weight_decay=0)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        LinearHead(4, 1)
