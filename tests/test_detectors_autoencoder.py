"""ae_mahalanobis and sage: known answers against scikit-learn and hand computations, seeded training, save/load."""

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from oodguard import detectors
from oodguard.detectors.autoencoder import upper_tail
from oodguard.detectors.trained import split_rows
from oodguard.outputs import ModelOutputs


def _outputs(n, seed, shift=0.0, classes=4, dim=12):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    features = centres[labels] + torch.randn(n, dim, generator=g) + shift
    return ModelOutputs(features=features, labels=labels)


FAST = {"epochs": 15, "hidden": 32}


@pytest.fixture(scope="module")
def fitted():
    fit = _outputs(800, 1)
    # holdout=0: the latent Gaussian and the standardisation both come from every fit row (known answers below)
    return fit, detectors.create("ae_mahalanobis", latent_dim=4, ridge=0.0, holdout=0.0, **FAST).fit(fit)


def _codes(detector, outputs):
    state = detector.state_
    x = (outputs.features.double() - state["feature_mean"]) / state["feature_std"]
    with torch.no_grad():
        return detector._cached_networks()["encoder"](x).numpy()


def test_the_latent_distance_is_scikit_learns_mahalanobis_on_the_codes(fitted):
    fit, detector = fitted
    test = _outputs(300, 2, shift=0.5)
    reference = EmpiricalCovariance().fit(_codes(detector, fit))
    distance, _ = detector.terms(test)
    np.testing.assert_allclose(distance.numpy(), reference.mahalanobis(_codes(detector, test)), rtol=1e-6)


def test_the_score_is_the_standardised_terms_weighted_by_hand(fitted):
    fit, detector = fitted
    test = _outputs(300, 2, shift=0.5)
    md_fit, re_fit = detector.terms(fit)
    md, re = detector.terms(test)
    for alpha, beta in ((1.0, 1.0), (2.0, 0.0), (0.0, 0.5)):
        detector.set_params(alpha=alpha, beta=beta)
        expected = alpha * (md - md_fit.mean()) / md_fit.std() + beta * (re - re_fit.mean()) / re_fit.std()
        torch.testing.assert_close(detector.score(test).double(), expected.float().double(), rtol=1e-5, atol=1e-5)
    detector.set_params(alpha=1.0, beta=1.0)


def test_held_out_rows_standardise_and_stay_out_of_training():
    fit = _outputs(500, 1)
    detector = detectors.create("ae_mahalanobis", latent_dim=4, holdout=0.2, **FAST).fit(fit)
    train, held_out = split_rows(500, 0.2, 0)
    assert len(held_out) == 100 and not set(train.tolist()) & set(held_out.tolist())
    md, re = detector.terms(ModelOutputs(features=fit.features[held_out]))
    state = detector.state_
    torch.testing.assert_close(state["md_mean"], md.mean())
    torch.testing.assert_close(state["re_std"], re.std())
    codes = _codes(detector, fit)
    torch.testing.assert_close(state["latent_mean"], torch.from_numpy(codes[train.numpy()].mean(axis=0)))
    # the scaling of the features, too, comes from the training rows only
    torch.testing.assert_close(state["feature_mean"], fit.features[train].double().mean(dim=0))


def test_training_is_seeded_and_a_saved_detector_scores_the_same(tmp_path, fitted):
    fit, detector = fitted
    test = _outputs(200, 3)
    again = detectors.create("ae_mahalanobis", latent_dim=4, ridge=0.0, holdout=0.0, **FAST).fit(fit)
    assert torch.equal(again.score(test), detector.score(test))
    other_seed = detectors.create("ae_mahalanobis", latent_dim=4, ridge=0.0, holdout=0.0, seed=1, **FAST).fit(fit)
    assert not torch.equal(other_seed.score(test), detector.score(test))
    detector.save(tmp_path / "ae")
    assert torch.equal(detectors.load(tmp_path / "ae").score(test), detector.score(test))
    assert torch.get_num_threads() >= 1  # the training restored the thread count it changed


