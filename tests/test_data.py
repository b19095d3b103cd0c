import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from oodguard.extraction.data import (
    CIFAR,
    ArrayDataset,
    ImageFolder,
    ImageList,
    Normalize,
    Resize,
    load_cifar,
    load_image,
)
from oodguard.extraction.extract import extract


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


def rgb(seed, height=4, width=5):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- transforms, arrays
def test_normalize_and_resize():
    image = torch.rand(3, 6, 6)
    normalized = Normalize([0.1, 0.2, 0.3], [0.5, 0.5, 2.0])(image)
    torch.testing.assert_close(normalized[2], (image[2] - 0.3) / 2.0)
    assert Resize(3)(image).shape == (3, 3, 3) and Resize((6, 6))(image) is image
    with pytest.raises(ValueError, match="std"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="channel statistics"):
        Normalize([0.0, 0.0], [1.0, 1.0])(image)


def test_array_dataset():
    inputs = np.arange(12, dtype=np.float32).reshape(4, 3)
    ds = ArrayDataset(inputs, labels=[0, 1, 2, -1], transform=lambda t: t * 2)
    x, y = ds[3]
    assert len(ds) == 4 and y == -1 and torch.equal(x, torch.tensor([18.0, 20.0, 22.0]))
    unlabelled = ArrayDataset(torch.zeros(2, 3))
    assert torch.equal(unlabelled[0], torch.zeros(3))
    with pytest.raises(ValueError, match="labels: expected shape \\(4,\\)"):
        ArrayDataset(inputs, labels=[0, 1])


# ---------------------------------------------------------------------------------------------- image files
def test_load_image_modes(tmp_path):
    pixels = rgb(0)
    path = write_png(tmp_path / "a.png", pixels)
    image = load_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert load_image(path, mode="L").shape == (1, 4, 5)
    gray = write_png(tmp_path / "g.png", pixels[..., 0], mode="L")
    assert load_image(gray).shape == (1, 4, 5) and load_image(gray, mode="RGB").shape == (3, 4, 5)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([pixels, pixels[..., :1]]), mode="RGBA").save(rgba)
    assert load_image(rgba).shape == (3, 4, 5)
    wide = tmp_path / "16.png"
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(wide)
    torch.testing.assert_close(load_image(wide), torch.ones(1, 2, 2))


def make_folder(root):
    write_png(root / "dog" / "b.png", rgb(1))
    write_png(root / "dog" / "sub" / "a.PNG", rgb(2))
    write_png(root / "cat" / "z.png", rgb(3))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "root"))
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.targets == [0, 1, 1] and len(ds) == 3
    assert [os.path.basename(p) for p, _ in ds.samples] == ["z.png", "b.png", "a.PNG"]
    x, y = ds[0]
    assert y == 0 and x.shape == (3, 4, 5)
    torch.testing.assert_close(x, torch.from_numpy(rgb(3)).permute(2, 0, 1).float() / 255)
    gray = ImageFolder(tmp_path / "root", mode="L", transform=lambda t: t - 0.5)
    assert gray[1][0].shape == (1, 4, 5) and float(gray[1][0].min()) >= -0.5


def test_a_flat_folder_is_an_unlabelled_set_and_unlabelled_marks_every_image_ood(tmp_path):
    root = make_folder(tmp_path / "root")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, (path, _) in enumerate(ImageFolder(root).samples):
        (flat / f"{index:03d}.png").write_bytes(Path(path).read_bytes())
    (flat / "notes.txt").write_text("not an image")
    images = ImageFolder(flat)
    assert images.classes == [] and images.targets == [-1] * len(ImageFolder(root))
    torch.testing.assert_close(images[0][0], ImageFolder(root)[0][0])
    assert set(ImageFolder(root, unlabelled=True).targets) == {-1}


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no sub-folders and no images"):
        ImageFolder(tmp_path / "flat")
    root = make_folder(tmp_path / "root")
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no images"):
        ImageFolder(root)
    broken = tmp_path / "broken"
    write_png(broken / "a" / "ok.png", rgb(0))
    (broken / "a" / "bad.png").write_bytes(b"not a png at all")
    ds = ImageFolder(broken)
    with pytest.raises(OSError, match="cannot read image file .*bad.png"):
        ds[0]


