"""The registry as a markdown table: one row per detector, from :func:`oodguard.detectors.info`.

``oodguard detectors --markdown`` prints it; the registry table of ``docs/detectors.md`` is this output (a test
keeps the two the same), so the documentation never lists a default or a requirement the code does not have.
"""

from __future__ import annotations

from typing import Any

from oodguard.detectors.base import available, info

__all__ = ["COLUMNS", "markdown_row", "markdown_table"]

COLUMNS = ("name", "protocol", "score (higher = OOD)", "fit needs", "score needs", "defaults", "partial fit", "paper")


def _needs(fields: list[str], protocol: str) -> str:
    # model detectors that read no cached output field need the model itself
    return ", ".join(fields) or ("model" if protocol == "model" else "—")


def _defaults(meta: dict[str, Any]) -> str:
    text = ", ".join(f"{key}={value}" for key, value in meta["defaults"].items()) or "—"
    if meta["required_params"]:
        text += f" (required: {', '.join(meta['required_params'])})"
    return text


def markdown_row(name: str) -> str:
    """The table row of one registered detector."""
    meta = info(name)
    fit = _needs(meta["fit_requires"], meta["protocol"]) if meta["needs_fit"] else "no fit"
    cells = [
        f"`{name}`",
        meta["protocol"],
        meta["summary"],
        fit,
        _needs(meta["requires"], meta["protocol"]),
        _defaults(meta),
        "yes" if meta["partial_fit"] else "no",
        meta["paper"],
    ]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table() -> str:
    """Every registered detector, sorted by name, as a markdown table (header included)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [markdown_row(name) for name in available()]
    return "\n".join(lines) + "\n"
