"""The two detector protocols and declared parameters, for every registered detector, and model detectors end to
end in a Guard (fit, calibrate, guard, save, load) and through the benchmark runner's protocol."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

from oodguard import Guard, detectors, load_guard
from oodguard.detectors.base import OutputDetector, Source, clone
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Constraint

ALL = detectors.available()
MODEL = detectors.available(protocol="model")
#: Model detectors that run a model on tensors (ahm embeds raw texts with a text encoder: tests/test_detectors_ahm.py).
ON_TENSORS = [name for name in MODEL if detectors.info(name)["input_kind"] == "tensors"]
FACTORY = "oodguard.benchmark.digits_model:DigitsCNN"
#: Parameters that make each model detector work on the digits CNN and a dozen images.
MODEL_PARAMS = {
    "nac_layers": {"layers": ["features.2", "<features>"], "alpha": [0.1, 100.0]},
    "mahalanobis_ensemble": {"layers": ["features.2", "<features>"]},
    "adascale": {"n_fit": 20},
    "cover": {"views": ["identity", "brightness-1", "fog-2"]},
    "mcdropout": {"samples": 3},
}
#: Model detectors that need more than the digits CNN has (MC dropout needs dropout layers): their model factory.
MODEL_FACTORY = {"mcdropout": "guard_factory:make_dropout_cnn", "rotation": "guard_factory:make_rotation_cnn"}


def model_for(name: str, cnn: torch.nn.Module) -> torch.nn.Module:
    """The digits CNN, or the model of ``MODEL_FACTORY`` with the same seeded weights."""
    if name not in MODEL_FACTORY:
        return cnn
    import guard_factory

    model = getattr(guard_factory, MODEL_FACTORY[name].split(":")[1])()
    (model.model if hasattr(model, "rotation_head") else model).load_state_dict(cnn.state_dict())
    return model


def required_params(name: str) -> dict:
    from test_detector_contract import detector_params

    return {**detector_params(name), **MODEL_PARAMS.get(name, {})}


def test_both_protocols_are_registered():
    assert {"odin", "adascale", "cover", "mahalanobis_ensemble", "nac_layers", "gradnorm_autograd"} <= set(MODEL)
    assert set(detectors.available(protocol="outputs")) == set(ALL) - set(MODEL)
    with pytest.raises(ValueError, match="protocol must be one of"):
        detectors.available(protocol="gradients")


@pytest.mark.parametrize("name", ALL)
def test_registry_protocol_matches_the_class(name):
    cls = detectors.implementation(name)
    expected = ModelDetector if detectors.info(name)["protocol"] == "model" else OutputDetector
    assert issubclass(cls, expected) and cls.name == name


@pytest.mark.parametrize("name", ALL)
def test_constructor_declares_every_parameter_with_its_default(name):
    cls = detectors.implementation(name)
    signature = inspect.signature(cls)
    for parameter in signature.parameters.values():
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{parameter.name} must be keyword-only"
        assert parameter.default is not inspect.Parameter.empty, f"{name}.{parameter.name} has no default"
        assert not isinstance(parameter.default, (list, dict, set)), f"{name}.{parameter.name}: mutable default"
    assert tuple(signature.parameters) == cls.param_names()
    assert detectors.info(name)["defaults"] == {p.name: p.default for p in signature.parameters.values()}
    constraints = cls._parameter_constraints
    assert set(constraints) == set(cls.param_names()), f"{name}: constraints must cover exactly its parameters"
    for alternatives in constraints.values():
        assert alternatives and all(a is None or isinstance(a, Constraint) for a in alternatives)


@pytest.mark.parametrize("name", ALL)
def test_get_params_returns_values_as_given_and_clone_round_trips(name):
    params = required_params(name)
    detector = detectors.create(name, **params)
    got = detector.get_params()
    assert set(got) == set(detectors.implementation(name).param_names())
    for key, value in params.items():
        assert got[key] is value, f"{name}: parameter {key!r} was rewritten"
    twin = clone(detector)
    assert type(twin) is type(detector) and twin is not detector
    assert not twin.is_fitted or not twin.needs_fit
    for key, value in got.items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            np.testing.assert_array_equal(np.asarray(twin.get_params()[key]), np.asarray(value))
        else:
            assert twin.get_params()[key] == value


@pytest.mark.parametrize("name", ALL)
def test_set_params_validates_and_rolls_back(name):
    detector = detectors.create(name, **required_params(name))
    before = detector.get_params()
    with pytest.raises(TypeError, match="unknown parameter"):
        detector.set_params(not_a_parameter=1)
    numeric = [k for k, v in before.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numeric:
        key = numeric[0]
        with pytest.raises(ValueError, match=f"parameter '{key}' must be"):
            detector.set_params(**{key: float("nan")})
        assert detector.get_params()[key] == before[key]


def test_one_error_format_for_bad_parameters():
    with pytest.raises(ValueError, match=r"^knn: parameter 'k' must be an integer >= 1; got 0$"):
        detectors.create("knn", k=0)
    with pytest.raises(ValueError, match=r"^odin: parameter 'temperature' must be a finite number > 0; got -1$"):
        detectors.create("odin", temperature=-1)


def test_old_spellings_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="gradnorm_autograd"):
        detector = detectors.create("gradnorm", mode="autograd", temperature=2.0)
    assert detector.name == "gradnorm_autograd" and detector.temperature == 2.0
    with pytest.warns(DeprecationWarning, match="nac_layers"):
        detector = detectors.create("nac", layers=["<features>"])
    assert detector.name == "nac_layers"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detectors.create("gradnorm").name == "gradnorm"


def test_a_model_detector_without_a_model_says_so():
    detector = detectors.create("odin")
    with pytest.raises(ValueError, match="runs the model itself"):
        detector.fit_from(Source({"logits": np.zeros((3, 2), dtype=np.float32)}))


@pytest.mark.parametrize("name", ON_TENSORS)
def test_model_detectors_fit_and_score_through_a_source(name, cnn, images):
    from oodguard.extraction import ModelRunner

    images = torch.cat([images, images.flip(-1)])  # two fit images per class for the class-conditional fits
    labels = torch.arange(len(images)) % 10
    cnn = model_for(name, cnn)
    runner = ModelRunner(cnn)
    fit = Source(data=images, labels=labels, runner=runner)
    detector = detectors.create(name, **required_params(name)).fit_from(fit)
    scores = detector.score_from(Source(data=images[:5], runner=runner))
    assert scores.shape == (5,) and torch.isfinite(torch.as_tensor(scores)).all()
    attached = detectors.create(name, **required_params(name)).attach(cnn).fit(images, labels=labels)
    np.testing.assert_allclose(np.asarray(attached.score(images[:5])), np.asarray(scores), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_TENSORS)
def test_guard_fits_calibrates_guards_saves_and_loads_every_model_detector(name, cnn, tmp_path):
    generator = torch.Generator().manual_seed(3)
    fit_images = torch.rand(20, 1, 28, 28, generator=generator)
    calibration = torch.rand(30, 1, 28, 28, generator=generator)
    labels = torch.arange(20) % 10
    factory = MODEL_FACTORY.get(name, FACTORY)
    guard = Guard(model_for(name, cnn), name, detector_params=required_params(name), model_factory=factory)
    guard.fit(fit_images, labels=labels).calibrate(calibration, tpr=0.9)
    test = torch.cat([calibration[:4], torch.ones(2, 1, 28, 28)])  # inputs stay in [0, 1] (CoVer's views need it)
    result = guard.guard(test)
    assert result.score.shape == (6,) and np.isfinite(result.score).all()
    assert result.prediction.shape == (6,) and (result.prediction >= 0).all()
    guard.save(tmp_path / "guard")
    loaded = load_guard(tmp_path / "guard", model_factory=factory)
    assert loaded.detector.name == name and loaded.detector.protocol == "model"
    np.testing.assert_allclose(loaded.score(test), guard.score(test), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(loaded.guard(test).is_ood, result.is_ood)