def test_far_inputs_score_higher_and_bad_input_is_refused():
    fit = _outputs(600, 1)
    for name in ("ae_mahalanobis", "sage"):
        detector = detectors.create(name, **FAST).fit(fit)
        near, far = detector.score(_outputs(200, 2)), detector.score(_outputs(200, 3, shift=4.0))
        assert float((far > near.median()).double().mean()) > 0.95
    with pytest.raises(ValueError, match="N=10 rows for a latent space of 16 dimensions"):
        detectors.create("ae_mahalanobis", holdout=0.0).fit(_outputs(10, 1))
    with pytest.raises(ValueError, match=r"N=18 rows \(16 after holding out 2\) for a latent space of 16"):
        detectors.create("ae_mahalanobis").fit(_outputs(18, 1))
    with pytest.raises(ValueError, match="leaves 1 row"):
        detectors.create("ae_mahalanobis", latent_dim=2, holdout=0.05).fit(_outputs(20, 1))
    with pytest.raises(ValueError, match="k=25 neighbours need more than 25 fit rows"):
        detectors.create("sage", latent_dim=2).fit(_outputs(20, 1))
    with pytest.raises(ValueError, match="alpha"):
        detectors.create("ae_mahalanobis", alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="sage: fit needs labels"):
        detectors.create("sage").fit({"features": np.zeros((50, 3))})


def test_sage_is_the_geometric_mean_of_its_tail_probabilities_computed_by_hand():
    fit, test = _outputs(500, 1), _outputs(120, 4, shift=1.0)
    detector = detectors.create("sage", latent_dim=3, k=5, **FAST).fit(fit)
    parts = detector.measures(test)
    state = detector.state_
    codes = _codes(detector, test)
    bank = state["codes"].numpy()
    l1 = np.abs(codes[:, None, :] - bank[None, :, :]).sum(-1)
    dist = np.log(np.sort(l1, axis=1)[:, :5].mean(1))
    np.testing.assert_allclose(parts["dist"].numpy(), dist, rtol=1e-9)
    for name in ("dist", "rloss", "task"):
        reference = state[f"reference.{name}"].numpy()
        by_hand = (reference[None, :] >= parts[name].numpy()[:, None]).mean(1)  # share of fit values >= m(x)
        np.testing.assert_allclose(parts[f"P_{name}"].numpy(), by_hand)
    sage = np.cbrt(parts["P_dist"].numpy() * parts["P_rloss"].numpy() * parts["P_task"].numpy())
    np.testing.assert_allclose(detector.score(test).double().numpy(), 1 - sage, rtol=1e-6, atol=1e-7)
    # the fit rows' own distances leave out the row itself: its code is at distance 0 from itself
    fit_l1 = np.abs(bank[:, None, :] - bank[None, :, :]).sum(-1)
    own = np.log(np.sort(fit_l1, axis=1)[:, 1:6].mean(1))
    np.testing.assert_allclose(state["reference.dist"].numpy(), np.sort(own), rtol=1e-9)


def test_upper_tail_counts_ties_as_at_or_above():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    values = torch.tensor([0.5, 2.0, 2.5, 3.0, 4.0], dtype=torch.float64)
    assert upper_tail(reference, values).tolist() == [1.0, 0.75, 0.25, 0.25, 0.0]


# ---------------------------------------------------------------------- msma
def test_msma_learns_the_analytic_score_norms_of_a_gaussian():
    # ID = N(mu, 4 I): standardised it is N(0, I), whose noise-perturbed density at level sigma is
    # N(0, (1 + sigma^2) I) with score -x / (1 + sigma^2), so phi_i(x) = sigma_i ||x|| / (1 + sigma_i^2).
    g = torch.Generator().manual_seed(0)
    fit = ModelOutputs(features=torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2 + 5)
    test = ModelOutputs(features=torch.randn(500, 3, generator=g, dtype=torch.float64) * 2 + 5)
    detector = detectors.create("msma", levels=4, sigma_min=0.25, hidden=64, epochs=40, components=(2,)).fit(fit)
    norms = detector.score_norms(test)
    state = detector.state_
    x = (test.features - state["feature_mean"]) / state["feature_std"]
    sigmas = state["sigmas"]
    analytic = sigmas[None, :] * torch.linalg.vector_norm(x, dim=1, keepdim=True) / (1 + sigmas[None, :] ** 2)
    relative = ((norms - analytic).abs() / analytic).median(dim=0).values
    # denoising score matching estimates the score from noisy samples; 4,000 rows and 40 epochs leave a few
    # per cent of error, growing as sigma shrinks (the target e / sigma dominates the signal): 15 % bounds it
    assert bool((relative < 0.15).all()), relative


