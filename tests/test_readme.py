"""Every Python example in the README runs as written, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow  # builds and runs the digits benchmark as the README does
def test_readme_python_examples_run(tmp_path, monkeypatch, digits_cache, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODGUARD_CACHE", str(digits_cache))
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    shown = capsys.readouterr().out
    assert "mahalanobis" in shown and "AUROC" in shown
    assert (tmp_path / "mahalanobis-detector" / "detector.safetensors").exists()
    # The config file the README shows, beside the folders its Python wrote, runs as the README's command does.
    (toml,) = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    (tmp_path / "my-data" / "bench.toml").write_text(toml)
    command = next(line for line in README.read_text().splitlines() if line.startswith("oodguard bench my-data"))
    from oodguard.cli import main

    argv = command.split("#")[0].split()[1:]
    assert main([*argv, "-q", "--n-boot", "5", "-d", "msp,energy,knn"]) == 0
    assert (tmp_path / "results" / "my-data" / "report.html").is_file()


def test_readme_make_targets_exist():
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make ([\w-]+)", README.read_text(), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_readme_leaderboard_was_generated():
    text = README.read_text()
    assert "LEADERBOARD" not in text and "| rank | detector |" in text
