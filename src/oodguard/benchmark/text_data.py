"""Data of the embedded ``text`` benchmark: WordNet 3.0 glosses by topic, WordNet word lists, Python docstrings.

The WordNet part is a small derived file shipped inside the package (``data/wordnet_text.json.gz``, with
WordNet's licence in ``data/WORDNET_LICENSE.txt``), so the benchmark runs on a machine without WordNet.
``scripts/make_text_data.py`` regenerates both from Debian's ``wordnet-base`` files
(``/usr/share/wordnet/data.{noun,verb,adj}``) by calling :func:`build_text_data`; a test checks that the
shipped file equals the regenerated one.

Every selection is a seeded *hash order*: items are sorted by ``sha256(f"{seed}:{pos}:{offset}")`` and the first
``n`` kept, which is deterministic across Python, NumPy and platform versions (a random generator's stream is
not guaranteed to be).

A gloss is the synset's definition: the text after ``|`` up to the first ``;`` (the usage examples that follow
are dropped), whitespace collapsed. Glosses shorter than 3 words are skipped, and so is a gloss whose text
already appeared earlier in the same file (identical texts would leak between the splits).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import re
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "LEXNAMES",
    "ID_TOPICS",
    "NEAR_TOPICS",
    "SIZES",
    "WordNetEntry",
    "parse_wordnet",
    "build_text_data",
    "load_text_data",
    "write_text_data",
    "license_notice",
    "python_docstrings",
    "DOCSTRING_MODULES",
    "scramble_words",
    "STOP_WORDS",
    "parse_index",
    "build_synonyms",
    "write_synonyms",
    "load_synonyms",
    "paraphrase",
]

#: Names of the lexicographer files, indexed by ``lex_filenum`` (lexnames(5WN)); 3..28 are the noun topics.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

#: In-distribution classes (label = position): noun topics with thousands of glosses each.
ID_TOPICS = ("noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.person")
#: Near-OOD sets: other noun topics (definitions of the same style, other subjects).
NEAR_TOPICS = ("noun.body", "noun.substance", "noun.object", "noun.location")

#: Glosses per ID topic (split into fit / validation / test by ``text.SPLIT_SIZES``), per near topic, per
#: verb/adjective set; words per NegLabel candidate list.
SIZES = {"id_topic": 500, "near_topic": 250, "verb": 400, "adj": 400, "noun_words": 4000, "adj_words": 1000}

SEED = 0
FORMAT = "oodguard-wordnet-text-1"
DATA_FILE = "wordnet_text.json.gz"
SYNONYMS_FORMAT = "oodguard-wordnet-synonyms-1"
SYNONYMS_FILE = "wordnet_synonyms.json.gz"
LICENSE_FILE = "WORDNET_LICENSE.txt"
MIN_WORDS = 3


class WordNetEntry(NamedTuple):
    """One synset line; ``words`` have ``_`` turned into spaces, ``gloss`` is the definition only."""

    offset: str
    lexname: str
    words: tuple[str, ...]
    gloss: str


_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective syntax markers, e.g. "galore(ip)"


def parse_wordnet(path: str | Path) -> tuple[list[WordNetEntry], str]:
    """Read a WordNet 3.0 ``data.{noun,verb,adj,adv}`` file: its entries and its licence header.

    Line format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ... | gloss``,
    ``w_cnt`` in hexadecimal. Header lines start with two spaces and a line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; install WordNet (Debian: apt-get install wordnet-base) or pass its directory"
        )
    entries, header = [], []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):
                header.append(line[2:].split(" ", 1)[1].rstrip() if " " in line[2:] else "")
                continue
            head, separator, gloss = line.partition(" | ")
            fields = head.split()
            if not separator or len(fields) < 6:
                raise ValueError(f"{path}: not a WordNet data line: {line[:80]!r}")
            count = int(fields[3], 16)
            if len(fields) < 4 + 2 * count:
                raise ValueError(f"{path}: not a WordNet data line (fewer words than w_cnt): {line[:80]!r}")
            words = tuple(_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
            definition = " ".join(gloss.split(";")[0].split())
            entries.append(WordNetEntry(fields[0], LEXNAMES[int(fields[1])], words, definition))
    return entries, "\n".join(header).strip() + "\n"


def _hash_order(keys: Iterable[str], seed: int) -> list[int]:
    keys = list(keys)
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest())


def _unique_glosses(entries: list[WordNetEntry]) -> list[WordNetEntry]:
    seen, kept = set(), []
    for entry in entries:
        if len(entry.gloss.split()) >= MIN_WORDS and entry.gloss not in seen:
            seen.add(entry.gloss)
            kept.append(entry)
    return kept


