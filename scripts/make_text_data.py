"""Regenerate the ``text`` benchmark's WordNet data file, synonym table and licence notice from WordNet 3.0's files.

Usage: ``python scripts/make_text_data.py [--wordnet-dir /usr/share/wordnet] [--out DIR]``. The WordNet files
come from Debian's ``wordnet-base`` package (``apt-get install -y --no-install-recommends wordnet-base``). The
default output is the package's data directory, ``src/oodguard/benchmark/data``; the selection rules live in
``oodguard.benchmark.text_data.build_text_data``; the synonym table (used to paraphrase the ID definitions) is
``oodguard.benchmark.text_data.build_synonyms`` over the ID topics' definitions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from oodguard.benchmark.text_data import ID_TOPICS, build_synonyms, build_text_data, write_synonyms, write_text_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "oodguard" / "benchmark" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wordnet-dir", default="/usr/share/wordnet", help="directory holding WordNet's data.* and index.*"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    data, license_text = build_text_data(args.wordnet_dir)
    data_path, license_path = write_text_data(data, license_text, args.out)
    sets = ", ".join(f"{name} {len(values['texts'])}" for name, values in data["sets"].items())
    words = ", ".join(f"{kind} {len(values)}" for kind, values in data["words"].items())
    print(f"wrote {data_path} ({data_path.stat().st_size} bytes): {sets}; words: {words}")
    print(f"wrote {license_path}")
    synonyms = build_synonyms((text for topic in ID_TOPICS for text in data["sets"][topic]["texts"]), args.wordnet_dir)
    synonyms_path = write_synonyms(synonyms, args.out)
    print(f"wrote {synonyms_path} ({synonyms_path.stat().st_size} bytes): {len(synonyms['synonyms'])} synonyms")


if __name__ == "__main__":
    main()
