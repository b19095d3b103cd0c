"""Tests for oodguard.views: ImageNet-C corruptions in torch, views and view datasets."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from oodguard.extraction.extract import extract
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
RANDOM += ("elastic_transform", "spatter")


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


# ------------------------------------------------------------------------------------------------ spatter
# Building blocks of the water branch, each against an independent computation; the generic tests above cover
# spatter's shape, range, determinism and seed dependence through CORRUPTIONS.
from oodguard.views import corruptions as _views  # noqa: E402  (private building blocks)


def _step_image(left: float, right: float, size: int = 16) -> torch.Tensor:
    image = torch.full((1, size, size), left, dtype=torch.float64)
    image[..., size // 2 :] = right
    return image


def test_canny_finds_a_step_on_its_dark_side():
    # Sobel |gx| is 4 * 200 on columns 7 and 8; OpenCV keeps the first of two equal maxima (m > left, m >= right)
    edges = _views._canny(_step_image(0, 200), 50, 150)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[..., 7] = True
    assert torch.equal(edges, expected)
    # the transposed step gives the transposed edge
    assert torch.equal(_views._canny(_step_image(0, 200).transpose(1, 2), 50, 150), expected.transpose(1, 2))


def test_canny_hysteresis_keeps_weak_edges_only_when_connected_to_strong_ones():
    weak_only = _step_image(0, 20)  # |gradient| 80: above low (50), below high (150)
    assert not _views._canny(weak_only, 50, 150).any()
    mixed = _step_image(0, 20)
    mixed[:, :4, 8:] = 200  # a strong top part, connected to the weak rest of the same edge
    edges = _views._canny(mixed, 50, 150)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)  # OpenCV 5.0's cv2.Canny(mixed, 50, 150) on this image
    expected[0, [0, 1, 2, *range(5, 16)], 7] = True
    expected[0, 3, 8:] = True  # the horizontal strong-to-weak step on the right
    expected[0, 4, 8] = True
    assert torch.equal(edges, expected)  # rows 9-15 are weak (|gradient| 80) and kept through the chain
    assert not _views._canny(mixed, 50, 1700).any()  # no strong pixel (|gx| + |gy| <= 1600): nothing survives


def _chamfer_brute_force(zeros: np.ndarray, cap: float) -> np.ndarray:
    # closed form of the 5 x 5 chamfer length (a=1, b=1.4, c=2.1969) of an offset, minimised over zero pixels
    points = np.argwhere(zeros)
    out = np.full(zeros.shape, cap)
    for i, j in np.ndindex(zeros.shape):
        for pi, pj in points:
            big, small = max(abs(i - pi), abs(j - pj)), min(abs(i - pi), abs(j - pj))
            if big >= 2 * small:
                length = 2.1969 * small + (big - 2 * small)
            else:
                length = 2.1969 * (big - small) + 1.4 * (2 * small - big)
            out[i, j] = min(out[i, j], length)
    return out


def test_chamfer_distance_known_answers_and_brute_force():
    from scipy.ndimage import distance_transform_edt

    single = torch.zeros(1, 9, 9, dtype=torch.bool)
    single[0, 4, 4] = True
    distance = _views._chamfer_distance(single, 20.0)[0]
    # OpenCV's DIST_L2 mask-5 values for offsets (0,1), (1,1), (1,2), (2,2), (3,4), (4,4)
    for (dy, dx), value in {(0, 1): 1.0, (1, 1): 1.4, (1, 2): 2.1969, (2, 2): 2.8, (3, 4): 4.9969}.items():
        assert float(distance[4 + dy, 4 + dx]) == pytest.approx(value, abs=1e-9)
    assert float(distance[0, 0]) == pytest.approx(5.6, abs=1e-9)
    zeros = np.random.default_rng(0).random((2, 13, 17)) < 0.04
    zeros[1] = False  # an image without zero pixels: everything at the cap, as after cv2's truncation
    ours = _views._chamfer_distance(torch.from_numpy(zeros), 6.0).numpy()
    np.testing.assert_allclose(ours[0], _chamfer_brute_force(zeros[0], 6.0), atol=1e-9)
    assert (ours[1] == 6.0).all()
    # and within the chamfer mask's known error (about 2 %) of the Euclidean distance
    euclid = np.minimum(distance_transform_edt(~zeros[0]), 6.0)
    assert np.all(np.abs(ours[0] - euclid) <= 0.025 * euclid + 1e-9)


def _equalize_hist_reference(image: np.ndarray) -> np.ndarray:
    # OpenCV's equalizeHist, written out per image with numpy float32 arithmetic
    hist = np.bincount(image.ravel(), minlength=256)
    lowest = int(np.flatnonzero(hist)[0])
    if hist[lowest] == image.size:
        return np.full_like(image, lowest)
    scale = np.float32(255.0) / np.float32(image.size - hist[lowest])
    lut = np.zeros(256, dtype=np.int64)
    total = 0
    for level in range(lowest + 1, 256):
        total += hist[level]
        lut[level] = min(255, int(np.rint(np.float32(total) * scale)))
    return lut[image]


def test_equalize_hist_matches_opencvs_formula():
    rng = np.random.default_rng(1)
    images = np.stack(
        [
            rng.integers(0, 21, (10, 12)),  # the water branch's range (0-20)
            rng.integers(40, 256, (10, 12)),
            np.full((10, 12), 7),  # a single level is kept
            np.where(rng.random((10, 12)) < 0.5, 3, 200),
        ]
    )
    ours = _views._equalize_hist(torch.from_numpy(images)).numpy()
    for image, result in zip(images, ours, strict=True):
        np.testing.assert_array_equal(result, _equalize_hist_reference(image))


def test_spatter_water_matches_opencv_on_a_constructed_liquid_layer():
    # numbers produced once with OpenCV 5.0 running the official water steps on this layer (intensity 0.6)
    ys, xs = np.mgrid[0:48, 0:48].astype(np.float64)
    liquid = 0.7 + 0.05 * np.sin(xs / 3.0) * np.cos(ys / 4.0)
    inside = ((ys - 16) ** 2 + (xs - 15) ** 2 <= 81) | ((ys - 31) ** 2 + (xs - 33) ** 2 <= 49) | ((ys > 36) & (xs < 10))
    liquid = torch.from_numpy(np.where(inside, liquid, 0.0))[None]
    m = _views._spatter_water(liquid, 0.6, 1.0)[0]
    assert int((m > 0).sum()) == 441
    assert float(m.sum()) == pytest.approx(101.76058959960938, abs=1e-4)
    opencv = {(16, 15): 0.40327689, (8, 15): 0.22994764, (16, 7): 0.21612567, (31, 33): 0.29436404}
    opencv |= {(40, 5): 0.28390515, (25, 25): 0.0, (10, 20): 0.07287958}
    for (i, j), value in opencv.items():
        assert float(m[i, j]) == pytest.approx(value, abs=1e-6)
    assert not _views._spatter_water(torch.zeros(1, 8, 8, dtype=torch.float64), 0.6, 1.0).any()  # no NaN


def test_spatter_mud_mask_on_a_constructed_liquid_layer():
    from scipy.ndimage import gaussian_filter

    liquid = torch.zeros(1, 30, 30, dtype=torch.float64)
    liquid[0, 8:20, 10:22] = 0.7
    liquid[0, 25, 25] = 0.7  # a single drop is blurred below 0.8 and dropped
    m = _views._mud_mask(liquid, 0.65, 1.5)[0].numpy()
    expected = gaussian_filter((liquid[0].numpy() > 0.65).astype(np.float64), 1.5, mode="nearest", truncate=4.0)
    expected[expected < 0.8] = 0
    np.testing.assert_allclose(m, expected, atol=1e-12)
    assert m[14, 16] == pytest.approx(1.0, abs=1e-3) and m[25, 25] == 0 and m[0, 0] == 0


@pytest.mark.parametrize("severity", [1, 4])
def test_spatter_adds_water_or_blends_mud_with_one_mask_for_all_channels(severity):
    images = _picture(3, 48, 48).double() * 0.5
    out = corrupt(images, "spatter", severity, seed=2, pixel_scale=1.0).double()
    x = images.double()
    if severity == 1:  # out = x + m * pale turquoise, m in [0, 0.6]
        colour = torch.tensor([175, 238, 238], dtype=torch.float64).view(1, 3, 1, 1) / 255
        m = (out - x) / colour
        assert float(m.max()) <= 0.6 + 1e-6 and float(m.max()) > 0.1
    else:  # out = x (1 - m) + m * mud brown, m in {0} or [0.8, 1]
        colour = torch.tensor([63, 42, 20], dtype=torch.float64).view(1, 3, 1, 1) / 255
        m = (out - x) / (colour - x)
        covered = m[:, 0] > 1e-6
        assert covered.any() and bool((m[:, 0][covered] >= 0.8 - 1e-5).all())
    torch.testing.assert_close(m[:, 1], m[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(m[:, 2], m[:, 0], atol=1e-5, rtol=0)
    gray = corrupt(_views._gray(images), "spatter", severity, seed=2, pixel_scale=1.0)
    assert gray.shape == (1, 1, 48, 48) and not torch.equal(gray, _views._gray(images))
    with pytest.raises(ValueError, match="channels"):
        corrupt(torch.rand(1, 2, 8, 8), "spatter", severity)


def test_spatter_amount_of_liquid_does_not_depend_on_the_image_size():
    # the share of the smoothed noise above the threshold is the 224-pixel one at any pixel_scale
    loc, spread, sigma, threshold = _views._SPATTER[0][:4]
    weights = torch.exp(-0.5 * (torch.arange(-16, 17, dtype=torch.float64) / sigma) ** 2)
    std = spread * float(((weights / weights.sum()) ** 2).sum())
    expected = 0.5 * math.erfc((threshold - loc) / (std * math.sqrt(2)))
    for size, n in ((224, 2), (28, 128)):
        generator = torch.Generator().manual_seed(0)
        liquid = _views._liquid_layer(n, size, size, 0, generator, size / 224)
        assert float((liquid > 0).double().mean()) == pytest.approx(expected, abs=0.01)
    # and the mud covers about as much of a 28-pixel image as of a 224-pixel one
    mud = [
        float(_views._spatter_mud(n, size, size, 3, torch.Generator().manual_seed(0), size / 224).mean())
        for size, n in ((224, 2), (28, 32))
    ]
    assert mud[1] == pytest.approx(mud[0], rel=0.1)
