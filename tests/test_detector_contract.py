"""The contract every registered detector keeps: direction, saving, partial fits and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors import NotFittedError

from detector_data import FEATURE_DIM, NUM_CLASSES, SMALL_DATA_PARAMS, far_outputs, id_outputs
from detector_data import detector_params as shared_detector_params

NAMES = detectors.available(needs_model=False)  # model-based detectors have their own tests
EXPECTED = {
    "msp", "maxlogit", "energy", "gen", "klm", "tempscale", "mahalanobis", "rmds", "knn", "she", "vim",
    "residual", "wdiscood", "react", "dice", "ash", "scale", "fdbd", "nnguide", "gradnorm", "nac", "mos",
    "openmax", "gram", "mcm", "neglabel", "clipn", "lapt",
}  # fmt: skip


def zero_shot_params(name: str) -> dict:
    """Text-side embeddings for the zero-shot detectors on detector_data's clusters: labels at the class means,
    negatives and "no" prompts on the units no class uses (where the far-away cluster lies)."""
    block = FEATURE_DIM // NUM_CLASSES
    labels = np.full((NUM_CLASSES, FEATURE_DIM), 0.3, dtype=np.float32)
    for c in range(NUM_CLASSES):
        labels[c, c * block : (c + 1) * block] = 2.0
    unused = np.zeros(FEATURE_DIM, dtype=np.float32)
    unused[NUM_CLASSES * block :] = 3.0
    negatives = np.abs(np.random.default_rng(7).normal(size=(40, FEATURE_DIM))).astype(np.float32) + unused
    no_labels = 0.3 + np.tile(unused, (NUM_CLASSES, 1))
    params = {
        "mcm": {},
        "neglabel": {"negative_embeddings": negatives, "groups": 10},
        "clipn": {"no_label_embeddings": no_labels},
        "lapt": {"negative_embeddings": negatives, "groups": 10},
    }
    return {"label_embeddings": labels, **params[name]} if name in params else {}


def detector_params(name: str) -> dict:
    return {**shared_detector_params(name), **zero_shot_params(name)}


def fitted(name: str, **extra) -> detectors.Detector:
    detector = detectors.create(name, **{**detector_params(name), **extra})
    return detector.fit(id_outputs(100, seed=1, detector=name))


def pairwise_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    greater = (ood_scores[:, None] > id_scores[None, :]).mean()
    ties = (ood_scores[:, None] == id_scores[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_registry_has_every_issue_detector():
    assert EXPECTED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_info_names_paper_code_and_requirements(name):
    meta = detectors.info(name)
    assert meta["paper"] and meta["code"] and meta["summary"]
    assert set(meta["requires"]) <= {"logits", "features", "layers"}
    assert set(meta["requires"]) <= set(meta["fit_requires"]) | {"logits", "features"}
    json.dumps(meta["defaults"])  # defaults must be JSON-serialisable to be saved


@pytest.mark.parametrize("name", NAMES)
def test_far_cluster_scores_higher_than_id(name):
    detector = fitted(name)
    id_scores = detector.score(id_outputs(20, seed=2, detector=name))
    ood_scores = detector.score(far_outputs(120, seed=3, detector=name))
    assert isinstance(id_scores, np.ndarray) and id_scores.shape == (120,) and id_scores.dtype == np.float64
    assert pairwise_auroc(id_scores, ood_scores) > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_torch_in_torch_out(name):
    detector = fitted(name)
    data = id_outputs(3, seed=2, detector=name)
    as_torch = ModelOutputs(logits=data.logits, features=data.features, layers=data.layers or None)
    scores = detector.score(as_torch)
    assert isinstance(scores, torch.Tensor)
    np.testing.assert_allclose(scores.numpy(), detector.score(data), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_gives_identical_scores(name, tmp_path):
    detector = fitted(name)
    test = ModelOutputs.concat([id_outputs(5, seed=2, detector=name), far_outputs(10, seed=3, detector=name)])
    detector.save(tmp_path / name)
    assert not list((tmp_path / name).glob("*.pkl")) and not list((tmp_path / name).glob("*.pt"))
    loaded = detectors.load(tmp_path / name)
    assert type(loaded) is type(detector) and set(loaded.params) == set(detector.params)
    for key, value in detector.params.items():
        np.testing.assert_array_equal(np.asarray(loaded.params[key]), np.asarray(value))
    np.testing.assert_array_equal(loaded.score(test), detector.score(test))


def test_load_refuses_unknown_version_and_edited_files(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    detector = fitted("knn", k=3)
    path = detector.save(tmp_path / "knn")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    header = json.loads(metadata["oodguard"])
    header["params"]["k"] = 1  # an edit that would still load, and change every score
    save_file(tensors, str(path), metadata={**metadata, "oodguard": json.dumps(header)})
    with pytest.raises(ValueError, match="modified"):
        detectors.load(tmp_path / "knn")
    with pytest.raises(FileNotFoundError):
        detectors.load(tmp_path / "nothing")


def write_version_1(detector: detectors.Detector, directory) -> None:
    """A detector folder exactly as the first release wrote it: config.json + state.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors = {f"stats.{k}": v.contiguous() for k, v in (detector.stats_ or {}).items()}
    aliases = {}
    for key, value in detector.state_.items():
        twin = next((k for k, v in (detector.stats_ or {}).items() if v is value), None)
        if twin is None:
            tensors[f"state.{key}"] = value.contiguous()
        else:
            aliases[key] = twin
    config = {
        "format": "oodguard.detector",
        "format_version": 1,
        "name": detector.name,
        "params": detector.get_params(),
        "meta": detector.meta_,
        "fitted": True,
        "state_aliases": aliases,
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "state.safetensors"))


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "vim", "energy"])
def test_detectors_saved_by_the_first_release_still_load(name, tmp_path):
    detector = fitted(name)
    write_version_1(detector, tmp_path / name)
    test = ModelOutputs.concat([id_outputs(5, seed=2, detector=name), far_outputs(10, seed=3, detector=name)])
    np.testing.assert_array_equal(detectors.load(tmp_path / name).score(test), detector.score(test))
    config = json.loads((tmp_path / name / "config.json").read_text())
    config["format_version"] = 999
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version 999"):
        detectors.load(tmp_path / name)