def test_image_folder_feeds_extract(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "root"), transform=Normalize([0.5] * 3, [0.25] * 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    out = extract(model, ds, batch_size=2, progress=False)
    assert out.logits.shape == (3, 2) and out.labels.tolist() == [0, 1, 1]
    loader = DataLoader(ImageFolder(tmp_path / "root", transform=Resize(3)), batch_size=3)
    assert extract(model, loader, progress=False).features.shape == (3, 2)


def test_image_list(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", rgb(0))
    write_png(tmp_path / "imgs" / "sub" / "b.png", rgb(1))
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 3\n\n   \nsub/b.png -1\nsub/b.png {'label': 2, 'extra': 1}\n")
    ds = ImageList(list_file, tmp_path / "imgs")
    assert len(ds) == 3 and ds.targets == [3, -1, 2]
    x, y = ds[1]
    assert y == -1 and x.shape == (3, 4, 5)
    torch.testing.assert_close(x, torch.from_numpy(rgb(1)).permute(2, 0, 1).float() / 255)
    assert ImageList(list_file, tmp_path / "imgs", mode="L")[0][0].shape == (1, 4, 5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.png 1\nb.png\n", "line 2: expected 'relative/path label'"),
        ("\na.png one\n", "line 2: cannot read the label"),
        ("a.png 1.5\n", "line 1: the label '1.5' is not an integer"),
        ("a.png {'name': 1}\n", "line 1: the extras .* have no 'label' key"),
        ("/abs/a.png 1\n", "line 1: the path '/abs/a.png' is absolute"),
        ("\n\n", "lists no images"),
    ],
)
def test_image_list_bad_lines(tmp_path, text, message):
    list_file = tmp_path / "list.txt"
    list_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        ImageList(list_file, tmp_path)


def test_image_list_missing_file_names_line(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("\nmissing.png 0\n")
    with pytest.raises(OSError, match="line 2: cannot read image file .*missing.png"):
        ImageList(list_file, tmp_path)[0]


# ---------------------------------------------------------------------------------------------- CIFAR
def fake_batch(n, seed, label_keys, bytes_keys):
    rng = np.random.default_rng(seed)
    batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "batch_label": "fake"}
    for key, classes in label_keys.items():
        batch[key] = rng.integers(0, classes, size=n).tolist()
    if bytes_keys:  # like the real files, written by Python 2
        batch = {key.encode(): value for key, value in batch.items()}
    return batch


def write_pickle(path, obj, protocol):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


def test_load_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = [fake_batch(2, i, {"labels": 10}, bytes_keys=True) for i in range(5)]
    for i, batch in enumerate(batches, start=1):
        write_pickle(folder / f"data_batch_{i}", batch, protocol=2)
    test = fake_batch(3, 9, {"labels": 10}, bytes_keys=True)
    write_pickle(folder / "test_batch", test, protocol=2)

    images, labels = load_cifar(tmp_path)  # the parent folder is found too
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels.tolist() == sum((b[b"labels"] for b in batches), [])
    row = batches[0][b"data"][1]  # 1024 red values, then green, then blue, row-major
    assert images[1, 0, 5, 0] == row[5] and images[1, 2, 3, 1] == row[1024 + 2 * 32 + 3]
    assert images[1, 31, 31, 2] == row[3071]

    test_images, test_labels = load_cifar(folder, train=False)
    assert test_images.shape == (3, 32, 32, 3) and test_labels.tolist() == test[b"labels"]
    ds = CIFAR(folder, train=False, transform=Normalize([0.5] * 3, [0.5] * 3))
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and y == test[b"labels"][2]
    torch.testing.assert_close(x[0, 0, 0], torch.tensor(test_images[2, 0, 0, 0] / 255 * 2 - 1, dtype=torch.float32))


def test_load_cifar100_python3_pickles(tmp_path):
    for name, n, seed in (("train", 4, 0), ("test", 2, 1)):
        batch = fake_batch(n, seed, {"fine_labels": 100, "coarse_labels": 20}, bytes_keys=False)
        write_pickle(tmp_path / name, batch, protocol=pickle.HIGHEST_PROTOCOL)
    images, fine = load_cifar(tmp_path)
    _, coarse = load_cifar(tmp_path, coarse=True)
    assert images.shape == (4, 32, 32, 3) and fine.max() < 100 and coarse.max() < 20
    assert load_cifar(tmp_path, train=False)[0].shape == (2, 32, 32, 3)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_pickle(tmp_path / "test_batch", {b"data": _Exploit(marker), b"labels": []}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|nt|os).system"):
        load_cifar(tmp_path, train=False)
    assert not marker.exists()


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar(tmp_path)
    write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}, 2)
    with pytest.raises(ValueError, match="uint8 \\[N, 3072\\]"):
        load_cifar(tmp_path, train=False)
    write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), dtype=np.uint8)}, 2)
    with pytest.raises(ValueError, match="expected keys 'data' and 'labels'"):
        load_cifar(tmp_path, train=False)
    with pytest.raises(ValueError, match="only CIFAR-100"):
        load_cifar(tmp_path, train=False, coarse=True)
