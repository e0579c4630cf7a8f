"""Data: sources, the sentencepiece tokenizer, token caches, packing and sampling."""

from flatlm.data.cache import TokenCache, load_or_build
from flatlm.data.packing import PackedSequences, require_sequences, split_documents
from flatlm.data.sampler import GlobalBatchSampler
from flatlm.data.sources import SourceStats, iter_documents
from flatlm.data.tokenizer import Tokenizer

__all__ = [
    "GlobalBatchSampler",
    "PackedSequences",
    "SourceStats",
    "TokenCache",
    "Tokenizer",
    "iter_documents",
    "load_or_build",
    "require_sequences",
    "split_documents",
]