def test_a_gradnorm_saved_with_mode_autograd_loads_as_the_model_detector(tmp_path):
    directory = tmp_path / "gn"
    directory.mkdir()
    config = {
        "format": "oodguard.detector",
        "format_version": 1,
        "name": "gradnorm",
        "params": {"temperature": 2.0, "mode": "autograd"},
        "meta": {},
        "fitted": True,
        "state_aliases": {},
    }
    (directory / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({}, str(directory / "state.safetensors"))
    with pytest.warns(DeprecationWarning):
        loaded = detectors.load(directory)
    assert loaded.name == "gradnorm_autograd" and loaded.temperature == 2.0


@pytest.mark.parametrize("name", [n for n in NAMES if detectors.info(n)["partial_fit"]])
def test_partial_fit_and_merge_equal_full_fit(name):
    data = id_outputs(30, seed=4, detector=name)
    order = np.random.default_rng(0).permutation(len(data))
    data = data[order]  # chunks then hold mixed classes of unequal counts
    test = ModelOutputs.concat([id_outputs(5, seed=2, detector=name), far_outputs(10, seed=3, detector=name)])
    params = detector_params(name)
    full = detectors.create(name, **params).fit(data).score(test)
    chunked = detectors.create(name, **params)
    for chunk in (data[:50], data[50:51], data[51:]):
        chunked.partial_fit(chunk)
    np.testing.assert_allclose(chunked.score(test), full, rtol=1e-9, atol=1e-9)
    left = detectors.create(name, **params).fit(data[:90])
    right = detectors.create(name, **params).fit(data[90:])
    np.testing.assert_allclose(left.merge(right).score(test), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in NAMES if not detectors.info(n)["partial_fit"]])
def test_partial_fit_refused_where_not_a_sufficient_statistic(name):
    with pytest.raises(TypeError, match="not a sufficient statistic"):
        detectors.create(name, **detector_params(name)).partial_fit(id_outputs(5, seed=1, detector=name))


@pytest.mark.parametrize("name", [n for n in NAMES if detectors.info(n)["needs_fit"]])
def test_score_before_fit_is_refused(name):
    detector = detectors.create(name, **detector_params(name))
    with pytest.raises(NotFittedError, match="before score"):
        detector.score(id_outputs(2, seed=1, detector=name))


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_is_refused(name):
    detector = detectors.create(name, **detector_params(name))
    empty = id_outputs(2, seed=1, detector=name)[:0]
    with pytest.raises(ValueError, match="empty"):
        detector.fit(empty)
    with pytest.raises(ValueError, match="empty"):
        fitted(name).score(empty)


@pytest.mark.parametrize("name", NAMES)
def test_missing_field_is_named(name):
    detector = fitted(name)
    data = id_outputs(3, seed=1, detector=name)
    for field in detectors.info(name)["requires"]:
        without = data.with_fields(**{field: None})
        with pytest.raises(ValueError, match=f"needs {field}"):
            detector.score(without)
    for field in detectors.info(name)["fit_requires"]:
        without = data.with_fields(**{field: None})
        with pytest.raises(ValueError, match=f"needs.*{field}"):
            detectors.create(name, **detector_params(name)).fit(without)


