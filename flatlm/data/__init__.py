"""Data: sources, the sentencepiece tokenizer, token caches, packing and sampling into ``Batch``es; chat rows,
templates and loss masks for supervised fine-tuning (``chat``, ``sft``)."""

from flatlm.data.batch import Batch, as_batch
from flatlm.data.cache import TokenCache, load_or_build
from flatlm.data.packing import PackedSequences, require_sequences, split_documents
from flatlm.data.sampler import GlobalBatchSampler
from flatlm.data.sft import Examples, PackedExamples, PaddedExamples
from flatlm.data.sources import SourceStats, iter_documents
from flatlm.data.tokenizer import Tokenizer

__all__ = [
    "Batch",
    "Examples",
    "GlobalBatchSampler",
    "PackedExamples",
    "PackedSequences",
    "PaddedExamples",
    "SourceStats",
    "TokenCache",
    "Tokenizer",
    "as_batch",
    "iter_documents",
    "load_or_build",
    "require_sequences",
    "split_documents",
]
