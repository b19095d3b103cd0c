"""ae_mahalanobis_images and msma_images: the auxiliary-network detectors on the input images themselves."""

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from oodguard import detectors
from oodguard.detectors.model.images import MIN_SIZE

FAST = {"epochs": 3, "width": 4}


def _digits_like(n, seed, size=12, shift=0.0):
    """Blurred strokes on black: a bright bar at a random row, plus noise (an easy ID distribution)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 0.1
    rows = torch.randint(2, size - 2, (n,), generator=g)
    images[torch.arange(n), 0, rows, 2:-2] += 0.8
    return (images + shift).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted_ae():
    fit = _digits_like(400, 1)
    return fit, detectors.create("ae_mahalanobis_images", latent_dim=4, ridge=0.0, holdout=0.0, **FAST).fit(fit)


def _codes(detector, images):
    state = detector.state_
    x = (images.double() - state["pixel_mean"][:, None, None]) / state["pixel_std"][:, None, None]
    with torch.no_grad():
        return detector._cached_networks().encoder(x.float()).double().numpy()


def test_the_latent_distance_is_scikit_learns_mahalanobis_on_the_codes(fitted_ae):
    fit, detector = fitted_ae
    test = _digits_like(100, 2, shift=0.1)
    reference = EmpiricalCovariance().fit(_codes(detector, fit))
    distance, error = detector._terms(test, detector.state(torch.device("cpu"), torch.float64),
                                      detector._cached_networks())  # fmt: skip
    np.testing.assert_allclose(distance.numpy(), reference.mahalanobis(_codes(detector, test)), rtol=1e-5)
    # and the score is the two terms standardised on the (here: all) fit images, weighted 1 and 1
    state = detector.state_
    fit_md, fit_re = detector._terms(fit, detector.state(torch.device("cpu"), torch.float64),
                                     detector._cached_networks())  # fmt: skip
    torch.testing.assert_close(state["md_mean"], fit_md.mean())
    expected = (distance - fit_md.mean()) / fit_md.std() + (error - fit_re.mean()) / fit_re.std()
    torch.testing.assert_close(detector.score(test), expected, rtol=1e-6, atol=1e-6)


def test_msma_images_learns_the_analytic_score_norms_of_gaussian_pixels():
    # i.i.d. N(0.5, 0.2^2) pixels: standardised per channel they are N(0, I) in 64 dimensions, whose density
    # perturbed at level sigma is N(0, (1 + sigma^2) I), score -x / (1 + sigma^2), so
    # phi_i(x) = sigma_i ||x|| / (1 + sigma_i^2). A convolution only has to learn a per-pixel linear map.
    g = torch.Generator().manual_seed(0)
    fit = 0.5 + 0.2 * torch.randn(3000, 1, 8, 8, generator=g)
    test = 0.5 + 0.2 * torch.randn(300, 1, 8, 8, generator=g)
    detector = detectors.create("msma_images", levels=4, sigma_min=0.25, width=8, epochs=20, components=(2,))
    detector.fit(fit)
    norms = detector.score_norms(test)
    state = detector.state_
    x = (test.double() - state["pixel_mean"][:, None, None]) / state["pixel_std"][:, None, None]
    sigmas = state["sigmas"]
    analytic = sigmas[None, :] * torch.linalg.vector_norm(x.flatten(1), dim=1, keepdim=True) / (1 + sigmas**2)
    relative = ((norms - analytic).abs() / analytic).median(dim=0).values
    # denoising score matching estimates the score from noisy samples: a few per cent of error remain after 20
    # epochs on 3,000 images, more at small sigma (the target e / sigma dominates the signal); 15 % bounds it
    assert bool((relative < 0.15).all()), relative


@pytest.mark.parametrize("name", ["ae_mahalanobis_images", "msma_images"])
def test_far_images_score_higher_seeded_saved_and_cached(name, tmp_path, monkeypatch):
    params = {**FAST, "cache_dir": str(tmp_path)}
    params |= {"components": (2,)} if name == "msma_images" else {"latent_dim": 4}
    fit, near, far = _digits_like(400, 1), _digits_like(100, 2), torch.rand(100, 1, 12, 12)
    detector = detectors.create(name, **params).fit(fit)  # no model and no runner needed
    near_scores, far_scores = detector.score(near), detector.score(far)
    assert float((far_scores > near_scores.median()).double().mean()) > 0.95
    assert isinstance(detector.score(near.numpy()), np.ndarray)
    detector.save(tmp_path / "saved")
    assert torch.equal(detectors.load(tmp_path / "saved").score(near), near_scores)
    monkeypatch.setattr(type(detector), "_train_images", lambda self, x: pytest.fail("should come from the cache"))
    assert torch.equal(detectors.create(name, **params).fit(fit).score(near), near_scores)


@pytest.mark.parametrize("name", ["ae_mahalanobis_images", "msma_images"])
def test_bad_images_are_refused_with_what_to_do(name):
    detector = detectors.create(name, **FAST)
    small = torch.rand(300, 1, MIN_SIZE - 1, 20)
    with pytest.raises(ValueError, match=rf"7x20 pixels are too small .*at least 8x8.*{name.removesuffix('_images')}"):
        detector.fit(small)
    with pytest.raises(ValueError, match=r"expects images \[N, C, H, W\]"):
        detector.fit(torch.rand(300, 64))
    bad = _digits_like(300, 1)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        detector.fit(bad)
    detector.fit(_digits_like(300, 1))
    with pytest.raises(ValueError, match=r"fitted on images of shape \[1, 12, 12\], got \[1, 16, 16\]"):
        detector.score(torch.rand(5, 1, 16, 16))


def test_benchmarks_run_them_when_asked_by_name_only():
    from oodguard.benchmark.runner import _model_detectors_for, skipped_detectors
    from oodguard.outputs import ModelOutputs

    assert not {"ae_mahalanobis_images", "msma_images"} & set(_model_detectors_for(torch.rand(4, 1, 12, 12)))
    reasons = skipped_detectors(ModelOutputs(logits=torch.rand(4, 3)), [], inputs=torch.rand(4, 1, 12, 12))
    assert "-d msma_images" in reasons["msma_images"] and "convolutional network" in reasons["msma_images"]