def _select(entries: list[WordNetEntry], n: int, pos: str, seed: int, what: str) -> dict[str, list[str]]:
    if len(entries) < n:
        raise ValueError(f"{what}: only {len(entries)} usable glosses, {n} requested")
    order = _hash_order((f"{pos}:{e.offset}" for e in entries), seed)[:n]
    return {"offsets": [entries[i].offset for i in order], "texts": [entries[i].gloss for i in order]}


def _words(entries: list[WordNetEntry], n: int, pos: str, seed: int) -> list[str]:
    words = sorted({word for entry in entries for word in entry.words})
    order = _hash_order((f"{pos}-word:{w}" for w in words), seed)[:n]
    return [words[i] for i in order]


def build_text_data(wordnet_dir: str | Path = "/usr/share/wordnet", seed: int = SEED) -> tuple[dict[str, Any], str]:
    """The benchmark's WordNet data and licence notice, built from the WordNet 3.0 data files in ``wordnet_dir``.

    Returns
    -------
    data : dict
        ``sets``: per set name (each ID topic, each near topic, ``verb-glosses``, ``adjective-glosses``) the
        WordNet ``offsets`` and gloss ``texts``; ``words``: ``noun`` and ``adjective`` candidate lists for
        negative-label mining (seeded subsets of the unique lemmas, sizes in ``SIZES``), plus provenance.
    license : str
        The WordNet 3.0 licence, as printed at the top of ``data.noun``.
    """
    wordnet_dir = Path(wordnet_dir)
    nouns, license_text = parse_wordnet(wordnet_dir / "data.noun")
    verbs, _ = parse_wordnet(wordnet_dir / "data.verb")
    adjectives, _ = parse_wordnet(wordnet_dir / "data.adj")
    unique_nouns = _unique_glosses(nouns)
    sets: dict[str, dict[str, list[str]]] = {}
    for topic in ID_TOPICS:
        chosen = [e for e in unique_nouns if e.lexname == topic]
        sets[topic] = _select(chosen, SIZES["id_topic"], "noun", seed, topic)
    for topic in NEAR_TOPICS:
        chosen = [e for e in unique_nouns if e.lexname == topic]
        sets[topic] = _select(chosen, SIZES["near_topic"], "noun", seed, topic)
    sets["verb-glosses"] = _select(_unique_glosses(verbs), SIZES["verb"], "verb", seed, "verb glosses")
    sets["adjective-glosses"] = _select(_unique_glosses(adjectives), SIZES["adj"], "adj", seed, "adjective glosses")
    data = {
        "format": FORMAT,
        "source": "WordNet 3.0 (Princeton University), Debian package wordnet-base: data.noun, data.verb, data.adj",
        "seed": seed,
        "sizes": dict(SIZES),
        "sets": sets,
        "words": {
            "noun": _words(nouns, SIZES["noun_words"], "noun", seed),
            "adjective": _words(adjectives, SIZES["adj_words"], "adj", seed),
        },
    }
    return data, license_text


def write_text_data(data: dict[str, Any], license_text: str, directory: str | Path) -> tuple[Path, Path]:
    """Write ``data`` as gzipped JSON (no timestamp, sorted keys: same data, same bytes) and the licence notice."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_path, license_path = directory / DATA_FILE, directory / LICENSE_FILE
    _write_json_gz(data, data_path)
    license_path.write_text(license_text, encoding="utf-8")
    return data_path, license_path


def _write_json_gz(data: dict[str, Any], path: Path) -> None:
    payload = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    path.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))


def _shipped(name: str) -> Any:
    return resources.files("oodguard.benchmark").joinpath("data").joinpath(name)


def _load_shipped(name: str, expected_format: Any, what: str) -> dict[str, Any]:
    """A shipped ``.json.gz`` file, checked to exist and to carry ``expected_format``; ``what`` names it in errors."""
    source = _shipped(name)
    if not source.is_file():
        raise FileNotFoundError(
            f"the packaged {what} {name} is missing; reinstall oodguard or regenerate it with scripts/make_text_data.py"
        )
    data = json.loads(gzip.decompress(source.read_bytes()).decode("utf-8"))
    if data.get("format") != expected_format:
        raise ValueError(f"{name}: format {data.get('format')!r}, expected {expected_format!r}; regenerate it")
    return data


def load_text_data() -> dict[str, Any]:
    """The shipped WordNet data (see :func:`build_text_data` for its layout)."""
    return _load_shipped(DATA_FILE, FORMAT, "text benchmark data")


def load_synonyms() -> dict[str, str]:
    """The shipped synonym table (see :func:`build_synonyms`): word -> its WordNet synonym."""
    return dict(_load_shipped(SYNONYMS_FILE, SYNONYMS_FORMAT, "synonym table")["synonyms"])


def license_notice() -> str:
    """WordNet 3.0's licence, shipped next to the derived data."""
    return _shipped(LICENSE_FILE).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- paraphrases
