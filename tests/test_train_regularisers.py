"""label_smoothing, mixup and cutmix as training methods: known answers for their losses and mixing."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from oodguard.train import METHODS, Recipe, create_method, train
from oodguard.train.mixing import rand_bbox, sample_lambda


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def test_label_smoothing_at_zero_is_cross_entropy_and_at_eps_is_the_smoothed_target_by_hand():
    x, y = _images()
    model = _model()
    logits = model(x)
    plain = create_method("label_smoothing", eps=0.0).loss(model, x, y, None, torch.Generator())
    torch.testing.assert_close(plain, F.cross_entropy(logits, y))
    eps = 0.2
    target = (1 - eps) * F.one_hot(y, 3) + eps / 3
    by_hand = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(create_method("label_smoothing", eps=eps).loss(model, x, y, None, torch.Generator()),
                               by_hand)  # fmt: skip
    with pytest.raises(ValueError, match="eps must lie in"):
        create_method("label_smoothing", eps=1.0)


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_pair_mixing_loss_is_the_share_weighted_cross_entropy_of_both_labels(name):
    x, y = _images()
    model = _model()
    method = create_method(name)
    # replay the method's draws with the same generator state to rebuild the batch by hand
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loss = method.loss(model, x, y, None, g1)
    perm = torch.randperm(32, generator=g2)
    lam = sample_lambda(1.0, 1.0, g2)
    if name == "mixup":
        mixed = lam * x + (1 - lam) * x[perm]
    else:
        top, left, bottom, right = rand_bbox(8, 8, lam, g2)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / 64
    logits = model(mixed)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, expected)


def test_cutmix_pastes_a_box_of_the_partner_and_weights_labels_by_area():
    x, y = _images()
    method = create_method("cutmix")
    mixed, partner, lam = method.mixed_batch(x, y, torch.Generator().manual_seed(3))
    changed = (mixed != x).any(dim=1)  # [n, 8, 8]: where a pixel came from the partner
    assert 0 <= lam <= 1
    # every changed pixel lies in one box, the same for every image, of area (1 - lam) * 64 at most
    rows, cols = torch.nonzero(changed.any(dim=0), as_tuple=True)
    if len(rows):
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box <= round((1 - lam) * 64)
    with pytest.raises(ValueError, match="cutmix_prob"):
        create_method("cutmix", cutmix_prob=0.0)


@pytest.mark.parametrize("name", ["label_smoothing", "mixup", "cutmix"])
def test_each_regulariser_trains_on_images_without_outliers_and_is_registered(name):
    assert name in METHODS and not METHODS[name].needs_outliers
    x, y = _images(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    result = train(_model(), loader, create_method(name), None, recipe=Recipe(epochs=2, lr=0.05), progress=False)
    assert all(torch.isfinite(torch.tensor(result.epoch_losses)))
    assert METHODS[name].official_recipe().outlier_batch == 0
