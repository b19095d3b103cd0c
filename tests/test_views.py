"""Tests for oodguard.views: ImageNet-C corruptions in torch, views and view datasets."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from oodguard.extract import extract
from oodguard.views import (
    CORRUPTIONS,
    RECOMMENDED_CORRUPTIONS,
    SEVERITIES,
    View,
    ViewDataset,
    all_views,
    corrupt,
    recommended_views,
)

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "fog", "snow")
RANDOM += ("elastic_transform",)


def _picture(channels: int, h: int, w: int) -> torch.Tensor:
    """A smooth image with two flat patches (edges), values in [0.1, 0.9]."""
    ys = torch.linspace(0, 1, h)[:, None]
    xs = torch.linspace(0, 1, w)[None, :]
    x = torch.stack([0.5 + 0.3 * torch.sin(6 * xs + 3 * ys + k) for k in range(channels)])[None].clone()
    x[..., h // 4 : h // 2, w // 4 : w // 2] = 0.9
    x[:, 0, h // 2 : 3 * h // 4, w // 2 : 3 * w // 4] = 0.1
    return x


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    return torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_determinism(name, rgb):
    gray = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for images in (rgb, gray):
        for severity in (1, 5):
            out = corrupt(images, name, severity, seed=3)
            assert out.shape == images.shape and out.dtype == images.dtype
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            assert torch.equal(out, corrupt(images, name, severity, seed=3))
    assert corrupt(rgb.double(), name, 2).dtype == torch.float64


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_depend_on_the_seed(name):
    images = _picture(3, 64, 64)
    a = corrupt(images, name, 5, seed=0, pixel_scale=1.0)
    b = corrupt(images, name, 5, seed=1, pixel_scale=1.0)
    assert not torch.equal(a, b)


def test_rows_of_a_batch_get_their_own_noise():
    images = _picture(1, 16, 16).expand(2, 1, 16, 16)
    out = corrupt(images, "gaussian_noise", 3, seed=0)
    assert not torch.equal(out[0], out[1])


MONOTONE = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "contrast",
    "brightness",
    "jpeg_compression",
)


@pytest.mark.parametrize("name", MONOTONE)
def test_change_grows_with_severity(name):
    # Not tested: saturate (severities 1-2 desaturate, 3-5 oversaturate), elastic_transform (1-2 are a large
    # smooth warp, 3-5 small local ones), fog/snow/glass_blur/pixelate (the official tables change several
    # parameters at once, or block alignment, so the mean change is not monotone on every image).
    images = _picture(3, 64, 64)
    change = [float((corrupt(images, name, s, seed=0, pixel_scale=1.0) - images).abs().mean()) for s in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_identity_view_is_exact(rgb):
    view = View("identity")
    assert view(rgb) is rgb
    assert view.key == "identity"


def test_brightness_known_answer():
    images = torch.tensor([[0.2, 0.5, 0.0], [0.4, 0.5, 0.0], [0.6, 0.5, 0.95]]).view(1, 3, 1, 3)
    for severity, c in zip(SEVERITIES, (0.1, 0.2, 0.3, 0.4, 0.5), strict=True):
        expected = torch.empty_like(images)
        for j in range(3):
            pixel = images[0, :, 0, j].tolist()
            value = max(pixel)
            new_value = min(value + c, 1.0)
            # same hue and saturation: every channel scales with the value; black becomes gray at c
            expected[0, :, 0, j] = torch.tensor([p * new_value / value if value > 0 else new_value for p in pixel])
        torch.testing.assert_close(corrupt(images, "brightness", severity), expected, atol=1e-6, rtol=0)
    gray = torch.tensor([0.0, 0.3, 0.8]).view(1, 1, 1, 3)
    torch.testing.assert_close(corrupt(gray, "brightness", 3), torch.tensor([0.3, 0.6, 1.0]).view(1, 1, 1, 3))


def test_saturate_known_answer_against_colorsys():
    images = torch.rand(1, 3, 3, 4, generator=torch.Generator().manual_seed(5)).double()
    for severity, (factor, offset) in zip(SEVERITIES, ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)), strict=True):
        expected = torch.empty_like(images)
        for i in range(3):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*images[0, :, i, j].tolist())
                expected[0, :, i, j] = torch.tensor(
                    colorsys.hsv_to_rgb(h, min(max(s * factor + offset, 0), 1), v), dtype=torch.float64
                )
        torch.testing.assert_close(corrupt(images, "saturate", severity), expected, atol=1e-9, rtol=0)
    gray = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrupt(gray, "saturate", 5), gray)  # documented: identity on gray images


def test_contrast_known_answer(rgb):
    for severity, c in zip(SEVERITIES, (0.4, 0.3, 0.2, 0.1, 0.05), strict=True):
        out = corrupt(rgb, "contrast", severity)
        for n in range(rgb.shape[0]):
            for ch in range(3):
                mean = rgb[n, ch].sum() / rgb[n, ch].numel()
                expected = ((rgb[n, ch] - mean) * c + mean).clamp(0, 1)
                torch.testing.assert_close(out[n, ch], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("severity, sigma", [(1, 1.0), (2, 2.0), (3, 3.0)])
def test_gaussian_blur_of_a_delta_is_the_normalised_kernel(severity, sigma):
    size = 41
    delta = torch.zeros(1, 1, size, size)
    delta[0, 0, size // 2, size // 2] = 1.0
    out = corrupt(delta, "gaussian_blur", severity, pixel_scale=1.0)
    radius = int(4 * sigma + 0.5)
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(taps)
    expected = torch.zeros(size, size)
    for a, ta in enumerate(taps):
        for b, tb in enumerate(taps):
            expected[size // 2 - radius + a, size // 2 - radius + b] = ta * tb / total**2
    torch.testing.assert_close(out[0, 0], expected, atol=1e-7, rtol=0)


def test_gaussian_blur_scales_with_image_size():
    # at 448 pixels the severity-1 sigma is 2 px (1 px at 224); pixel_scale=2 gives the same
    delta = torch.zeros(1, 1, 448, 448)
    delta[0, 0, 224, 224] = 1.0
    torch.testing.assert_close(
        corrupt(delta, "gaussian_blur", 1), corrupt(delta, "gaussian_blur", 1, pixel_scale=2.0), atol=0, rtol=0
    )
    # and a 28-pixel image is blurred with sigma 1/8 px: almost nothing moves
    small = torch.zeros(1, 1, 28, 28)
    small[0, 0, 14, 14] = 1.0
    assert float(corrupt(small, "gaussian_blur", 1)[0, 0, 14, 14]) > 0.999


def test_pixelate_to_one_block_is_the_channel_mean():
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = corrupt(images, "pixelate", 5)  # int(4 * 0.25) = 1: one box
    expected = images.mean((2, 3), keepdim=True).expand_as(images)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_defocus_kernel_preserves_a_constant_image():
    images = torch.full((1, 3, 30, 30), 0.4)
    for name in ("defocus_blur", "gaussian_blur", "motion_blur", "zoom_blur", "glass_blur", "pixelate"):
        torch.testing.assert_close(corrupt(images, name, 4, pixel_scale=1.0), images, atol=1e-6, rtol=0)


def test_unknown_corruption_lists_the_available_ones(rgb):
    with pytest.raises(ValueError, match="available: .*gaussian_noise.*brightness"):
        corrupt(rgb, "frost", 1)
    with pytest.raises(ValueError, match="unknown corruption 'blurr'"):
        View("x", "blurr", 1)


@pytest.mark.parametrize("severity", [0, 6, 2.0, True, "3", None])
def test_bad_severity(rgb, severity):
    with pytest.raises(ValueError, match="severity"):
        corrupt(rgb, "fog", severity)


def test_bad_images():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        corrupt(torch.rand(3, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="float"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(torch.full((1, 3, 8, 8), 2.0), "fog", 1)
    with pytest.raises(ValueError, match="channels"):
        corrupt(torch.rand(1, 2, 8, 8), "brightness", 1)
    with pytest.raises(ValueError, match="seed"):
        corrupt(torch.rand(1, 3, 8, 8), "fog", 1, seed=-1)
    with pytest.raises(ValueError, match="pixel_scale"):
        corrupt(torch.rand(1, 3, 8, 8), "fog", 1, pixel_scale=0)
    with pytest.raises(ValueError, match="identity"):
        View("identity", None, 2)


def test_view_sets_and_keys():
    views = recommended_views(seed=4)
    assert len(views) == 13
    assert views[0].corruption is None
    assert {v.corruption for v in views[1:]} == set(RECOMMENDED_CORRUPTIONS)
    assert {v.severity for v in views[1:]} == {1, 2}
    keys = [v.key for v in views]
    assert len(set(keys)) == 13 and keys[1] == "brightness-s1-seed4"
    everything = all_views()
    assert len(everything) == 1 + 5 * len(CORRUPTIONS)
    assert View("a", "fog", 2, pixel_scale=1.0).key == "fog-s2-seed0-px1.0"
    assert View("a", "fog", 2).key == View("b", "fog", 2).key  # the name is a label, not content


def test_view_dataset_matches_the_view_and_is_batch_invariant():
    images = torch.rand(10, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10)
    view = View("noise", "gaussian_noise", 2, seed=9)
    small = ViewDataset((images, labels), view)
    batch = small.__getitems__(list(range(10)))
    assert torch.equal(torch.stack([b[0] for b in batch]), view(images))
    assert [int(b[1]) for b in batch] == list(range(10))
    chunked = ViewDataset((images, labels), view, chunk_rows=4)
    rows = torch.stack([chunked[i][0] for i in (7, 2, 9, 0, 5)])
    together = torch.stack([item[0] for item in chunked.__getitems__([7, 2, 9, 0, 5])])
    assert torch.equal(rows, together)
    assert torch.equal(chunked[1][0], view(images[:4])[1])  # chunk 0 uses the view's own seed
    assert not torch.equal(chunked[5][0], view(images[4:8])[1])  # later chunks get derived seeds


def test_view_dataset_feeds_extract():
    from oodguard.benchmark.digits_model import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(num_classes=10).eval()
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = np.arange(6) % 3
    view = View("fog-1", "fog", 1, seed=1)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return images[i], int(labels[i])

    for data in ((images, labels), Pairs()):
        for batch_size in (4, 6):
            outputs = extract(model, ViewDataset(data, view), batch_size=batch_size, progress=False)
            with torch.no_grad():
                expected = model(view(images))
            torch.testing.assert_close(outputs.logits, expected, atol=1e-5, rtol=1e-5)
            assert outputs.labels.tolist() == labels.tolist()


def test_view_dataset_bad_input():
    with pytest.raises(ValueError, match="view"):
        ViewDataset(torch.rand(2, 1, 4, 4), "fog")
    with pytest.raises(ValueError, match="one label per image"):
        ViewDataset((torch.rand(2, 1, 4, 4), [0]), View("identity"))
    with pytest.raises(ValueError, match="data"):
        ViewDataset("images", View("identity"))
