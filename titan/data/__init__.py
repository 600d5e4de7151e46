"""Data: tokenizers, document sources, and the packed, resumable, dp-sliced token loader."""

from titan.data.loader import TokenLoader, build_data
from titan.data.sources import IndexedDocuments, StreamingDocuments, load_documents
from titan.data.tokenizer import SentencePieceTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "IndexedDocuments",
    "SentencePieceTokenizer",
    "StreamingDocuments",
    "TokenLoader",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "load_documents",
]
