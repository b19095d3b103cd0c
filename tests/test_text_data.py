"""The text benchmark's data: the shipped file equals its regeneration from WordNet; parser and selection rules."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from oodguard.benchmark import text_data
from oodguard.benchmark.text import SOURCES
from oodguard.benchmark.text_data import (
    ID_TOPICS,
    NEAR_TOPICS,
    SIZES,
    _hash_order,
    license_notice,
    load_text_data,
    parse_wordnet,
    python_docstrings,
)

ROOT = Path(__file__).resolve().parent.parent
WORDNET = Path("/usr/share/wordnet")


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="needs WordNet: apt-get install wordnet-base")
@pytest.mark.slow
def test_shipped_data_file_matches_its_regeneration_script(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_text_data.py"), "--wordnet-dir", str(WORDNET), "--out",
         str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    regenerated = json.loads(gzip.decompress((tmp_path / text_data.DATA_FILE).read_bytes()))
    assert regenerated == load_text_data()
    assert (tmp_path / text_data.LICENSE_FILE).read_text(encoding="utf-8") == license_notice()


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="needs WordNet: apt-get install wordnet-base")
def test_quoted_lemma_counts_are_the_parsers_unique_lemmas():
    # the benchmark's notes and docs/text.md quote the sizes of the corpora the candidate words are drawn from
    counts = {pos: len({word for entry in parse_wordnet(WORDNET / f"data.{pos}")[0] for word in entry.words})
              for pos in ("noun", "adj")}  # fmt: skip
    assert counts == {"noun": 119_034, "adj": 21_538}  # adjectives after (a)/(p)/(ip) are stripped
    quoted = f"seeded subsets of {counts['noun']:,} and {counts['adj']:,}"
    assert quoted in SOURCES["negatives"]
    docs = ROOT / "docs" / "text.md"
    if docs.is_file():
        assert " ".join(docs.read_text(encoding="utf-8").split()).count(f"{counts['adj']:,} unique lemmas") == 1


# Lines end in two spaces, as in the real files.
WORDNET_SAMPLE = "".join(
    line + "  \n"
    for line in [
        "  1 This software and database is being provided to you, the LICENSEE, by",
        "  2 Princeton University under the following license.",
        "  3 ",
        "  4 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its "
        "own distinct existence (living or nonliving)",
        "01317541 05 n 0b domestic_animal 0 domesticated_animal 0 a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 1 000 | any of "
        'various animals that have been tamed and made fit for a human environment; "the cat is a domestic_animal"',
        '00021110 00 s 02 galore(ip) 0 obliging 0 000 | showing   a cheerful willingness; "the obliging waiter"; "b"',
    ]
)


def test_parser_known_answer(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(WORDNET_SAMPLE, encoding="latin-1")
    entries, header = parse_wordnet(path)
    assert header.splitlines() == [
        "This software and database is being provided to you, the LICENSEE, by",
        "Princeton University under the following license.",
        "",
        "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
    ]
    assert [tuple(e) for e in entries] == [
        ("00001740", "noun.Tops", ("entity",),
         "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"),
        # w_cnt is hexadecimal: 0b = 11 words; only the definition before the first ';' is kept
        ("01317541", "noun.animal", ("domestic animal", "domesticated animal", *"abcdefghi"),
         "any of various animals that have been tamed and made fit for a human environment"),
        ("00021110", "adj.all", ("galore", "obliging"), "showing a cheerful willingness"),
    ]  # fmt: skip


def test_parser_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        parse_wordnet(tmp_path / "missing")
    bad = tmp_path / "data.noun"
    bad.write_text("00001740 03 n 01 entity 0 003 no gloss here\n", encoding="latin-1")
    with pytest.raises(ValueError, match="not a WordNet data line"):
        parse_wordnet(bad)


def test_hash_order_is_sha256_order():
    keys = ["noun:00001740", "noun:01317541", "verb:00001740", "adj:1"]
    expected = sorted(range(4), key=lambda i: hashlib.sha256(f"7:{keys[i]}".encode()).hexdigest())
    assert _hash_order(keys, 7) == expected
    assert _hash_order(keys, 7) != _hash_order(keys, 8)  # the seed changes the order (for these keys)


def test_shipped_data_sizes_and_no_text_in_two_sets():
    data = load_text_data()
    sets = data["sets"]
    assert list(sets) == sorted([*ID_TOPICS, *NEAR_TOPICS, "verb-glosses", "adjective-glosses"])
    assert {len(sets[t]["texts"]) for t in ID_TOPICS} == {SIZES["id_topic"]}
    assert {len(sets[t]["texts"]) for t in NEAR_TOPICS} == {SIZES["near_topic"]}
    assert len(sets["verb-glosses"]["texts"]) == SIZES["verb"]
    assert len(sets["adjective-glosses"]["texts"]) == SIZES["adj"]
    every = [text for values in sets.values() for text in values["texts"]]
    assert len(set(every)) == len(every)  # identical texts would leak between ID and OOD
    assert min(len(text.split()) for text in every) >= text_data.MIN_WORDS
    assert not any(";" in text for text in every)
    words = data["words"]
    assert len(words["noun"]) == SIZES["noun_words"] and len(set(words["noun"])) == SIZES["noun_words"]
    assert len(words["adjective"]) == SIZES["adj_words"] and not any("(" in w for w in words["adjective"])
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in license_notice()


def test_python_docstrings_ignore_methods_other_packages_attach(monkeypatch):
    # e.g. transformers adds logging.Logger.warning_advice on import: the set must not depend on what was imported
    import logging

    texts = python_docstrings(400)

    def attached(self):
        """A method that another package attached to a standard-library class after the fact."""

    attached.__module__ = "some_other_package"
    monkeypatch.setattr(logging.Logger, "attached_method", attached, raising=False)
    assert python_docstrings(400) == texts


def test_python_docstrings_are_distinct_prose_and_deterministic():
    texts = python_docstrings(50)
    assert texts == python_docstrings(50)
    assert len(set(texts)) == 50
    assert all(5 <= len(t.split()) <= 60 and ">>>" not in t for t in texts)
    assert python_docstrings(50, seed=1) != texts
    with pytest.raises(ValueError, match="docstrings found"):
        python_docstrings(10**6)
