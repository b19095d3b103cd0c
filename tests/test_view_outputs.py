"""Outputs of test-time views: extracted like datasets, cached by view and source content, averaged by any detector."""

import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import ModelRunner
from oodguard.views import View, ViewDataset
from oodguard.views.outputs import average_over_views, extract_views, view_dataset_key


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self._rows_seen = 0  # private: public plain attributes are part of the model's cache fingerprint

    @property
    def rows_seen(self):
        return self._rows_seen

    @rows_seen.setter
    def rows_seen(self, value):
        self._rows_seen = value

    def forward(self, x):
        self._rows_seen += x.shape[0]
        return self.head(self.body(x))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return _Counting().eval()


@pytest.fixture()
def images():
    return torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))


VIEWS = [View("identity"), View("b1", "brightness", 1, seed=0), View("n2", "gaussian_noise", 2, seed=3)]


def test_views_are_the_extraction_of_the_view_dataset_and_a_cache_hit_runs_no_model(model, images, tmp_path):
    first = extract_views(model, images, VIEWS, cache_dir=tmp_path, progress=False)
    assert list(first) == [v.key for v in VIEWS] and model.rows_seen == 3 * 20
    for view in VIEWS:  # each view's outputs are those of extracting the corrupted images
        direct = extract(model, ViewDataset(images, view), progress=False)
        torch.testing.assert_close(first[view.key].logits, direct.logits)
    model.rows_seen = 0
    again = extract_views(model, images, VIEWS, cache_dir=tmp_path, progress=False)
    assert model.rows_seen == 0
    for key in first:
        assert torch.equal(again[key].logits, first[key].logits)


def test_a_changed_pixel_seed_or_model_misses_the_cache(model, images, tmp_path):
    extract_views(model, images, VIEWS[1:2], cache_dir=tmp_path, progress=False)
    changed = images.clone()
    changed[3, 0, 2, 2] += 0.01
    model.rows_seen = 0
    extract_views(model, changed, VIEWS[1:2], cache_dir=tmp_path, progress=False)
    assert model.rows_seen == 20
    extract_views(model, images, [View("b1", "brightness", 1, seed=1)], cache_dir=tmp_path, progress=False)
    assert model.rows_seen == 40
    with torch.no_grad():
        model.head.bias.add_(1.0)
    extract_views(model, images, VIEWS[1:2], cache_dir=tmp_path, progress=False)
    assert model.rows_seen == 60
    key = view_dataset_key(VIEWS[1], "abc", 256)
    assert VIEWS[1].key in key and "source=abc" in key and "views_version=" in key


def test_average_over_views_is_the_mean_of_the_detector_scores(model, images):
    outputs = extract_views(model, images, VIEWS, progress=False)
    energy = detectors.create("energy")
    expected = sum(torch.as_tensor(energy.score(o)).double() for o in outputs.values()) / 3
    torch.testing.assert_close(average_over_views(energy, outputs), expected)
    with pytest.raises(ValueError, match="at least one view"):
        average_over_views(energy, {})
    with pytest.raises(ValueError, match="20 and 5 rows"):
        average_over_views(energy, [outputs["identity"], outputs["identity"][:5]])
    with pytest.raises(ValueError, match="more than once"):
        extract_views(model, images, [VIEWS[0], VIEWS[0]], progress=False)


def test_cover_reuses_cached_views_through_the_runner(model, images, tmp_path):
    views = ["identity", "brightness-1", "fog-2"]
    plain = detectors.create("cover", views=views).attach(ModelRunner(model)).score(images)
    cached_runner = ModelRunner(model, cache_dir=tmp_path)
    cover = detectors.create("cover", views=views).attach(cached_runner)
    torch.testing.assert_close(cover.score(images), plain)
    model.rows_seen = 0
    torch.testing.assert_close(cover.score(images), plain)
    assert model.rows_seen == 0


def test_views_of_a_dataset_and_of_a_labelled_pair_are_cached_by_their_source(model, images, tmp_path):
    from torch.utils.data import TensorDataset

    dataset = TensorDataset(images)

    class Images(torch.utils.data.Dataset):  # items are bare images, as ViewDataset accepts
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i][0]

    first = extract_views(model, Images(), VIEWS[1:2], cache_dir=tmp_path, progress=False)
    model.rows_seen = 0
    again = extract_views(model, Images(), VIEWS[1:2], cache_dir=tmp_path, progress=False)
    assert model.rows_seen == 0 and torch.equal(first[VIEWS[1].key].logits, again[VIEWS[1].key].logits)
    labels = torch.arange(20) % 3
    pair = extract_views(model, (images, labels), VIEWS[1:2], cache_dir=tmp_path, progress=False)
    assert torch.equal(pair[VIEWS[1].key].labels, labels) and model.rows_seen == 20  # labels are part of the key
