"""The Ray engine on a real local Ray (2 CPUs): distributed extraction, fit and score equal the local ones."""

import pytest
import torch

from oodguard import detectors
from oodguard.extraction import extract
from oodguard.outputs import ModelOutputs
from oodguard.shards import ShardedOutputs, write_shards
from ray_helpers import BrokenRows, seeded_model

pytestmark = pytest.mark.slow


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2500, 6, generator=g), torch.randint(0, 3, (2500,), generator=g)


def test_extraction_on_ray_equals_local_extraction_in_row_order(ray_local, tmp_path):
    data, labels = _data()
    model = seeded_model()
    local = extract(model, data, labels=labels, layers=["1"], progress=False)
    on_ray = extract(model, data, labels=labels, layers=["1"], progress=False, engine="ray", num_workers=2,
                     out_dir=tmp_path / "ray", chunk_rows=400)  # fmt: skip
    assert isinstance(on_ray, ShardedOutputs) and on_ray.num_shards == 7
    assert on_ray.manifest["extra"]["engine"] == "ray"
    back = on_ray.to_memory()
    for field in ("logits", "features"):
        torch.testing.assert_close(getattr(back, field), getattr(local, field), atol=1e-5, rtol=0)
    assert torch.equal(back.labels, labels)  # the order of the data, shard by shard
    torch.testing.assert_close(back.layers["1"], local.layers["1"], atol=1e-5, rtol=0)
    assert torch.equal(back.head[0], local.head[0])


def test_a_factory_builds_the_model_in_each_actor(ray_local, tmp_path):
    data, labels = _data()
    local = extract(seeded_model(), data, labels=labels, progress=False)
    for factory in ("ray_helpers:seeded_model", seeded_model):
        on_ray = extract(factory, data, labels=labels, progress=False, engine="ray", out_dir=tmp_path / "f",
                         chunk_rows=1000)  # fmt: skip
        assert on_ray.manifest["extra"]["model"] == "ray_helpers:seeded_model"
        torch.testing.assert_close(on_ray.to_memory().logits, local.logits, atol=1e-5, rtol=0)


def test_a_dataset_and_a_worker_failure_name_the_shard_and_leave_the_folder_incomplete(ray_local, tmp_path):
    rows = BrokenRows(1000, bad=10**6)
    ok = extract(seeded_model(), rows, progress=False, engine="ray", out_dir=tmp_path / "ok", chunk_rows=300)
    local = extract(seeded_model(), rows, progress=False)
    torch.testing.assert_close(ok.to_memory().logits, local.logits, atol=1e-5, rtol=0)
    assert torch.equal(ok.labels, local.labels)
    with pytest.raises(
        RuntimeError, match=r"shard 2 \(rows 600\.\.899\) failed on a worker: OSError: cannot read image 7"
    ):
        extract(seeded_model(), BrokenRows(1000, bad=700), progress=False, engine="ray", out_dir=tmp_path / "bad",
                chunk_rows=300)  # fmt: skip
    with pytest.raises(ValueError, match="interrupted extraction"):
        ModelOutputs.open(tmp_path / "bad")


def test_data_the_workers_cannot_index_is_refused_before_any_work(ray_local, tmp_path):
    data, _ = _data()
    with pytest.raises(ValueError, match="reads rows by index on the workers"):
        extract(seeded_model(), (batch for batch in data.split(100)), engine="ray", out_dir=tmp_path / "g")
    with pytest.raises(ValueError, match="engine='ray' writes shards: give out_dir="):
        extract(seeded_model(), data, engine="ray")
    with pytest.raises(ValueError, match="cannot be imported by name from another process"):
        extract(lambda: seeded_model(), data, engine="ray", out_dir=tmp_path / "h")


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "knn", "klm", "she"])
def test_fit_and_score_distributed_equal_a_single_process_fit(ray_local, tmp_path, name):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3000) % 4
    features = torch.randn(3000, 8, generator=g, dtype=torch.float64) * 0.1 + 50.0  # far from 0: Chan's update
    features[torch.arange(3000), labels] += 1.0  # class c sits higher on axis c, which the head reads
    weight, bias = torch.eye(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    outputs = ModelOutputs(logits=features @ weight.T + bias, features=features, labels=labels, head=(weight, bias))
    shards = write_shards(outputs, tmp_path / "s", shard_rows=350)  # 9 shards: an uneven tree
    single = detectors.create(name).fit(outputs)
    for engine in ("ray", "local"):
        spread = detectors.fit_distributed(detectors.create(name), shards, engine=engine)
        for key, value in single.state_.items():
            torch.testing.assert_close(spread.state_[key], value, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(detectors.score_distributed(spread, shards, engine=engine),
                                   single.score(outputs).double(), rtol=1e-5, atol=1e-8)  # fmt: skip
    in_memory = [outputs[i : i + 1000] for i in range(0, 3000, 1000)]
    torch.testing.assert_close(detectors.fit_distributed(detectors.create(name), in_memory).score(outputs),
                               single.score(outputs), rtol=1e-5, atol=1e-8)  # fmt: skip


def test_distributed_fit_refuses_what_cannot_be_merged_and_names_a_failing_shard(ray_local, tmp_path):
    outputs = ModelOutputs(features=torch.randn(400, 4), labels=torch.arange(400) % 2)
    shards = write_shards(outputs, tmp_path / "s", shard_rows=100)
    with pytest.raises(TypeError, match="vim: its fit has no additive statistics"):
        detectors.fit_distributed(detectors.create("vim"), shards)
    with pytest.raises(TypeError, match="knn: its fit has no additive statistics"):
        detectors.fit_distributed(detectors.create("knn", ratio=0.5), shards)
    bad = [outputs[:100], outputs[100:200].with_fields(labels=torch.full((100,), 7)), outputs[200:]]
    fitted = detectors.fit_distributed(detectors.create("mahalanobis"), [outputs[:200], outputs[200:]])
    wider = ModelOutputs(features=torch.randn(50, 5), labels=torch.arange(50) % 2)
    with pytest.raises(RuntimeError, match=r"score_distributed failed on shard 1: ValueError: .*D=5"):
        detectors.score_distributed(fitted, [outputs[:50], wider])
    with pytest.raises(ValueError, match="shards: expected a shard folder"):
        detectors.fit_distributed(detectors.create("mahalanobis"), [])
    with pytest.raises(ValueError, match=r"every class needs at least 2 fit samples \(class 2: 0"):
        detectors.fit_distributed(detectors.create("mahalanobis"), bad)  # merged, classes 2-6 have no sample


def test_a_model_answering_with_a_dict_extracts_the_same_on_ray(ray_local, tmp_path):
    from ray_helpers import DictOutput

    data, labels = _data()
    model = DictOutput()
    local = extract(model, data, labels=labels, progress=False)
    on_ray = extract(model, data, labels=labels, progress=False, engine="ray", out_dir=tmp_path / "d", chunk_rows=800)
    back = on_ray.to_memory()
    torch.testing.assert_close(back.logits, local.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.features, local.features, atol=1e-5, rtol=0)
