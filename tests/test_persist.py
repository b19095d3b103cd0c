"""The one file format: round trips, refusal of damaged, edited and foreign files, atomic writes, legacy files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oodguard import persist


def tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(12.0).reshape(3, 4)
    return {
        "float": base,
        "view": base[1:],  # shares memory with "float"
        "transposed": base.T,
        "half": torch.randn(5, generator=torch.Generator().manual_seed(0)).half(),
        "bfloat": torch.ones(2, 2, dtype=torch.bfloat16),
        "int": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 7),
    }


def test_round_trip_of_dtypes_shapes_shared_memory_and_header(tmp_path):
    original = tensors()
    path = persist.save(tmp_path / "sub" / "x.safetensors", original, kind="thing", version=3, header={"a": [1, "b"]})
    loaded, header = persist.load(path, kind="thing", versions=[2, 3])
    assert header == {"a": [1, "b"], "kind": "thing", "format_version": 3}
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert persist.read_header(path) == header
    assert sorted(os.listdir(path.parent)) == ["x.safetensors"]  # no temporary file left


def test_the_digest_is_sha256_over_the_header_and_each_tensor_length_framed(tmp_path):
    """Worked out independently of persist: the canonical serialisation must never drift, or files already
    written stop loading."""
    path = persist.save(
        tmp_path / "x.safetensors",
        {"b": torch.tensor([1, 2], dtype=torch.int16), "a": torch.zeros(0, 3)},
        kind="k",
        version=4,
        header={"z": 1},
    )
    text = '{"format_version": 4, "kind": "k", "z": 1}'
    parts = [text.encode(), b"a", b"torch.float32|[0, 3]", b"", b"b", b"torch.int16|[2]", b"\x01\x00\x02\x00"]
    expected = hashlib.sha256(b"".join(len(p).to_bytes(8, "little") + p for p in parts)).hexdigest()
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {persist.HEADER_KEY: text, persist.DIGEST_KEY: expected}
    assert persist.verify(path) == {"z": 1, "kind": "k", "format_version": 4}


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.ones(1)}, kind="k", version=1)
    side = persist.write_json_atomic(tmp_path / "x.json", {})
    direct = persist.save(tmp_path / "y.safetensors", {"w": torch.ones(1)}, kind="k", version=1, atomic=False)
    for written in (path, side, direct):
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), written


def rewrite(path, metadata=None, tensors_=None):
    with safe_open(str(path), framework="pt") as handle:
        old_metadata = handle.metadata()
        old = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors_ if tensors_ is not None else old, str(path), metadata=metadata or old_metadata)


def test_edited_header_and_changed_tensor_are_refused(tmp_path):
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.ones(3)}, kind="k", version=1, header={"alpha": 0.05})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    header = json.loads(metadata[persist.HEADER_KEY])
    header["alpha"] = 0.999
    rewrite(path, metadata={**metadata, persist.HEADER_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match="modified after it was written"):
        persist.load(path, kind="k", versions=1)
    path = persist.save(tmp_path / "y.safetensors", {"w": torch.ones(3)}, kind="k", version=1)
    rewrite(path, tensors_={"w": torch.tensor([1.0, 1.0, 2.0])})
    with pytest.raises(ValueError, match="modified after it was written"):
        persist.load(path, kind="k", versions=1)


def test_a_file_whose_digest_was_removed_is_refused(tmp_path):
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.ones(3)}, kind="k", version=1)
    with safe_open(str(path), framework="pt") as handle:
        header_text = handle.metadata()[persist.HEADER_KEY]
    rewrite(path, metadata={persist.HEADER_KEY: header_text}, tensors_={"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="modified after it was written .*digest is missing"):
        persist.load(path, kind="k", versions=1)
    with pytest.raises(ValueError, match="digest is missing"):
        persist.verify(path)


def test_a_flipped_byte_is_refused(tmp_path):
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.zeros(64)}, kind="k", version=1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified after it was written"):
        persist.load(path, kind="k", versions=1)


def test_truncated_foreign_wrong_kind_and_unknown_version_are_refused(tmp_path):
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.zeros(64)}, kind="detector", version=2)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        persist.load(tmp_path / "cut.safetensors", kind="detector", versions=2)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        persist.load(tmp_path / "text.safetensors", kind="detector", versions=2)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by oodguard"):
        persist.load(tmp_path / "plain.safetensors", kind="detector", versions=2)
    with pytest.raises(ValueError, match="holds a 'detector', not a 'checkpoint'"):
        persist.load(path, kind="checkpoint", versions=2)
    with pytest.raises(ValueError, match="version 2 is not supported .* reads version 1"):
        persist.load(path, kind="detector", versions=1)
    with pytest.raises(FileNotFoundError):
        persist.load(tmp_path / "missing.safetensors", kind="detector", versions=2)
    with pytest.raises(FileNotFoundError):
        persist.read_header(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        persist.read_header(tmp_path / "cut.safetensors")
    header = {"format": "somebody.else", "format_version": 1}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"oodguard": json.dumps(header)})
    with pytest.raises(ValueError, match="holds no kind oodguard knows \\(format 'somebody.else'\\), not a 'detector'"):
        persist.load(tmp_path / "other.safetensors", kind="detector", versions=1)


def test_header_must_be_plain_json(tmp_path):
    with pytest.raises(TypeError, match="plain JSON"):
        persist.save(tmp_path / "x.safetensors", {}, kind="k", version=1, header={"x": float("nan")})
    with pytest.raises(TypeError, match="plain JSON"):
        persist.save(tmp_path / "x.safetensors", {}, kind="k", version=1, header={"x": object()})
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        persist.save(tmp_path / "x.safetensors", {"a": [1, 2]}, kind="k", version=1)
    with pytest.raises(ValueError, match=r"must not set \['kind'\]; pass them as kind= and version="):
        persist.save(tmp_path / "x.safetensors", {}, kind="k", version=1, header={"kind": "other"})
    with pytest.raises(TypeError, match="version must be an int"):
        persist.save(tmp_path / "x.safetensors", {}, kind="k", version="1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("legacy_format, kind", sorted(persist.LEGACY_FORMATS.items()))
def test_files_of_the_first_release_still_load(tmp_path, legacy_format, kind):
    """Written as the first release did: metadata {"oodguard": {"format": ..., "format_version": 1, ...}}."""
    header = {"format": legacy_format, "format_version": 1, "extra": 7}
    save_file({"w": torch.ones(2)}, str(tmp_path / "old.safetensors"), metadata={"oodguard": json.dumps(header)})
    loaded, read = persist.load(tmp_path / "old.safetensors", kind=kind, versions=1)
    assert torch.equal(loaded["w"], torch.ones(2)) and read["extra"] == 7 and read["kind"] == kind


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = persist.save(tmp_path / "x.safetensors", {"w": torch.ones(2)}, kind="k", version=1)

    def broken_replace(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        persist.save(path, {"w": torch.zeros(2)}, kind="k", version=1)
    monkeypatch.undo()
    assert torch.equal(persist.load(path, kind="k", versions=1)[0]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def test_json_side_files_are_written_atomically(tmp_path):
    path = persist.write_json_atomic(tmp_path / "a" / "c.json", {"b": 1, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert sorted(os.listdir(path.parent)) == ["c.json"]


def test_caches_return_none_or_false_instead_of_raising(tmp_path):
    path = tmp_path / "c.safetensors"
    assert persist.load_cache(path, kind="cache.x", versions=1) is None
    assert persist.save_cache(path, {"a": torch.ones(1)}, kind="cache.x", version=1) is True
    assert torch.equal(persist.load_cache(path, kind="cache.x", versions=1)[0]["a"], torch.ones(1))
    assert persist.load_cache(path, kind="cache.y", versions=1) is None
    path.write_bytes(path.read_bytes()[:20])
    assert persist.load_cache(path, kind="cache.x", versions=1) is None
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert persist.save_cache(blocker / "f.safetensors", {"a": torch.ones(1)}, kind="cache.x", version=1) is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_folder_is_not_an_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        assert persist.save_cache(tmp_path / "f.safetensors", {"a": torch.ones(1)}, kind="c", version=1) is False
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.slow
@pytest.mark.parametrize("phase, delay", [("write_bytes_atomic", 0.01), ("write_bytes_atomic", 0.05), ("save", 0.05),
                                          ("save", 0.3)])  # fmt: skip
def test_kill_9_in_the_middle_of_a_write_never_leaves_a_torn_file(tmp_path, phase, delay):
    """A process writing large files over and over is killed with SIGKILL just after it starts a write (its first
    round completed); each path then holds one complete, verified version and no visible temporary file. (Recent
    safetensors write atomically themselves: the side file checks write_bytes_atomic on its own.)"""
    target, side = tmp_path / "big.safetensors", tmp_path / "side.bin"
    script = textwrap.dedent(
        f"""
        import torch
        from oodguard import persist
        big = torch.zeros(40_000_000)  # 160 MB: a write takes a good fraction of a second
        i = 0
        while True:
            data = b"%08d" % i + bytes(200_000_000)
            print("write_bytes_atomic", i, flush=True)
            persist.write_bytes_atomic({str(side)!r}, data)
            big[0] = i
            print("save", i, flush=True)
            persist.save({str(target)!r}, {{"w": big}}, kind="k", version=1, header={{"i": i}})
            i += 1
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.split() == [phase, "1"]:
                break
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    loaded, header = persist.load(target, kind="k", versions=1)
    assert float(loaded["w"][0]) == header["i"] and header["i"] >= 0
    assert side.stat().st_size == 200_000_008
    for path in tmp_path.iterdir():  # a killed write may leave its hidden temporary file; never a visible one
        assert path in (target, side) or path.name.startswith("."), path.name
