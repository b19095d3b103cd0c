"""The auxiliary outlier pool of the digits benchmark: shape, determinism, and disjointness from the test sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodguard.benchmark import digits_data
from oodguard.benchmark.digits_outliers import EXCLUDED, _to_unit, load_sources, outlier_pool


def thumbnail(image: np.ndarray) -> np.ndarray:
    """32x32 zero-mean unit-norm thumbnail: equal thumbnails (correlation ~1) mean the same picture."""
    small = F.interpolate(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], size=(32, 32),
                          mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy().ravel()  # fmt: skip
    small = small - small.mean()
    return small / max(np.linalg.norm(small), 1e-12)


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(thumbnail(a) @ thumbnail(b)) > 0.98


@pytest.fixture(scope="module")
def sources():
    return load_sources()


@pytest.fixture(scope="module")
def test_sources():
    photos = digits_data.load_photos()
    return photos


def test_pool_shape_range_and_determinism():
    pool = outlier_pool(40, seed=0)
    assert pool.shape == (40, 1, 28, 28) and pool.dtype == torch.float32
    assert float(pool.min()) >= 0.0 and float(pool.max()) <= 1.0
    assert torch.equal(pool, outlier_pool(40, seed=0))
    assert not torch.equal(pool, outlier_pool(40, seed=1))
    # odd rows are edge maps: each reaches 1 at its strongest edge unless the crop is flat
    edges = pool[1::2].amax(dim=(1, 2, 3))
    assert bool(((edges == 1.0) | (edges == 0.0)).all())
    with pytest.raises(ValueError, match="count"):
        outlier_pool(0)


def test_no_pool_source_is_a_test_source(sources, test_sources):
    clashes = [(p, t) for p, a in sources.items() for t, b in test_sources.items() if same_picture(a, b)]
    assert clashes == []


def test_the_check_would_catch_a_test_image_in_the_pool(test_sources):
    import skimage.data

    # positive control: skimage's cat is the chelsea test photo, so the pool must leave it out
    assert "cat" in EXCLUDED
    assert same_picture(_to_unit(skimage.data.cat()), test_sources["chelsea"])


def test_pool_sources_are_whole_images_in_unit_range(sources):
    assert len(sources) == 16
    for name, image in sources.items():
        assert image.ndim == 2 and min(image.shape) >= 100, name  # whole pictures, not 25x25 LFW crops or glyphs
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.01, name
