"""Training losses against independent numpy formulas on tiny inputs, and the MixOE mixing operations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodguard.train import (
    AbsentCategoryLoss,
    EnergyMarginLoss,
    LearnedTemperatureHead,
    LogitNormLoss,
    MixOELoss,
    OutlierExposureLoss,
    mix_outliers,
    rand_bbox,
    sample_lambda,
)

LOGITS_IN = np.array([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
LABELS = np.array([0, 1])
LOGITS_OUT = np.array([[0.0, 1.0, 3.0], [-1.0, -1.0, -1.0], [5.0, 0.0, -5.0]])


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_ce(z, y):
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_lse(z):
    z = np.asarray(z, dtype=np.float64)
    return np.log(np.exp(z).sum(axis=1))


def t(a, dtype=torch.float64):
    return torch.tensor(a, dtype=dtype)


def test_cross_entropy_helper_by_hand():
    # row 0: -log(e^2 / (e^2 + e^-1 + e^0.5)); checked once by hand so np_ce itself is trusted
    row0 = -(2.0 - math.log(math.exp(2) + math.exp(-1) + math.exp(0.5)))
    row1 = -(0.3 - math.log(math.exp(0.1) + math.exp(0.3) + math.exp(-2)))
    assert np_ce(LOGITS_IN, LABELS) == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_outlier_exposure_loss_known_answer():
    uniform_ce = -np_log_softmax(LOGITS_OUT).mean(axis=1)  # cross-entropy to the uniform distribution
    expected = np_ce(LOGITS_IN, LABELS) + 0.5 * uniform_ce.mean()
    got = OutlierExposureLoss()(t(LOGITS_IN), torch.tensor(LABELS), t(LOGITS_OUT))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # the constant outlier row's softmax is exactly uniform: its cross-entropy to uniform is the minimum, log K
    assert uniform_ce[1] == pytest.approx(math.log(3), rel=1e-12)
    weighted = OutlierExposureLoss(weight=2.0)(t(LOGITS_IN), torch.tensor(LABELS), t(LOGITS_OUT))
    assert float(weighted) == pytest.approx(np_ce(LOGITS_IN, LABELS) + 2.0 * uniform_ce.mean(), rel=1e-12)


def test_energy_margin_loss_known_answer():
    m_in, m_out = -2.5, -0.5
    e_in, e_out = -np_lse(LOGITS_IN), -np_lse(LOGITS_OUT)
    hinge_in = np.mean(np.maximum(0.0, e_in - m_in) ** 2)
    hinge_out = np.mean(np.maximum(0.0, m_out - e_out) ** 2)
    expected = np_ce(LOGITS_IN, LABELS) + 0.1 * (hinge_in + hinge_out)
    got = EnergyMarginLoss(m_in=m_in, m_out=m_out)(t(LOGITS_IN), torch.tensor(LABELS), t(LOGITS_OUT))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # both hinges are active on these inputs, so the test would notice a missing square or a wrong sign
    assert hinge_in > 0 and hinge_out > 0


def test_energy_margins_defaults_are_run_sh_values_and_order_is_checked():
    loss = EnergyMarginLoss()
    assert (loss.m_in, loss.m_out, loss.weight) == (-23.0, -5.0, 0.1)
    with pytest.raises(ValueError, match="m_in must be below m_out"):
        EnergyMarginLoss(m_in=-5, m_out=-7)


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.0])
def test_mixoe_soft_targets_decay_linearly_to_uniform(lam):
    targets = MixOELoss.soft_targets(torch.tensor([2, 0]), lam, 4).numpy()
    expected = np.full((2, 4), (1 - lam) / 4)
    expected[0, 2] += lam
    expected[1, 0] += lam
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_mixoe_loss_known_answer():
    lam = 0.3
    logits_mix = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    soft = np.full((2, 3), (1 - lam) / 3)
    soft[np.arange(2), LABELS] += lam
    soft_ce = float(-(soft * np_log_softmax(logits_mix)).sum(axis=1).mean())
    expected = np_ce(LOGITS_IN, LABELS) + 5.0 * soft_ce
    got = MixOELoss(oe_weight=5.0)(t(LOGITS_IN), torch.tensor(LABELS), t(logits_mix), lam)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)


def test_mixup_variant_mixes_pixels_by_lambda():
    x_in, x_out = torch.ones(2, 1, 4, 4), torch.zeros(3, 1, 4, 4)
    mixed, lam = mix_outliers(x_in, x_out, "mixup", 0.25)
    assert lam == 0.25
    torch.testing.assert_close(mixed, torch.full((2, 1, 4, 4), 0.25))


def test_cutmix_variant_pastes_outlier_box_into_id_image_and_resets_lambda():
    generator = torch.Generator().manual_seed(3)
    x_in, x_out = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    mixed, lam = mix_outliers(x_in, x_out, "cutmix", 0.5, generator)
    top, left, bottom, right = rand_bbox(8, 8, 0.5, torch.Generator().manual_seed(3))
    area = (bottom - top) * (right - left)
    assert area > 0
    # the box holds the outlier's pixels (0), the rest the ID image's (1): the patch goes INTO the ID image
    assert float((mixed == 0).float().sum()) == 2 * area
    assert (mixed[:, :, top:bottom, left:right] == 0).all()
    assert lam == pytest.approx(1 - area / 64)
    # the soft target of a cutmix sample uses the ID share of the pixels
    targets = MixOELoss.soft_targets(torch.tensor([1]), lam, 2)
    np.testing.assert_allclose(targets.numpy(), [[(1 - lam) / 2, lam + (1 - lam) / 2]], rtol=1e-6)


def test_rand_bbox_side_follows_sqrt_of_one_minus_lambda():
    # a centred draw on a 10x10 image with lam 0.64: cut = int(10 * 0.6) = 6 -> box 6x6 when not clipped
    for seed in range(50):
        top, left, bottom, right = rand_bbox(10, 10, 0.64, torch.Generator().manual_seed(seed))
        assert bottom - top <= 6 and right - left <= 6
        assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 10
    sides = {(b - t_, r - le) for t_, le, b, r in (rand_bbox(10, 10, 0.64, torch.Generator().manual_seed(s))
                                                for s in range(200))}  # fmt: skip
    assert (6, 6) in sides  # an unclipped box has exactly the side int(10 * sqrt(1 - 0.64))


def test_sample_lambda_follows_beta_moments():
    generator = torch.Generator().manual_seed(0)
    draws = np.array([sample_lambda(2.0, 2.0, generator) for _ in range(4000)])
    assert draws.mean() == pytest.approx(0.5, abs=0.02)
    assert draws.var() == pytest.approx(2 * 2 / (4**2 * 5), abs=0.01)  # ab / ((a+b)^2 (a+b+1)) = 0.05


def test_absent_category_loss_known_answer():
    logits_in = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])  # K = 2 known classes + absent
    logits_out = np.array([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    expected = np_ce(logits_in, np.array([0, 1])) + 1.0 * np_ce(logits_out, np.array([2, 2]))
    got = AbsentCategoryLoss()(t(logits_in), torch.tensor([0, 1]), t(logits_out))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="labels must lie in"):
        AbsentCategoryLoss()(t(logits_in), torch.tensor([0, 2]), t(logits_out))  # ID labels never name the absent class


def test_logitnorm_loss_known_answer():
    tau = 0.04
    norms = np.sqrt((LOGITS_IN**2).sum(axis=1, keepdims=True)) + 1e-7
    expected = np_ce(LOGITS_IN / (norms * tau), LABELS)
    got = LogitNormLoss(tau)(t(LOGITS_IN), torch.tensor(LABELS))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-10)
    # scale invariance: multiplying the logits by 10 changes nothing (up to the 1e-7)
    assert float(LogitNormLoss(tau)(t(10 * LOGITS_IN), torch.tensor(LABELS))) == pytest.approx(expected, rel=1e-5)


def test_abet_head_logits_and_ablated_energy_known_answer():
    torch.manual_seed(0)
    head = LearnedTemperatureHead(3, 2).double().eval()
    with torch.no_grad():
        head.cosine.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        head.temperature_net[0].weight.copy_(torch.tensor([[0.5, -0.5, 1.0]]))
        head.temperature_net[0].bias.fill_(0.25)
        bn = head.temperature_net[1]
        bn.running_mean.fill_(0.1)
        bn.running_var.fill_(4.0)
        bn.weight.fill_(1.5)
        bn.bias.fill_(-0.2)
    h = np.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ np.array([[1.0, 0, 0], [0, 1.0, 0]]).T
    pre = h @ np.array([0.5, -0.5, 1.0]) + 0.25
    normed = (pre - 0.1) / np.sqrt(4.0 + 1e-5) * 1.5 - 0.2
    temperature = 1 / (1 + np.exp(-normed)) + 1e-12
    expected = cos / temperature[:, None]
    logits = head(t(h))
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(head.temperature(t(h)).detach().numpy(), temperature, rtol=1e-10)
    # AbeT's score: S = LSE(c / T) (higher = ID); the OOD score is the registered energy detector, -LSE(logits)
    from oodguard import detectors

    energy = detectors.create("energy").score({"logits": logits.detach().numpy()})
    np.testing.assert_allclose(energy, -np_lse(expected), rtol=1e-10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: OutlierExposureLoss()(torch.zeros(2, 3), torch.tensor([0, 5]), torch.zeros(1, 3)), "labels must lie"),
        (lambda: OutlierExposureLoss()(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(0, 3)), "empty"),
        (lambda: LogitNormLoss(tau=0), "tau must be > 0"),
        (lambda: MixOELoss()(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 3), 0.5), "logits_mix must match"),
        (lambda: mix_outliers(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2), "mixup", 0.5), "at least as many"),
        (lambda: mix_outliers(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "blend", 0.5), "mix_op"),
    ],
)
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: OutlierExposureLoss(weight=-0.5), "weight must be >= 0"),
        (lambda: EnergyMarginLoss(weight=-0.1), "weight must be >= 0"),
        (lambda: MixOELoss(oe_weight=-5.0), "oe_weight must be >= 0"),
        (lambda: AbsentCategoryLoss(weight=-1.0), "weight must be >= 0"),
        (lambda: OutlierExposureLoss(weight=float("nan")), "weight must be a finite number"),
        (lambda: MixOELoss.soft_targets(torch.tensor([0]), 1.5, 3), "lam .* must lie in \\[0, 1\\]"),
        (lambda: MixOELoss.soft_targets(torch.tensor([0, 1]), torch.tensor([0.5, -0.1]), 3), "must lie in \\[0, 1\\]"),
        (lambda: MixOELoss()(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3), -0.2), "must lie in"),
        (lambda: rand_bbox(8, 8, 1.2), "must lie in \\[0, 1\\]"),
        (lambda: rand_bbox(0, 8, 0.5), "height must be a positive integer"),
        (lambda: mix_outliers(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "mixup", float("nan")), "lam"),
        (lambda: sample_lambda(float("nan"), 1.0), "mix_alpha and mix_beta must be > 0"),
    ],
)
def test_hyperparameters_out_of_range_are_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_zero_weights_switch_the_outlier_term_off():
    ce = np_ce(LOGITS_IN, LABELS)
    assert float(OutlierExposureLoss(0)(t(LOGITS_IN), torch.tensor(LABELS), t(LOGITS_OUT))) == pytest.approx(ce)
    assert MixOELoss.soft_targets(torch.tensor([1]), 0, 2).tolist() == [[0.5, 0.5]]  # lam = 0: uniform target


# Method-level losses: what a training step minimises, rebuilt in numpy from the same random draws.


def tiny_image_model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes)).double()


def logits_of(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


def np_soft_ce(z, targets) -> float:
    return float(-(targets * np_log_softmax(z)).sum(axis=1).mean())


@pytest.mark.parametrize("mix_op, n_out", [("mixup", 8), ("cutmix", 8), ("mixup", 3), ("cutmix", 3)])
def test_mixoe_step_loss_is_ce_plus_weighted_soft_ce_on_the_mixed_batch(mix_op, n_out):
    from oodguard.train import create_method

    rng = np.random.default_rng(5)
    x_in = rng.normal(size=(8, 1, 4, 4))
    labels = np.arange(8) % 3
    x_out = rng.normal(3.0, 1.0, size=(n_out, 1, 4, 4))
    model = tiny_image_model()
    method = create_method("mixoe", mix_op=mix_op)
    got = method.loss(model, torch.tensor(x_in), torch.tensor(labels), torch.tensor(x_out),
                      torch.Generator().manual_seed(7))  # fmt: skip
    # the same draws in the same order: lam ~ Beta(alpha, alpha) first, then (cutmix) the box
    g = torch.Generator().manual_seed(7)
    lam = sample_lambda(method.mix_alpha, method.mix_beta, g)
    # a short outlier batch is extended by repeating each row (row order 0,0,0,1,1,1,2,2 for 3 rows and 8 IDs)
    partners = x_out[np.repeat(np.arange(n_out), -(-8 // n_out))[:8]]
    if mix_op == "mixup":
        mixed, share = lam * x_in + (1 - lam) * partners, lam
    else:
        top, left, bottom, right = rand_bbox(4, 4, lam, g)
        mixed = x_in.copy()
        mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        share = 1 - (bottom - top) * (right - left) / 16  # lambda reset to the ID share of the pixels
        assert share != pytest.approx(lam)  # else the test could not tell the reset from the drawn lambda
    soft = np.full((8, 3), (1 - share) / 3)
    soft[np.arange(8), labels] += share
    expected = np_ce(logits_of(model, x_in), labels) + 5.0 * np_soft_ce(logits_of(model, mixed), soft)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)


def test_dos_and_abet_step_losses():
    from oodguard.train import create_method

    rng = np.random.default_rng(6)
    x_in, labels, x_out = rng.normal(size=(6, 1, 4, 4)), np.arange(6) % 2, rng.normal(size=(5, 1, 4, 4))
    dos = create_method("dos", weight=0.7, num_keep=2, num_clusters=2)
    model = dos.prepare(tiny_image_model(classes=2))  # 2 known classes + the absent one
    got = dos.loss(model, torch.tensor(x_in), torch.tensor(labels), torch.tensor(x_out), torch.Generator())
    expected = np_ce(logits_of(model, x_in), labels) + 0.7 * np_ce(logits_of(model, x_out), np.full(5, 2))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-10)
    abet = create_method("abet")
    model = abet.prepare(tiny_image_model(classes=2)).eval()
    got = abet.loss(model, torch.tensor(x_in), torch.tensor(labels), None, torch.Generator())
    assert float(got.detach()) == pytest.approx(np_ce(logits_of(model, x_in), labels), rel=1e-10)
