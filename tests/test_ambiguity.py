"""The true-ambiguity generator and the views beside OOD (misclassified, ambiguous) in benchmark results."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from oodguard.benchmark import ambiguity
from oodguard.benchmark.ambiguity import AmbiguityConfig, generate_ambiguous, load_or_generate, meets_rule
from oodguard.benchmark.digits_data import load_mnist_subset
from oodguard.benchmark.runner import run_on_outputs
from oodguard.benchmark.side_views import side_views
from oodguard.outputs import ModelOutputs

#: A quick generator: three classes, short training. Its rule is the real one.
QUICK = AmbiguityConfig(count=40, autoencoder_epochs=6, ensemble_epochs=3, lines_per_pair=30, iterations=8)


@pytest.fixture(scope="module")
def three_digits():
    images, labels = load_mnist_subset()
    # 300 of each of the classes 0, 1, 2, interleaved (the subset is sorted by class)
    index = torch.stack([torch.nonzero(labels == c).flatten()[:300] for c in range(3)]).T.flatten()
    return images[index], labels[index]


@pytest.fixture(scope="module")
def generated(three_digits):
    return generate_ambiguous(*three_digits, QUICK)


def test_rule_on_hand_made_probabilities():
    config = AmbiguityConfig(margin=0.2, min_pair_mass=0.8)
    pairs = torch.tensor([[0, 1]] * 5)
    mean_rows = [
        [0.45, 0.45, 0.10],  # even split, mass 0.9: kept
        [0.55, 0.30, 0.15],  # gap 0.25 > margin
        [0.38, 0.38, 0.24],  # mass 0.76 < 0.8
        [0.45, 0.45, 0.10],  # the mean is fine but one member ranks class 2 second (below)
        [0.50, 0.41, 0.09],  # gap 0.09, mass 0.91: kept
    ]
    members = torch.tensor([mean_rows, mean_rows, mean_rows], dtype=torch.float64)
    members[0, 3] = torch.tensor([0.60, 0.10, 0.30])
    members[1, 3] = torch.tensor([0.30, 0.65, 0.05])
    members[2, 3] = torch.tensor([0.45, 0.60, -0.05])  # the mean of row 3 stays (0.45, 0.45, 0.10)
    assert meets_rule(members, pairs, config).tolist() == [True, False, False, False, True]
    # the pair's order does not matter
    assert meets_rule(members, pairs.flip(1), config).tolist() == [True, False, False, False, True]


def test_kept_images_meet_the_rule_under_the_reference_ensemble(generated):
    assert 0 < len(generated.images) <= QUICK.count and generated.accepted <= generated.tried == 3 * 30
    assert generated.images.shape[1:] == (1, 28, 28) and generated.images.dtype == torch.float32
    assert 0 <= generated.images.min() and generated.images.max() <= 1
    # judged again, independently of the generator's own bookkeeping
    members = ambiguity.reference_probabilities(generated.ensemble, generated.images)
    mean = members.mean(dim=0)
    pairs = generated.pairs
    assert (pairs[:, 0] < pairs[:, 1]).all() and pairs.max() < 3
    assert {tuple(pair) for pair in pairs.tolist()} == {(0, 1), (0, 2), (1, 2)}  # every pair of classes
    p_a, p_b = mean.gather(1, pairs[:, :1])[:, 0], mean.gather(1, pairs[:, 1:])[:, 0]
    assert ((p_a - p_b).abs() <= QUICK.margin).all()
    assert ((p_a + p_b) >= QUICK.min_pair_mass).all()
    for probabilities in [mean, *members]:
        assert (probabilities.topk(2, dim=1).indices.sort(dim=1).values == pairs).all()
    torch.testing.assert_close(generated.probabilities, mean.float())


def test_round_robin_takes_one_per_pair_in_turn():
    pair_ids = torch.tensor([7] * 10 + [3] * 2 + [5])
    taken = ambiguity._round_robin(pair_ids, 6, torch.Generator().manual_seed(0))
    assert len(set(taken.tolist())) == 6
    assert sorted(pair_ids[taken].tolist()) == [3, 3, 5, 7, 7, 7]


def test_the_ensemble_is_not_the_model_under_test_and_learns(generated, three_digits):
    images, labels = three_digits
    members = ambiguity.reference_probabilities(generated.ensemble, images)
    assert len(generated.ensemble) == 3
    for probabilities in members:
        assert (probabilities.argmax(dim=1) == labels).double().mean() > 0.9


def test_cache_round_trip_and_key(three_digits, tmp_path, monkeypatch):
    images, labels = three_digits[0][:300], three_digits[1][:300]
    config = AmbiguityConfig(count=10, autoencoder_epochs=5, ensemble_epochs=3, lines_per_pair=10, iterations=6)
    first, pairs = load_or_generate(images, labels, tmp_path, config)
    assert len(list(tmp_path.glob("ambiguity-*.safetensors"))) == 1
    monkeypatch.setattr(ambiguity, "generate_ambiguous", lambda *a, **k: pytest.fail("should come from the cache"))
    again, again_pairs = load_or_generate(images, labels, tmp_path, config)
    assert torch.equal(first, again) and torch.equal(pairs, again_pairs)
    other = ambiguity.generation_key(images, labels, AmbiguityConfig(count=11))
    assert other != ambiguity.generation_key(images, labels, config)
    flipped = images.clone()
    flipped[0, 0, 0, 0] += 0.5
    assert ambiguity.generation_key(flipped, labels, config) != ambiguity.generation_key(images, labels, config)


def test_generation_is_seeded(three_digits):
    images, labels = three_digits[0][:300], three_digits[1][:300]
    config = AmbiguityConfig(count=10, autoencoder_epochs=5, ensemble_epochs=3, lines_per_pair=10, iterations=6)
    threads = torch.get_num_threads()
    first, second = generate_ambiguous(images, labels, config), generate_ambiguous(images, labels, config)
    assert torch.equal(first.images, second.images) and torch.equal(first.pairs, second.pairs)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.zeros(10, 3, 28, 28), torch.zeros(10, dtype=torch.long), r"\[N, 1, 28, 28\]"),
        (torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), "at least 2 classes"),
        (torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 1, -1]), "class indices"),
    ],
)
def test_bad_input(images, labels, message):
    with pytest.raises(ValueError, match=message):
        generate_ambiguous(images, labels, QUICK)


def test_bad_config():
    with pytest.raises(ValueError, match="margin"):
        AmbiguityConfig(margin=0)
    with pytest.raises(ValueError, match="iterations"):
        AmbiguityConfig(iterations=0)


# ---------------------------------------------------------------------------------------------- side views
def test_side_views_against_scikit_learn():
    rng = np.random.default_rng(0)
    id_scores, letters, photos, amb = (
        rng.normal(size=50),
        rng.normal(1, size=30),
        rng.normal(2, size=20),
        rng.normal(0.5, size=25),
    )
    correct = rng.random(50) > 0.2
    scores = {"det": {"id": id_scores, "letters": letters, "photos": photos, "amb": amb, "noise": rng.normal(size=5)}}
    groups = {"near": ["letters"], "far": ["photos"], "synthetic": ["noise"], "ambiguous": ["amb"]}
    views = side_views(scores, groups, correct).set_index("detector")
    assert views.loc["det", "misclassified AUROC"] == pytest.approx(roc_auc_score(~correct, id_scores))
    both = np.r_[id_scores, amb]
    assert views.loc["det", "ambiguous AUROC"] == pytest.approx(roc_auc_score(np.r_[[0] * 50, [1] * 25], both))
    split = [roc_auc_score(np.r_[[0] * 25, [1] * len(s)], np.r_[amb, s]) for s in (letters, photos)]
    assert views.loc["det", "OOD vs ambiguous AUROC"] == pytest.approx(np.mean(split))


def test_side_views_leave_out_what_the_run_cannot_fill():
    scores = {"det": {"id": np.arange(4.0), "far": np.arange(4.0) + 1}}
    assert side_views(scores, {"far": ["far"]}, None).empty
    assert side_views(scores, {"far": ["far"]}, np.ones(4, dtype=bool)).empty  # no error to detect
    views = side_views(scores, {"far": ["far"]}, np.array([True, False, True, True]))
    assert list(views["misclassified AUROC"]) == [pytest.approx(1 / 3)]
    assert views["ambiguous AUROC"].isna().all()


def test_results_show_the_views_beside_the_leaderboard(tmp_path):
    rng = np.random.default_rng(1)
    labels = torch.arange(200) % 4
    logits = torch.from_numpy(rng.normal(size=(200, 4))) + 3 * torch.nn.functional.one_hot(labels, 4)
    logits[:20] = torch.from_numpy(rng.normal(size=(20, 4)))  # a few confused rows
    outputs = ModelOutputs(logits=logits.float(), labels=labels)
    ood = ModelOutputs(logits=torch.from_numpy(rng.normal(size=(60, 4))).float())
    amb = ModelOutputs(logits=torch.from_numpy(rng.normal(size=(60, 4)) + 1.5).float())
    results = run_on_outputs(
        "toy", outputs, outputs, [("far-set", "far", ood), ("amb", "ambiguous", amb)], detectors=["msp", "energy"],
        n_boot=10, progress=False,
    )  # fmt: skip
    assert set(results.views["detector"]) == {"msp", "energy"}
    assert results.views[["misclassified AUROC", "ambiguous AUROC", "OOD vs ambiguous AUROC"]].notna().all().all()
    markdown = results.to_markdown()
    header = markdown.splitlines()[2]
    assert "ambiguous" not in header and "far AUROC" in header  # not an OOD column of the leaderboard
    assert "| detector | misclassified AUROC | ambiguous AUROC | OOD vs ambiguous AUROC |" in markdown
    paths = results.save(tmp_path)
    html = paths["html"].read_text()
    assert "renderViews" in html and '"OOD vs ambiguous AUROC"' in html
    saved = pd.read_json(paths["json"], typ="series")
    assert len(saved["views"]) == 2
