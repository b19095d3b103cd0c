"""Auxiliary outliers for training on the ``digits`` benchmark: crops of bundled images that no test set uses.

Outlier-exposure methods need surrogate OOD data that is disjoint from the OOD sets they are tested on,
otherwise a gain measures memorisation of the test distribution. The pool here is made only from images that
the test sets of ``digits`` never touch (see ``digits_data``: its photo crops come from camera, coins, moon,
brick, grass, gravel, text, page, astronaut, coffee, chelsea, rocket and scikit-learn's china/flower; its faces
and backgrounds from ``lfw_subset``; its letters from the DejaVu fonts; the rest is MNIST, optdigits or noise):

* scikit-image (``skimage.data``, bundled in the wheel, BSD-3-Clause; each image keeps its own credit, see the
  ``skimage.data`` docstrings): horse, clock, cell, hubble_deep_field, immunohistochemistry, retina,
  microaneurysms, logo, colorwheel, checkerboard, shepp_logan_phantom, and the left image of
  stereo_motorcycle. Left out on purpose: ``cat`` (it *is* ``chelsea``, a test image: identical pixels) and
  ``binary_blobs`` (generated blobs, like the synthetic test set).
* matplotlib's ``sample_data`` (bundled, matplotlib licence; see its ``README.txt``): grace_hopper.jpg (US Navy
  photo, public domain), Minduka_Present_Blue_Pack.png, logo2.png and the MRI slice s1045.ima.gz.

Each pool image is a random square crop of one source (chosen uniformly), side 28-112 px or the source's short
side, shrunk to 28x28 gray in [0, 1] with an antialiased bilinear resize. Half of the crops are used as they
are (intensity); the other half are turned into edge maps (Sobel gradient magnitude, scaled to [0, 1] per
crop), white strokes on black like MNIST digits, so the pool also covers thin-stroke shapes. Nothing is
downloaded; ``test_digits_outliers`` checks that no pool source equals a test source.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodguard.benchmark.digits_data import SIZE, gray, resize_images

#: skimage images used for the pool (all bundled in the wheel).
SKIMAGE_SOURCES = (
    "horse",
    "clock",
    "cell",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "microaneurysms",
    "logo",
    "colorwheel",
    "checkerboard",
    "shepp_logan_phantom",
    "stereo_motorcycle",
)
#: matplotlib sample_data files used for the pool.
MATPLOTLIB_SOURCES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png", "s1045.ima.gz")
#: Bundled skimage images deliberately not used, and why.
EXCLUDED = {
    "cat": "same pixels as chelsea, which the photo-crops test set uses",
    "binary_blobs": "generated blobs, like the synthetic blobs test set",
}

POOL_VERSION = "digits-outliers-1"
DEFAULT_POOL_SIZE = 6000
_STREAM = 11  # random stream of the pool, apart from digits_data's streams 1-7

DESCRIPTION = (
    "Auxiliary outlier pool (training only): random square crops (28-112 px) of images that no digits test set "
    f"uses: scikit-image {', '.join(SKIMAGE_SOURCES)} (left view); matplotlib sample data "
    f"{', '.join(MATPLOTLIB_SOURCES)}; shrunk to 28x28 gray, half as intensity crops and half as Sobel edge "
    "maps (white strokes on black). Excluded: skimage cat (identical to the chelsea test image), binary_blobs."
)


def _to_unit(image: np.ndarray) -> np.ndarray:
    """Any bool/uint8/uint16/float image -> float32 gray in [0, 1]; RGBA composited onto black."""
    image = np.asarray(image)
    if image.dtype == bool:
        return image.astype(np.float32)
    if image.ndim == 3 and image.shape[2] == 4:  # alpha: transparent background becomes black
        alpha = image[..., 3:4].astype(np.float32) / 255.0
        image = (image[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    if image.dtype == np.uint8:
        return gray(image)
    image = image.astype(np.float32)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / max(high - low, 1e-12)


def load_sources() -> dict[str, np.ndarray]:
    """The pool's source images as float32 gray arrays in [0, 1], keyed by name (read from installed packages)."""
    import matplotlib
    import skimage.data
    from PIL import Image

    sources = {}
    for name in SKIMAGE_SOURCES:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity); the views are near-duplicates
            image = image[0]
        sources[name] = _to_unit(image)
    sample_dir = Path(matplotlib.get_data_path()) / "sample_data"
    for name in MATPLOTLIB_SOURCES:
        path = sample_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"matplotlib's sample data {name} is missing from {sample_dir}; reinstall it")
        if name.endswith(".ima.gz"):  # 256x256 big-endian uint16 MRI slice (as in matplotlib's mri example)
            with gzip.open(path) as handle:
                image = np.frombuffer(handle.read(), ">u2").reshape(256, 256)
        else:
            with Image.open(path) as handle:
                image = np.asarray(handle)
        sources[name] = _to_unit(image)
    return sources


def _edge_maps(crops: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of ``[N, 1, 28, 28]`` crops, scaled to [0, 1] per crop (flat crops stay black)."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.T])[:, None]
    gradients = F.conv2d(F.pad(crops, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradients.pow(2).sum(dim=1, keepdim=True).sqrt()
    peak = magnitude.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 1e-6, magnitude / peak.clamp_min(1e-6), torch.zeros_like(magnitude))


def outlier_pool(count: int = DEFAULT_POOL_SIZE, seed: int = 0) -> torch.Tensor:
    """``count`` pool images, ``float32 [count, 1, 28, 28]`` in [0, 1]; the same seed gives the same pool.

    Crop ``i`` is an edge map when ``i`` is odd, an intensity crop otherwise (see the module docstring).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    sources = load_sources()
    names = sorted(sources)
    rng = np.random.default_rng([int(seed), _STREAM])
    crops = torch.empty(count, 1, SIZE, SIZE)
    for i in range(count):  # one crop per source draw; each has its own size, so no batching across crops
        image = sources[names[rng.integers(len(names))]]
        side = int(min(rng.integers(SIZE, 113), *image.shape))
        top = int(rng.integers(0, image.shape[0] - side + 1))
        left = int(rng.integers(0, image.shape[1] - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
        crops[i] = resize_images(crop[None, None], SIZE)[0]
    crops.clamp_(0.0, 1.0)
    crops[1::2] = _edge_maps(crops[1::2])
    return crops.contiguous()