def test_msma_mixture_density_is_scikit_learns_and_the_score_its_negative():
    from sklearn.mixture import GaussianMixture

    from oodguard.detectors.autoencoder import gaussian_mixture_log_density

    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 4)) + rng.integers(0, 3, size=(300, 1)) * 3
    mixture = GaussianMixture(3, covariance_type="full", random_state=0).fit(points)
    ours = gaussian_mixture_log_density(
        torch.from_numpy(points), *(torch.from_numpy(a) for a in (mixture.weights_, mixture.means_,
                                                                   mixture.precisions_cholesky_))
    )  # fmt: skip
    np.testing.assert_allclose(ours.numpy(), mixture.score_samples(points), rtol=1e-10)
    fit, test = _outputs(600, 1), _outputs(100, 2, shift=2.0)
    detector = detectors.create("msma", levels=3, epochs=5, hidden=32, components=(1, 2)).fit(fit)
    state = detector.state_
    phi = (detector.score_norms(test) - state["phi_mean"]) / state["phi_std"]
    expected = -gaussian_mixture_log_density(
        phi, state["gmm_weights"], state["gmm_means"], state["gmm_precision_cholesky"]
    )
    torch.testing.assert_close(detector.score(test).double(), expected.float().double(), rtol=1e-5, atol=1e-5)


def test_msma_is_seeded_saves_and_refuses_bad_input(tmp_path):
    fit, test = _outputs(400, 1), _outputs(50, 2)
    params = {"levels": 3, "epochs": 5, "hidden": 32, "components": (1, 2)}
    detector = detectors.create("msma", **params).fit(fit)
    assert torch.equal(detectors.create("msma", **params).fit(fit).score(test), detector.score(test))
    detector.save(tmp_path / "msma")
    assert torch.equal(detectors.load(tmp_path / "msma").score(test), detector.score(test))
    with pytest.raises(
        ValueError, match="N=15 rows; the mixture needs at least 20 for its 10-fold choice of components"
    ):
        detectors.create("msma", **params).fit(_outputs(15, 1))
    with pytest.raises(ValueError, match="sigma_min"):
        detectors.create("msma", sigma_min=2.0)


@pytest.mark.parametrize("name", ["ae_mahalanobis", "sage", "msma"])
def test_a_fitted_state_is_cached_by_content_key(name, tmp_path, monkeypatch):
    from oodguard.detectors import trained as autoencoder

    params = {"epochs": 2, "hidden": 16, "cache_dir": str(tmp_path)}
    params |= {"components": (2,)} if name == "msma" else {"latent_dim": 4}
    fit, test = _outputs(300, 1), _outputs(50, 2)
    first = detectors.create(name, **params).fit(fit)
    assert len(list(tmp_path.glob(f"{name}-*.safetensors"))) == 1
    with monkeypatch.context() as patch:
        cls = type(first)
        patch.setattr(cls, "_train_state", lambda self, outputs: pytest.fail("should come from the cache"))
        again = detectors.create(name, **params).fit(fit)
    assert torch.equal(again.score(test), first.score(test))
    # other rows, other parameters: trained anew, cached beside
    detectors.create(name, **params).fit(_outputs(300, 5))
    detectors.create(name, **{**params, "seed": 3}).fit(fit)
    assert len(list(tmp_path.glob(f"{name}-*.safetensors"))) == 3
    # a damaged cache file is retrained over, not trusted
    for path in tmp_path.glob(f"{name}-*.safetensors"):
        path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    assert torch.equal(detectors.create(name, **params).fit(fit).score(test), first.score(test))
    assert autoencoder.TRAINING_VERSION >= 1


def test_early_stopping_stops_after_two_rises_of_the_held_out_loss():
    from oodguard.detectors.trained import train_networks as _train

    network = torch.nn.ModuleDict({"w": torch.nn.Linear(1, 1)})
    held_out = torch.tensor([0])
    values = iter([1.0, 0.5, 0.6, 0.4, 0.45, 0.5, 0.3])

    def loss_of(index):
        if index is held_out:
            return torch.tensor(next(values))
        return network["w"].weight.square().sum()

    # rises at epochs 3 (0.6 > 0.5) and 5, 6 (0.45 > 0.4, 0.5 > 0.45): two in a row first at epoch 6
    assert _train(network, loss_of, 10, 20, 4, 0.1, held_out) == 6
    assert _train(network, loss_of, 10, 3, 4, 0.1) == 3  # without held-out rows: every epoch


def test_sage_trains_with_the_authors_settings_and_stops_early():
    detector = detectors.create("sage", latent_dim=4, hidden=128, epochs=400)
    assert (detector.lr, detector.batch_size, detector.validation) == (3e-4, 64, 0.1)
    detector.fit(_outputs(200, 1))  # 180 training rows: the network overfits them within a few hundred epochs
    assert 1 <= int(detector.state_["epochs_run"]) < 400
