"""DOS's sampler picks exactly what the spec says on constructed pools; the torch k-means agrees with sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from oodguard.train import DiverseOutlierSampler, TakeAll, dos_candidate_size, kmeans
from oodguard.train.samplers import choose_per_cluster


def four_direction_pool(per_cluster: int = 6, seed: int = 0):
    """Points in 4 tight clusters around the axes of R^4, at different norms (clustering is on normalised features)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4)
    points, members = [], []
    for c in range(4):
        scale = rng.uniform(0.5, 20.0, size=(per_cluster, 1))  # norms vary a lot; directions are tight
        points.append((centres[c] + rng.normal(0, 0.02, size=(per_cluster, 4))) * scale)
        members.append(np.full(per_cluster, c))
    return torch.tensor(np.concatenate(points)), np.concatenate(members)


def test_kmeans_recovers_separated_clusters_like_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(loc, 0.1, size=(30, 3)) for loc in ([0, 0, 0], [3, 0, 0], [0, 3, 0], [0, 0, 3])])
    labels, centres, inertia = kmeans(torch.tensor(x), 4, n_init=5, generator=torch.Generator().manual_seed(0))
    reference = KMeans(4, n_init=5, random_state=0).fit(x)
    assert adjusted_rand_score(reference.labels_, labels.numpy()) == 1.0
    assert inertia == pytest.approx(reference.inertia_, rel=1e-6)
    assert centres.shape == (4, 3)


def test_dos_keeps_the_lowest_absent_probability_members_of_every_cluster():
    features, cluster = four_direction_pool(per_cluster=6)
    rng = np.random.default_rng(2)
    absent = torch.tensor(rng.permutation(24) / 24.0)  # distinct w values, no ties
    sampler = DiverseOutlierSampler(num_keep=8, num_clusters=4, n_init=3)
    chosen = sampler.select(features, absent, torch.Generator().manual_seed(0)).numpy()
    # k = 4 <= num_keep = 8: quota 8 // 4 = 2 per cluster, taken from every cluster; no random fill needed
    expected = set()
    for c in range(4):
        idx = np.flatnonzero(cluster == c)
        expected |= set(idx[np.argsort(absent.numpy()[idx])[:2]].tolist())
    assert set(chosen.tolist()) == expected
    assert len(chosen) == 8


def test_dos_quota_one_when_there_are_more_clusters_than_outliers_to_keep():
    # labels given: 6 clusters, keep 4 -> q = 1 from each of the first 4 clusters (0..3), the smallest w each
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    absent = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.05, 0.5, 0.0, 0.01, 0.02, 0.03])
    chosen = choose_per_cluster(labels, absent, num_clusters=6, num_keep=4)
    assert chosen.tolist() == [1, 2, 5, 6]  # clusters 4 and 5 are not used although their w are lower


def test_dos_small_clusters_are_taken_whole_and_the_shortfall_is_filled_at_random():
    labels = torch.tensor([0, 1, 1, 1, 1, 1])  # cluster 0 has 1 member, quota is 3
    absent = torch.tensor([0.5, 0.4, 0.1, 0.3, 0.2, 0.6])
    chosen = choose_per_cluster(labels, absent, num_clusters=2, num_keep=5, generator=torch.Generator())
    # q = 5 // 2 = 2: cluster 0 -> [0]; cluster 1 -> its two smallest w: 2 (0.1), 4 (0.2); then 2 random others
    assert chosen[:3].tolist() == [0, 2, 4]
    assert len(chosen) == 5 and len(set(chosen.tolist())) == 5
    assert set(chosen[3:].tolist()) <= {1, 3, 5}


def test_dos_sampler_on_a_model_uses_penultimate_features_and_the_last_softmax_output():
    features, cluster = four_direction_pool(per_cluster=5, seed=3)
    # the model's penultimate features are its inputs (identity layer); its head gives the absent logit from a
    # hidden 5th input column, so w is known exactly: w = softmax([0, 0, a])[2]
    absent_logit = torch.linspace(-3, 3, 20)[torch.randperm(20, generator=torch.Generator().manual_seed(4))]
    inputs = torch.cat([features, absent_logit[:, None].double()], dim=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3).double()
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()

        def forward(self, x):
            return self.head(x[:, :4]) + torch.cat([torch.zeros(len(x), 2, dtype=x.dtype), x[:, 4:]], dim=1)

    model = Net().train()
    sampler = DiverseOutlierSampler(num_keep=4, num_clusters=4, n_init=3)
    picked = sampler(model, inputs, torch.Generator().manual_seed(0))
    assert model.training  # mode restored
    expected = []
    for c in range(4):
        idx = np.flatnonzero(cluster == c)
        expected.append(idx[np.argmin(absent_logit.numpy()[idx])])
    assert sorted(map(tuple, picked.tolist())) == sorted(map(tuple, inputs[expected].tolist()))


def test_take_all_and_candidate_size():
    x = torch.zeros(3, 2)
    assert TakeAll()(nn.Linear(2, 2), x, torch.Generator()) is x
    assert dos_candidate_size(300_000, 50_000, 64) == 384  # the official numbers


def test_bad_sampler_parameters_are_refused():
    with pytest.raises(ValueError, match="num_clusters"):
        DiverseOutlierSampler(num_clusters=0)
    with pytest.raises(ValueError, match="absent_probability"):
        DiverseOutlierSampler(num_keep=1).select(torch.zeros(3, 2), torch.zeros(2))


def test_candidate_size_and_choice_refuse_bad_arguments():
    with pytest.raises(ValueError, match="id_train_size must be a positive integer"):
        dos_candidate_size(300, 0, 64)
    with pytest.raises(ValueError, match="absent_probability must have shape"):
        choose_per_cluster(torch.tensor([0, 1, 1]), torch.zeros(2), num_clusters=2, num_keep=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dos_sampler_on_cuda_draws_with_the_cpu_generator_and_chooses_as_on_cpu():
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    absent = torch.tensor([0.5, 0.4, 0.1, 0.3, 0.2, 0.6])
    on_cpu = choose_per_cluster(labels, absent, 2, 5, torch.Generator().manual_seed(1))
    on_cuda = choose_per_cluster(labels.cuda(), absent.cuda(), 2, 5, torch.Generator().manual_seed(1))
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), on_cpu)  # the random fill drew the same permutation
    features, _ = four_direction_pool(per_cluster=6)
    chosen = DiverseOutlierSampler(num_keep=8, num_clusters=4, n_init=2).select(
        features.cuda(), torch.rand(24).cuda(), torch.Generator().manual_seed(0)
    )
    assert chosen.is_cuda and len(set(chosen.tolist())) == 8
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).cuda()
    picked = DiverseOutlierSampler(num_keep=8, num_clusters=4, n_init=2)(model, features.float().cuda(),
                                                                         torch.Generator().manual_seed(0))  # fmt: skip
    assert picked.shape == (8, 4) and picked.is_cuda
