"""Self-supervised rotation training (oodguard.train 'rotation') and its 'rotation' detector."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodguard import detectors
from oodguard.detectors.model.rotation import rotation_score
from oodguard.extraction import extract
from oodguard.train import Recipe, RotationNet, create_method, train
from oodguard.train.heads import rotations


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


def _corner_images(n=96, seed=0):
    """A bright top-left corner and a class-coded stripe: rotations are easy to tell apart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    images[:, :, :3, :3] += 0.8
    images[torch.arange(n), 0, 5, 2 + 2 * labels] += 0.6
    return images, labels


def test_the_head_sees_each_image_at_four_rotations_with_labels_0_to_3():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    turned, labels = rotations(torch.cat([image, image + 100]))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):
        assert torch.equal(turned[2 * k], torch.rot90(image[0], k, dims=(1, 2)))
        assert torch.equal(turned[2 * k + 1], torch.rot90(image[0] + 100, k, dims=(1, 2)))
    # 90 degrees counter-clockwise: the top row becomes the left column read upwards
    assert turned[2, 0, :, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="square images"):
        rotations(torch.zeros(2, 1, 4, 6))


def test_the_score_is_its_parts_combined_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, rotation_logits = torch.randn(5, 3, generator=g), torch.randn(20, 4, generator=g)
    p = torch.softmax(logits.double(), dim=1).numpy()
    q = torch.softmax(rotation_logits.double(), dim=1).numpy()
    expected = []
    for i in range(5):
        divergence = sum((1 / 3) * math.log2((1 / 3) / p[i, k]) for k in range(3))
        rotation_loss = np.mean([-math.log2(q[r * 5 + i, r]) for r in range(4)])
        expected.append(rotation_loss - divergence)
    np.testing.assert_allclose(rotation_score(logits, rotation_logits).numpy(), expected, rtol=1e-12)


def test_the_wrapped_model_keeps_its_logits_and_its_features_for_extraction():
    model = _model()
    x, _ = _corner_images(10)
    before = model(x)
    wrapped = RotationNet(model)
    torch.testing.assert_close(wrapped(x), before)
    outputs = extract(wrapped, x, progress=False)
    assert outputs.features.shape == (10, 16)  # the final linear layer is still found
    logits, rotation_logits = wrapped.logits_and_rotation(x)
    assert rotation_logits.shape == (10, 4) and wrapped._tap.last_input is None


def test_training_learns_the_rotations_and_the_detector_scores_rotated_worlds_higher():
    x, y = _corner_images(192)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    method = create_method("rotation")
    result = train(_model(), loader, method, None, recipe=Recipe(epochs=25, lr=0.05, schedule="constant"),
                   progress=False)  # fmt: skip
    network = result.model.eval()
    turned, targets = rotations(x)
    with torch.no_grad():
        _, rotation_logits = network.logits_and_rotation(turned)
    assert float((rotation_logits.argmax(dim=1) == targets).double().mean()) > 0.95
    detector = detectors.create("rotation").attach(network)
    id_scores = detector.score(x)
    # images whose "upright" is another one: the head cannot tell their rotation, the score rises
    ood = torch.rot90(_corner_images(96, seed=1)[0], 2, dims=(2, 3))
    assert float((detector.score(ood) > id_scores.median()).double().mean()) > 0.9
    with torch.no_grad():
        logits, rotation_logits = network.logits_and_rotation(rotations(x[:7])[0])
    torch.testing.assert_close(detector.score(x[:7]), rotation_score(logits[:7], rotation_logits))


def test_the_detector_refuses_models_without_the_head_and_non_square_images():
    with pytest.raises(ValueError, match="no rotation head; train it with oodguard.train's 'rotation' method"):
        detectors.create("rotation").attach(_model()).score(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="square images"):
        detectors.create("rotation").attach(RotationNet(_model())).score(torch.rand(4, 1, 8, 6))


def test_benchmarks_leave_it_out_unless_the_model_has_the_head():
    from oodguard.benchmark.runner import _model_detectors_for, skipped_detectors
    from oodguard.outputs import ModelOutputs

    images = torch.rand(4, 1, 8, 8)
    assert "rotation" not in _model_detectors_for(images)
    reasons = skipped_detectors(ModelOutputs(logits=torch.rand(4, 3)), [], inputs=images)
    assert "auxiliary head" in reasons["rotation"]
