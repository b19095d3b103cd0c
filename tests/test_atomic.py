"""Atomic safetensors writes: complete files or none, no temporary files left behind."""

import os

import pytest
import torch
from safetensors.torch import load_file

from oodguard.atomic import save_cache_file, save_safetensors_atomic


def test_round_trip_with_metadata_and_no_leftovers(tmp_path):
    path = save_safetensors_atomic({"a": torch.arange(6.0).reshape(2, 3).T}, tmp_path / "x" / "f.safetensors",
                                   metadata={"version": "1"})  # fmt: skip
    assert torch.equal(load_file(path)["a"], torch.arange(6.0).reshape(2, 3).T)
    assert sorted(os.listdir(path.parent)) == ["f.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "f.safetensors")
    with pytest.raises(AttributeError):  # fails after the temporary file exists
        save_safetensors_atomic({"a": "not a tensor"}, path)
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["f.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_folder_is_not_an_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        assert save_cache_file({"a": torch.ones(1)}, tmp_path / "f.safetensors") is False
    finally:
        tmp_path.chmod(0o700)


def test_cache_file_reports_success_and_unwritable_parent(tmp_path):
    assert save_cache_file({"a": torch.ones(1)}, tmp_path / "f.safetensors") is True
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert save_cache_file({"a": torch.ones(1)}, blocker / "f.safetensors") is False