@pytest.mark.parametrize("name", NAMES)
def test_dimension_change_between_fit_and_score_is_refused(name):
    detector = fitted(name)
    data = id_outputs(3, seed=1, detector=name)
    if "features" in detectors.info(name)["requires"]:
        wider = ModelOutputs(
            logits=data.logits, features=torch.cat([data.features, data.features[:, :1]], 1), layers=data.layers or None
        )
        with pytest.raises(ValueError, match="D=33"):
            detector.score(wider)
    if "logits" in detectors.info(name)["requires"]:
        wider = ModelOutputs(
            logits=torch.cat([data.logits, data.logits[:, :1]], 1), features=data.features, layers=data.layers or None
        )
        with pytest.raises(ValueError, match="C="):
            detector.score(wider)


@pytest.mark.parametrize("name", NAMES)
def test_nan_and_wrong_rank_are_refused(name):
    detector = fitted(name)
    data = id_outputs(3, seed=1, detector=name)
    field = next(f for f in ("logits", "features") if f in detectors.info(name)["requires"])
    values = getattr(data, field).numpy().copy()
    values[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector.score({field: values})
    with pytest.raises(ValueError, match="rank"):
        detector.score({field: values[0]})


@pytest.mark.parametrize("name", NAMES)
def test_ood_rows_in_fit_data_refused_unless_dropped(name):
    data = ModelOutputs.concat([id_outputs(40, seed=1, detector=name), far_outputs(7, seed=3, detector=name)])
    params = detector_params(name)
    with pytest.raises(ValueError, match="7 OOD-labelled row"):
        detectors.create(name, **params).fit(data)
    test = id_outputs(3, seed=2, detector=name)
    dropped = detectors.create(name, **params).fit(data, drop_ood=True).score(test)
    clean = detectors.create(name, **params).fit(id_outputs(40, seed=1, detector=name)).score(test)
    np.testing.assert_allclose(dropped, clean, rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_fewer_samples_than_dimensions_gives_finite_scores(name):
    params = {**detector_params(name), **SMALL_DATA_PARAMS.get(name, {})}
    detector = detectors.create(name, **params).fit(id_outputs(3, seed=1, detector=name))  # N=18 < D=32
    scores = detector.score(
        ModelOutputs.concat(
            [
                id_outputs(2, seed=2, detector=name),
                far_outputs(5, seed=3, detector=name),
            ]
        )
    )
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_refused(name):
    with pytest.raises(TypeError, match="unknown parameter"):
        detectors.create(name, not_a_parameter=1)


def test_unknown_detector_lists_available():
    with pytest.raises(ValueError, match="available: .*msp"):
        detectors.create("nope")


@pytest.mark.parametrize("name", [n for n in NAMES if "labels" in detectors.info(n)["fit_requires"]])
def test_a_class_with_a_single_fit_sample_is_refused_or_handled(name):
    data = id_outputs(20, seed=1, detector=name)
    keep = np.r_[np.flatnonzero(data.labels.numpy() != 2), np.flatnonzero(data.labels.numpy() == 2)[:1]]
    detector = detectors.create(name, **detector_params(name))
    try:
        detector.fit(data[keep])
    except ValueError as error:
        assert "class 2" in str(error)
    else:  # methods that need only a mean or a posterior per class may fit; their scores must then be finite
        assert np.isfinite(detector.score(id_outputs(2, seed=2, detector=name))).all()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["params"].update(k=-1), "parameter 'k' must be"),
        (lambda h: h["params"].update(evil=1), "damaged or was edited"),
        (lambda h: h.update(name="os.system"), "unknown detector 'os.system'"),
        (lambda h: h.update(params=[1]), "damaged or was edited"),
        (lambda h: h.update(state_aliases={"bank": "nope"}), "damaged or was edited"),
    ],
)
def test_a_header_edited_with_a_recomputed_digest_is_still_refused_loudly(tmp_path, edit, message):
    """Someone who rewrites the header and its digest still cannot load invalid settings or another class."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from oodguard import persist

    path = fitted("knn", k=3).save(tmp_path / "knn")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = json.loads(handle.metadata()[persist.HEADER_KEY])
    edit(header)
    text = json.dumps(header, sort_keys=True)
    save_file(
        tensors, str(path), metadata={persist.HEADER_KEY: text, persist.DIGEST_KEY: persist._digest(text, tensors)}
    )
    with pytest.raises(ValueError, match=message):
        detectors.load(tmp_path / "knn")
