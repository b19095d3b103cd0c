"""RankFeat: scores against the digits CNN run by hand with numpy's SVD between its blocks."""

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.detectors.model.rankfeat import last_feature_map_layer, remove_rank_one
from oodguard.extraction.model_runner import ModelRunner

from detector_data import assert_model_round_trip


def _remove_rank_one_numpy(a):
    out = np.empty_like(a)
    for i, sample in enumerate(a):
        matrix = sample.reshape(sample.shape[0], -1)
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        out[i] = (matrix - s[0] * np.outer(u[:, 0], vt[0])).reshape(sample.shape)
    return out


def _neg_energy(logits, t=1.0):
    z = logits / t
    m = z.max(axis=1, keepdims=True)
    return -t * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


def _branch(cnn, images, split):
    """Logits with the rank-1 part removed from the output of ``features[split - 1]``."""
    with torch.no_grad():
        a = cnn.features[:split](cnn.normalize(images)).double().numpy()
        cleaned = torch.from_numpy(_remove_rank_one_numpy(a)).float()
        return cnn.head(cnn.features[split:](cleaned)).double().numpy()


def test_known_answer_digits_cnn_default_layer(cnn, images):
    det = detectors.create("rankfeat").attach(ModelRunner(cnn, batch_size=5))
    got = det.score(images)
    assert det.layer_names_ == ["features.5"]  # the 32 x 7 x 7 maps before flatten/linear
    np.testing.assert_allclose(got.numpy(), _neg_energy(_branch(cnn, images, 6)), rtol=1e-5, atol=1e-5)


def test_known_answer_fusion_and_temperature(cnn, images):
    det = detectors.create("rankfeat", layers=["features.2", "features.5"], temperature=2.0).attach(cnn)
    fused = (_branch(cnn, images, 3) + _branch(cnn, images, 6)) / 2
    np.testing.assert_allclose(det.score(images).numpy(), _neg_energy(fused, 2.0), rtol=1e-5, atol=1e-5)


def test_power_iteration_matches_the_svd():
    a = torch.rand(4, 6, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = remove_rank_one(a)
    torch.testing.assert_close(exact.numpy(), _remove_rank_one_numpy(a.numpy()))
    wide = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # C < HW
    torch.testing.assert_close(remove_rank_one(wide).numpy(), _remove_rank_one_numpy(wide.numpy()))
    torch.testing.assert_close(remove_rank_one(a, "power", 200), exact, rtol=1e-8, atol=1e-8)
    rank_one = torch.einsum("bc,bs->bcs", torch.rand(2, 5), torch.rand(2, 9)).reshape(2, 5, 3, 3)
    assert remove_rank_one(rank_one).abs().max() < 1e-6  # a rank-1 map is removed entirely
    assert remove_rank_one(rank_one).dtype == torch.float32


def test_power_method_scores_close_to_svd(cnn, images):
    svd = detectors.create("rankfeat").attach(cnn).score(images)
    power = detectors.create("rankfeat", method="power", iterations=100).attach(cnn).score(images)
    torch.testing.assert_close(power, svd, rtol=1e-4, atol=1e-4)


def test_finds_the_last_block_of_a_resnet_like_model():
    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
            self.relu = nn.ReLU()  # called twice: never chosen

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)) + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.layer3 = nn.Sequential(Block(8))
            self.layer4 = nn.Sequential(Block(8), Block(8))
            self.avgpool = nn.AdaptiveAvgPool2d(1)  # 1 x 1 maps are not feature maps
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.layer4(self.layer3(self.stem(x)))), 1))

    torch.manual_seed(0)
    runner = ModelRunner(Net())
    assert last_feature_map_layer(runner, torch.rand(2, 3, 6, 6)) == "layer4"
    with pytest.raises(ValueError, match="called 2 times"):
        detectors.create("rankfeat", layers=["layer4.0.relu"]).attach(runner).score(torch.rand(2, 3, 6, 6))


def test_save_load_round_trip(cnn, images, tmp_path):
    det = detectors.create("rankfeat", layers=["features.2"], temperature=3.0).attach(cnn)
    assert_model_round_trip(det, cnn, images, tmp_path / "rankfeat")


def test_bad_parameters_and_layers(cnn, images):
    for params in ({"layers": []}, {"layers": ["a", "a"]}, {"temperature": 0}, {"method": "qr"}, {"iterations": 0}):
        with pytest.raises(ValueError):
            detectors.create("rankfeat", **params)
    with pytest.raises(ValueError, match="feature maps"):
        detectors.create("rankfeat", layers=["features.7"]).attach(cnn).score(images)  # [B, 64]
    with pytest.raises(ValueError, match="nope"):
        detectors.create("rankfeat", layers=["nope"]).attach(cnn).score(images)
    with pytest.raises(ValueError, match="no module whose output is a feature map"):
        detectors.create("rankfeat").attach(nn.Sequential(nn.Linear(4, 3))).score(torch.rand(2, 4))
