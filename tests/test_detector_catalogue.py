"""The registry table of docs/detectors.md is what the code declares (``oodguard detectors --markdown``)."""

from __future__ import annotations

import re
from pathlib import Path

from oodguard import detectors
from oodguard.cli import main
from oodguard.detectors.catalogue import COLUMNS, markdown_row, markdown_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "detectors.md"


def _documented_table() -> str:
    text = DOCS.read_text()
    start = text.index("| " + " | ".join(COLUMNS) + " |")
    return text[start : text.index("\n\n", start) + 1]


def test_docs_registry_table_is_the_generated_one():
    # regenerate with: oodguard detectors --markdown (and paste it over the table under "## Registry")
    assert _documented_table() == markdown_table()


def test_row_reads_the_declared_metadata():
    row = markdown_row("knn").split(" | ")
    meta = detectors.info("knn")
    assert row[0] == "| `knn`" and row[1] == "outputs" and row[2] == meta["summary"]
    assert row[3] == "features" and row[4] == "features"
    assert row[5].startswith("k=50, ") and row[6] == "yes"
    clipn = markdown_row("clipn")
    assert "| no fit |" in clipn and "(required: label_embeddings, no_label_embeddings)" in clipn


def test_every_detector_has_one_row_and_pipes_are_escaped():
    lines = markdown_table().splitlines()[2:]
    names = [re.match(r"^\| `([a-z0-9_]+)` \|", line).group(1) for line in lines]  # type: ignore[union-attr]
    assert names == detectors.available()
    assert all(line.count(" | ") == len(COLUMNS) - 1 for line in lines)  # a raw | in a summary would add a cell


def test_cli_prints_the_table(capsys):
    assert main(["detectors", "--markdown"]) in (0, None)
    assert capsys.readouterr().out == markdown_table()
