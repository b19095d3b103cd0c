"""Sharded outputs: writing, opening without reading, refusing interrupted or edited folders, detectors over shards,
and the class statistics' pairwise (Chan) update."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.extraction import extract
from oodguard.outputs import ModelOutputs
from oodguard.shards import MANIFEST, ShardedOutputs, ShardWriter, open_shards, write_shards


def _outputs(n=900, d=6, c=3, seed=0, offset=0.0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    weight, bias = torch.randn(c, d, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
    labels = torch.arange(n) % c
    return ModelOutputs(logits=features @ weight.T + bias, features=features, labels=labels, head=(weight, bias))


def test_a_written_folder_opens_to_the_same_rows(tmp_path):
    outputs = _outputs()
    sharded = write_shards(outputs, tmp_path / "out", shard_rows=250)
    assert isinstance(sharded, ShardedOutputs)
    assert (len(sharded), sharded.num_shards, sharded.num_classes, sharded.feature_dim) == (900, 4, 3, 6)
    assert sharded.fields() == ["logits", "features", "labels", "head"]
    assert [len(shard) for shard in sharded] == [250, 250, 250, 150]
    back = ModelOutputs.open(tmp_path / "out").to_memory()
    for field in ("logits", "features", "labels"):
        assert torch.equal(getattr(back, field), getattr(outputs, field))
    assert torch.equal(back.head[0], outputs.head[0]) and torch.equal(sharded.labels, outputs.labels)
    assert ModelOutputs.open(tmp_path / "out", verify=True).num_shards == 4


def _mapped_file(address):
    """The file whose mapping holds ``address`` in this process (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_shards_are_memory_maps_of_the_files(tmp_path):
    write_shards(_outputs(), tmp_path / "out", shard_rows=300)
    shard = ModelOutputs.open(tmp_path / "out").shard(1)
    # the tensor's memory lies inside a mapping of the shard file: no copy was read into the process
    assert _mapped_file(shard.features.data_ptr()) == str(tmp_path / "out" / "shard-00001.safetensors")
    assert torch.equal(shard.features, _outputs().features[300:600])


def test_an_interrupted_or_edited_folder_is_never_read_as_complete(tmp_path):
    folder = tmp_path / "out"
    write_shards(_outputs(), folder, shard_rows=300)
    manifest = json.loads((folder / MANIFEST).read_text())

    (folder / MANIFEST).unlink()  # a run killed before its manifest
    with pytest.raises(ValueError, match=r"no manifest\.json \(3 shard file\(s\)\): an interrupted extraction"):
        open_shards(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="incomplete extraction"):
        open_shards(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "num_rows": 901}))
    with pytest.raises(ValueError, match="do not add up to num_rows"):
        open_shards(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    data = bytearray((folder / "shard-00001.safetensors").read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte: caught by verify
    (folder / "shard-00001.safetensors").write_bytes(bytes(data))
    open_shards(folder)  # opening checks sizes and headers only
    with pytest.raises(ValueError, match=r"shard-00001.safetensors was modified after .*sha256 mismatch"):
        open_shards(folder, verify=True)
    (folder / "shard-00002.safetensors").write_bytes(b"short")
    with pytest.raises(ValueError, match="has 5 bytes, the manifest says"):
        open_shards(folder)
    (folder / "shard-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard shard-00002.safetensors listed in the manifest is missing"):
        open_shards(folder)
    with pytest.raises(FileNotFoundError):
        open_shards(tmp_path / "nowhere")


def test_the_writer_replaces_earlier_shards_but_never_other_files(tmp_path):
    folder = tmp_path / "out"
    write_shards(_outputs(), folder, shard_rows=100)
    writer = ShardWriter(folder)  # a new run: the old manifest goes first, so a crash now reads as incomplete
    assert not (folder / MANIFEST).exists() and not list(folder.glob("shard-*"))
    writer.write(_outputs(n=30))
    with pytest.raises(ValueError, match="interrupted extraction"):
        open_shards(folder)
    assert len(writer.close()) == 30
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        ShardWriter(tmp_path / "mine")
    writer = ShardWriter(tmp_path / "other")
    writer.write(_outputs(n=10))
    with pytest.raises(ValueError, match="shard 1: fields .* differ"):
        writer.write(_outputs(n=10, d=7))
    writer.write(_outputs(n=10), index=2)
    with pytest.raises(ValueError, match=r"shards \[1\] are missing"):
        writer.close()


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "knn", "klm", "she", "vim", "energy", "nnguide"])
def test_detectors_fit_and_score_shard_folders_as_in_memory_outputs(tmp_path, name):
    outputs = _outputs(n=1200, d=8, c=4)
    sharded = write_shards(outputs, tmp_path / "out", shard_rows=300)
    in_memory = detectors.create(name).fit(outputs)
    from_shards = detectors.create(name).fit(sharded)
    expected, got = in_memory.score(outputs), from_shards.score(sharded)
    assert got.shape == (1200,)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)
    if from_shards.supports_partial_fit:
        partial = detectors.create(name)
        for shard in sharded:
            partial.partial_fit(shard)
        torch.testing.assert_close(partial.score(sharded).double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_drop_ood_skips_shards_without_in_distribution_rows(tmp_path):
    outputs = _outputs(n=600)
    labels = outputs.labels.clone()
    labels[:200] = -1  # the first shard is all OOD
    marked = outputs.with_fields(labels=labels)
    sharded = write_shards(marked, tmp_path / "out", shard_rows=200)
    with pytest.raises(ValueError, match="OOD-labelled row"):
        detectors.create("mahalanobis").fit(sharded)
    fitted = detectors.create("mahalanobis").fit(sharded, drop_ood=True)
    reference = detectors.create("mahalanobis").fit(outputs[200:])
    torch.testing.assert_close(fitted.score(outputs), reference.score(outputs))


def test_extract_to_a_folder_equals_extract_in_memory(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    data, labels = torch.randn(1000, 5), torch.arange(1000) % 4
    expected = extract(model, data, labels=labels, layers=["1"], progress=False)
    sharded = extract(model, data, labels=labels, layers=["1"], progress=False, out_dir=tmp_path / "o", chunk_rows=300)
    assert isinstance(sharded, ShardedOutputs) and sharded.num_shards == 4
    back = sharded.to_memory()
    for field in ("logits", "features", "labels"):
        assert torch.equal(getattr(back, field), getattr(expected, field))
    assert torch.equal(back.layers["1"], expected.layers["1"]) and torch.equal(back.head[1], expected.head[1])
    assert sharded.manifest["extra"] == {"engine": "local", "rows_per_shard": 300}
    with pytest.raises(ValueError, match="out_dir and cache_dir: give one"):
        extract(model, data, out_dir=tmp_path / "p", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="num_workers and address: only for engine='ray'"):
        extract(model, data, out_dir=tmp_path / "p", num_workers=2, progress=False)
    with pytest.raises(ValueError, match="engine: expected one of 'local', 'ray'"):
        extract(model, data, engine="spark", progress=False)


def _within(stats):
    return detectors.implementation("mahalanobis")._means(stats)[2]


def test_chunked_class_covariances_stay_exact_for_features_far_from_zero():
    # offset 1e5, spread 1e-3: the raw sums z z^T lose every digit of the covariance (condition ~ (1e5/1e-3)^2 =
    # 1e16 > 1/eps), the scatter around class means combined by Chan's update keeps it
    outputs = _outputs(n=3000, d=4, c=3, offset=1e5, scale=1e-3, dtype=torch.float64)
    z, y = outputs.features.numpy(), outputs.labels.numpy()
    centred = z - np.stack([z[y == c].mean(0) for c in range(3)])[y]
    truth = centred.T @ centred / len(z)
    one = detectors.create("mahalanobis").fit(outputs)
    chunked = detectors.create("mahalanobis")
    for start in range(0, 3000, 700):
        chunked.partial_fit(outputs[start : start + 700])
    merged = (
        detectors.create("mahalanobis").fit(outputs[:1000]).merge(detectors.create("mahalanobis").fit(outputs[1000:]))
    )
    for detector in (one, chunked, merged):
        np.testing.assert_allclose(_within(detector.stats_).numpy(), truth, rtol=1e-7, atol=1e-12)
    raw = torch.from_numpy(z.T @ z - sum(np.outer(z[y == c].sum(0), z[y == c].mean(0)) for c in range(3)))
    assert float((raw / len(z) - torch.from_numpy(truth)).abs().max()) > 1e-3 * np.abs(truth).max()  # the old way


def test_detectors_saved_with_the_old_raw_sums_load_and_merge(tmp_path):
    outputs = _outputs(n=600, dtype=torch.float64)
    fitted = detectors.create("rmds").fit(outputs[:300])
    stats = fitted.stats_
    means = stats["sums"] / stats["counts"].double()[:, None]
    fitted.stats_ = {
        "counts": stats["counts"],
        "sums": stats["sums"],
        "outer": stats["scatter"] + stats["sums"].T @ means,
    }
    fitted.save(tmp_path / "old")
    loaded = detectors.load(tmp_path / "old")
    assert set(loaded.stats_) == {"counts", "sums", "scatter"}
    loaded.merge(detectors.create("rmds").fit(outputs[300:]))
    reference = detectors.create("rmds").fit(outputs)
    torch.testing.assert_close(loaded.score(outputs), reference.score(outputs))


@pytest.mark.slow
def test_scoring_a_folder_keeps_memory_bounded_by_one_shard(tmp_path):
    """Resident memory while fitting and scoring 480 MB of mapped rows stays far below their size."""
    folder = tmp_path / "big"
    writer = ShardWriter(folder)
    g = torch.Generator().manual_seed(0)
    for _ in range(16):  # 16 shards x 15,000 rows x 512 float32 = 480 MB on disk
        features = torch.randn(15000, 512, generator=g)
        writer.write(ModelOutputs(features=features, labels=torch.randint(0, 10, (15000,), generator=g)))
    writer.close()
    script = textwrap.dedent(
        f"""
        import resource, torch
        from oodguard import detectors
        from oodguard.outputs import ModelOutputs
        torch.set_num_threads(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shards = ModelOutputs.open({str(folder)!r})
        detector = detectors.create("mahalanobis").fit(shards)
        scores = detector.score(shards)
        assert scores.shape == (240000,) and bool(torch.isfinite(scores).all())
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 200, f"resident memory grew by {grown} MB for 480 MB of shards"


def test_a_hand_edited_manifest_is_one_clear_error(tmp_path):
    folder = tmp_path / "out"
    write_shards(_outputs(), folder, shard_rows=300)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        open_shards(folder)
    (tmp_path / "outside.safetensors").write_bytes((folder / "shard-00000.safetensors").read_bytes())
    escaping = {**manifest, "shards": [{**manifest["shards"][0], "file": "../outside.safetensors"},
                                       *manifest["shards"][1:]]}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(escaping))
    with pytest.raises(ValueError, match=r"shard file '\.\./outside\.safetensors' is not a file name inside"):
        open_shards(folder)
    for broken in ({k: v for k, v in manifest.items() if k != "rows"}, {**manifest, "fields": "logits"}):
        (folder / MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=r"manifest\.json is damaged \((KeyError|TypeError)"):
            open_shards(folder)


@pytest.mark.slow
def test_an_extraction_killed_mid_way_leaves_a_folder_that_is_refused(tmp_path):
    """kill -9 while shards are being written: no manifest, so the folder never reads as complete."""
    folder = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import time, torch
        from torch import nn
        from oodguard.extraction import extract

        class Slow(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(4, 3)
            def forward(self, x):
                time.sleep(0.05)
                return self.head(x)

        extract(Slow(), torch.randn(100000, 4), out_dir={str(folder)!r}, chunk_rows=64, batch_size=64,
                progress=False)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):  # wait for a few shards, then kill without warning
            if len(list(folder.glob("shard-*.safetensors"))) >= 3:
                break
            time.sleep(0.05)
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert len(list(folder.glob("shard-*.safetensors"))) >= 3 and not (folder / MANIFEST).exists()
    with pytest.raises(ValueError, match="an interrupted extraction, never read as complete"):
        ModelOutputs.open(folder)