#: Function words that are never replaced. WordNet lists some of them as nouns or verbs ("a": vitamin A, "in":
#: inch, "be": beryllium), which would turn a definition into nonsense.
STOP_WORDS = frozenset(
    """a about above after again against all also among an and another any are as at be been before being below
    between both but by can could did do does done during each either especially esp etc every for from had has
    have having how however if in into is it its itself just least less may might more most much must neither no
    nor not of off often on once one only onto or other others out over own same several shall should so some
    such than that the their them then there these they this those through thus to too two under until up upon
    us usually very was were what when where whether which while who whom whose why will with within without
    would""".split()
)

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_SYNONYM = re.compile(r"^[a-z]+(?:[ -][a-z]+)?$")  # one or two lowercase words: no taxa, names or formulas


class IndexEntry(NamedTuple):
    """One line of a WordNet ``index.<pos>`` file: the lemma, its SemCor-tagged sense count, its first synset."""

    lemma: str
    tagged_senses: int
    first_offset: str


def parse_index(path: str | Path) -> list[IndexEntry]:
    """Read a WordNet 3.0 ``index.{noun,verb,adj,adv}`` file.

    Line format (wndb(5WN)): ``lemma pos synset_cnt p_cnt [ptr_symbol ...] sense_cnt tagsense_cnt synset_offset
    [synset_offset ...]``; the synsets are in order of frequency, most frequent first.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; install WordNet (Debian: apt-get install wordnet-base) or pass its directory"
        )
    entries = []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            fields = line.split()
            try:
                pointers = int(fields[3])
                synsets, offsets = int(fields[2]), fields[6 + pointers :]
                if len(offsets) != synsets:
                    raise ValueError
                entries.append(IndexEntry(fields[0], int(fields[5 + pointers]), offsets[0]))
            except (IndexError, ValueError):
                raise ValueError(f"{path}: not a WordNet index line: {line[:80]!r}") from None
    return entries


def build_synonyms(texts: Iterable[str], wordnet_dir: str | Path = "/usr/share/wordnet") -> dict[str, Any]:
    """A WordNet synonym for every replaceable word of ``texts``, for paraphrasing them (:func:`paraphrase`).

    A word is replaceable when it is written in lowercase (names and taxa are left alone), has at least 3 letters,
    is not in :data:`STOP_WORDS` and is a WordNet lemma with at least one sense tagged in SemCor. Its part of speech
    is the one with the most tagged senses (ties: noun, verb, adjective, adverb); its sense is that part of speech's
    most frequent one (the first synset of its index line); its synonym is that synset's first other lemma that is
    one or two lowercase words. The text is not parsed, so a word used as another part of speech than its most
    frequent one gets a synonym of the wrong kind ("marine" the adjective becomes the noun "devil dog"), as in
    synonym-replacement augmentation (Wei & Zou, EDA, 2019), which also draws on WordNet.

    Returns ``{"format", "source", "synonyms": {word: synonym}}``.
    """
    wordnet_dir = Path(wordnet_dir)
    best: dict[str, tuple[int, str, str]] = {}  # lemma -> (tagged senses, pos, first synset), the most tagged pos
    lemmas: dict[tuple[str, str], tuple[str, ...]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for entry in parse_index(wordnet_dir / f"index.{pos}"):
            if entry.lemma not in best or entry.tagged_senses > best[entry.lemma][0]:
                best[entry.lemma] = (entry.tagged_senses, pos, entry.first_offset)
        synsets, _ = parse_wordnet(wordnet_dir / f"data.{pos}")
        lemmas.update(((pos, synset.offset), synset.words) for synset in synsets)
    synonyms: dict[str, str] = {}
    for text in texts:
        for match in _WORD.finditer(text):
            word = match.group()
            if word in synonyms or not word.islower() or len(word) < 3 or word in STOP_WORDS:
                continue
            tagged, pos, offset = best.get(word, (0, "", ""))
            if tagged < 1:
                continue
            others = (w for w in lemmas[pos, offset] if w != word and _SYNONYM.match(w))
            synonym = next(others, None)
            if synonym is not None:
                synonyms[word] = synonym
    return {
        "format": SYNONYMS_FORMAT,
        "source": "WordNet 3.0 (Princeton University), Debian package wordnet-base: index.* and data.* files",
        "synonyms": dict(sorted(synonyms.items())),
    }


def write_synonyms(data: dict[str, Any], directory: str | Path) -> Path:
    """Write the synonym table as gzipped JSON (same data, same bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SYNONYMS_FILE
    _write_json_gz(data, path)
    return path


def paraphrase(text: str, synonyms: dict[str, str], fraction: float = 0.5, seed: int = SEED) -> str:
    """``text`` with about ``fraction`` of its replaceable words swapped for their synonym in ``synonyms``.

    Whether the word at character ``i`` is swapped is decided by ``sha256(f"{seed}:{text}:{i}")``, so a text has
    the same paraphrase on every run, whatever the texts around it.

    Examples
    --------
    >>> paraphrase("a large owl", {"large": "big", "owl": "hooter"}, fraction=1.0)
    'a big hooter'
    """

    def swap(match: re.Match[str]) -> str:
        word = match.group()
        synonym = synonyms.get(word)
        if synonym is None:
            return word
        draw = int.from_bytes(hashlib.sha256(f"{seed}:{text}:{match.start()}".encode()).digest()[:8], "big")
        return synonym if draw < fraction * 2**64 else word

    return _WORD.sub(swap, text)


# ---------------------------------------------------------------------------------------------- far-OOD text
#: Pure-Python standard-library modules whose docstrings form the far-OOD set (technical prose about software).
DOCSTRING_MODULES = (
    "argparse", "ast", "asyncio", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "gzip",
    "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "multiprocessing", "pathlib", "pickle", "pkgutil", "poplib", "pydoc", "random", "shutil", "smtplib",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "tokenize", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


def _summary(doc: str) -> str | None:
    """First paragraph of a docstring, whitespace collapsed; None for signature lines and short or odd texts."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    words = paragraph.split()
    if not 5 <= len(words) <= 60 or _SIGNATURE.match(paragraph) or ">>>" in paragraph:
        return None
    return paragraph


def python_docstrings(n: int = 400, seed: int = SEED) -> list[str]:
    """``n`` docstring summaries of public functions, classes and methods of :data:`DOCSTRING_MODULES`.

    Real English text of another kind (software documentation) that ships with every Python. Each module's
    public functions and classes (no leading ``_``, defined in that module) and the classes' public functions
    (defined in that module too, so that methods other packages attach do not count) are visited in sorted order;
    the first paragraph of each docstring with 5-60 words is kept once; ``n`` are chosen in seeded hash order. The
    texts depend on the Python version (the embedding cache is keyed by them), not on what else was imported.
    """
    found: dict[str, None] = {}
    for module_name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a trimmed Python without e.g. multiprocessing: use the other modules
            continue
        with warnings.catch_warnings():  # e.g. typing's deprecated io/re namespaces warn when touched
            warnings.simplefilter("ignore", DeprecationWarning)
            for name, value in sorted(vars(module).items()):
                defined_here = (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module_name
                if name.startswith("_") or not defined_here:
                    continue
                members = [value]
                if inspect.isclass(value):
                    # methods defined in the module itself: other packages add some (transformers adds
                    # logging.Logger.warning_advice on import), which would make the set depend on what was imported
                    members += [v for k, v in sorted(vars(value).items())
                                if k[0] != "_" and inspect.isfunction(v) and v.__module__ == module_name]  # fmt: skip
                for member in members:
                    summary = _summary(member.__doc__) if isinstance(member.__doc__, str) else None
                    if summary is not None:
                        found.setdefault(summary)
    texts = list(found)
    if len(texts) < n:
        raise ValueError(f"python_docstrings: only {len(texts)} docstrings found, {n} requested")
    return [texts[i] for i in _hash_order(texts, seed)[:n]]


# ---------------------------------------------------------------------------------------------- unfamiliar text
_LETTERS = re.compile(r"[A-Za-z]{4,}")


def scramble_words(texts: Iterable[str], seed: int = SEED) -> list[str]:
    """Each text with the inner letters of every word of 4 or more letters permuted: "definition" -> "dfiteinoin".

    Lengths, first and last letters, punctuation, spacing and the multiset of letters stay; the word forms become
    ones that natural text (and so a text encoder's pre-training corpus) almost never holds. The permutation of a
    word's inner letters is their seeded sha256 order (key ``f"{seed}:{text}:{word}:{letter}"`` by position), so it
    is the same on every platform and Python version.
    """
    scrambled = []
    for t, text in enumerate(texts):
        pieces, last = [], 0
        for w, match in enumerate(_LETTERS.finditer(text)):
            word = match.group()
            inner = word[1:-1]
            order = sorted(range(len(inner)),
                           key=lambda i: hashlib.sha256(f"{seed}:{t}:{w}:{i}".encode()).hexdigest())  # fmt: skip
            pieces.append(text[last : match.start()] + word[0] + "".join(inner[i] for i in order) + word[-1])
            last = match.end()
        scrambled.append("".join(pieces) + text[last:])
    return scrambled
