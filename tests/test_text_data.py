"""The text benchmark's data: the shipped file equals its regeneration from WordNet; parser and selection rules."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oodguard.benchmark import text_data
from oodguard.benchmark.text import SOURCES
from oodguard.benchmark.text_data import (
    ID_TOPICS,
    NEAR_TOPICS,
    SIZES,
    _hash_order,
    build_synonyms,
    license_notice,
    load_synonyms,
    load_text_data,
    paraphrase,
    parse_index,
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
    synonyms = json.loads(gzip.decompress((tmp_path / text_data.SYNONYMS_FILE).read_bytes()))
    assert synonyms["synonyms"] == load_synonyms()
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


# A tiny WordNet: "large" is an adjective in SemCor (2 tagged senses) and a noun (none), "owl" a noun, "wing" a
# noun with a capitalised first synonym and a lowercase second one, "bos" only a noun with no tagged sense.
INDEX = {
    "noun": ["  1 licence header line", "large n 1 2 @ + 1 0 05096191  ", "owl n 1 2 @ ~ 1 1 01621127  ",
             "wing n 2 1 @ 2 2 02151625 04591713  ", "bos n 1 1 @ 1 0 02403820  ",
             "marine n 2 1 @ 2 3 10298912 09990777  "],
    "verb": [],
    "adj": ["large a 2 1 ! 2 2 01382086 02163308  ", "marine a 3 1 \\ 3 1 02850136 02960990 00210518  "],
    "adv": [],
}  # fmt: skip
DATA = {
    "noun": ["05096191 07 n 02 size 0 largeness 0 000 | the property of being relatively large",
             "01621127 05 n 03 owl 0 bird_of_Minerva 0 hooter 0 000 | nocturnal bird of prey",
             "02151625 05 n 02 Wing 0 flying_appendage 0 000 | a movable organ for flying",
             "02403820 05 n 01 Bos 0 000 | type genus of the Bovidae",
             "10298912 18 n 02 marine 0 devil_dog 0 000 | a member of the United States Marine Corps"],
    "verb": [],
    "adj": ["01382086 00 a 02 large 0 big 0 000 | above average in size",
            "02850136 01 a 02 marine 0 maritime 0 000 | relating to or characteristic of the sea"],
    "adv": [],
}  # fmt: skip


def tiny_wordnet(folder: Path) -> Path:
    for pos in ("noun", "verb", "adj", "adv"):
        (folder / f"index.{pos}").write_text("".join(line + "\n" for line in INDEX[pos]), encoding="latin-1")
        (folder / f"data.{pos}").write_text("".join(line + "  \n" for line in DATA[pos]), encoding="latin-1")
    return folder


def test_index_parser_known_answer(tmp_path):
    tiny_wordnet(tmp_path)
    assert [tuple(e) for e in parse_index(tmp_path / "index.noun")] == [
        ("large", 0, "05096191"), ("owl", 1, "01621127"), ("wing", 2, "02151625"), ("bos", 0, "02403820"),
        ("marine", 3, "10298912"),
    ]  # fmt: skip
    bad = tmp_path / "index.bad"
    bad.write_text("owl n 2 2 @ ~ 1 1 01621127\n", encoding="latin-1")  # says 2 synsets, lists 1
    with pytest.raises(ValueError, match="not a WordNet index line"):
        parse_index(bad)
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        parse_index(tmp_path / "missing")


def test_synonyms_known_answer(tmp_path):
    texts = ["a large owl of the Bos kind", "the wing of a marine owl", "an Owl and a bos"]
    table = build_synonyms(texts, tiny_wordnet(tmp_path))
    assert table["format"] == text_data.SYNONYMS_FORMAT
    # large: the adjective (2 tagged senses) beats the noun (0); owl: the first other lemma that is lowercase words
    # ("bird of Minerva" names a god); wing: the capitalised "Wing" is skipped; marine: the noun has the most tagged
    # senses, so the adjective in the text gets the noun's synonym (the documented weakness of not parsing).
    # "bos" has no tagged sense; "Owl" is capitalised; "the", "of", "and" are stop words.
    assert table["synonyms"] == {"large": "big", "owl": "hooter", "wing": "flying appendage", "marine": "devil dog"}


def test_paraphrase_swaps_a_seeded_share_of_words():
    synonyms = {"large": "big", "owl": "hooter", "brown": "brownish"}
    text = "a large owl with large brown wings"
    assert paraphrase(text, synonyms, fraction=1.0) == "a big hooter with big brownish wings"
    assert paraphrase(text, synonyms, fraction=0.0) == text
    swapped = paraphrase(text, synonyms)
    assert swapped == paraphrase(text, synonyms)  # deterministic
    # worked out from the rule: the word at character i is swapped when the first 8 bytes of
    # sha256("0:<text>:<i>") read as an integer fall below half of 2**64
    expected = text
    for start, word in sorted(((2, "large"), (8, "owl"), (17, "large"), (23, "brown")), reverse=True):
        draw = int.from_bytes(hashlib.sha256(f"0:{text}:{start}".encode()).digest()[:8], "big")
        if draw < 2**63:
            expected = expected[:start] + synonyms[word] + expected[start + len(word) :]
    assert swapped == expected
    texts = [f"{text} number {k}" for k in range(200)]
    share = np.mean([paraphrase(t, synonyms).count("big") + paraphrase(t, synonyms).count("hooter") for t in texts])
    assert 1.2 < share < 1.8  # about half of the 3 swappable words


def test_shipped_synonyms_cover_the_id_definitions():
    synonyms = load_synonyms()
    assert 1000 < len(synonyms) < 3000
    assert not set(synonyms) & text_data.STOP_WORDS
    assert all(word.islower() and value.islower() and value != word for word, value in synonyms.items())
    fit = [text for topic in ID_TOPICS for text in load_text_data()["sets"][topic]["texts"][:300]]
    changed = sum(paraphrase(text, synonyms) != text for text in fit)
    assert changed > 0.5 * len(fit)  # most definitions have a paraphrase that differs


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
