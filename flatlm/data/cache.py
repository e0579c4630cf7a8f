"""The tokenized corpus on disk: a memory-mapped token array with document offsets.

Layout of ``<cache_dir>/<key>/``: ``tokenizer.model``, ``tokens.bin`` (every document followed by
EOS, uint16 or uint32), ``offsets.npy`` (int64, document i is ``tokens[offsets[i]:offsets[i+1]]``,
EOS included) and ``meta.json``. The key hashes the source's fingerprint and the tokenizer options,
so a changed corpus or vocabulary builds a new cache. A cache is built in a temporary directory and
renamed into place: readers never see a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from flatlm.config import DataConfig
from flatlm.data.sources import SourceStats, iter_documents, source_fingerprint
from flatlm.data.tokenizer import TOKENIZER_VERSION, Tokenizer, sample_lines, train_tokenizer
from flatlm.errors import FlatlmError

ENCODE_CHUNK = 512  # documents per sentencepiece batch call


@dataclass
class TokenCache:
    path: Path
    tokenizer: Tokenizer
    tokens: np.ndarray
    """All documents' tokens, each followed by EOS (memory-mapped)."""
    offsets: np.ndarray
    """Start of each document in ``tokens``, plus the total at the end."""
    meta: dict[str, Any]

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def default_cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir == DataConfig().cache_dir and os.environ.get("FLATLM_CACHE"):
        return Path(os.environ["FLATLM_CACHE"]).expanduser()
    return Path(cfg.cache_dir).expanduser()


def cache_key(cfg: DataConfig) -> str:
    h = hashlib.sha256()
    parts = {
        "source": source_fingerprint(cfg),
        "vocab_size": cfg.vocab_size,
        "tokenizer_sample_lines": cfg.tokenizer_sample_lines,
        "tokenizer_version": TOKENIZER_VERSION,
        "tokenizer": hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()
        if cfg.tokenizer
        else None,
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:20]


def load_or_build(cfg: DataConfig, log: Any = print) -> TokenCache:
    """Open the cache for ``cfg``, building it first when it does not exist yet."""
    tokenizer = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    root = default_cache_dir(cfg)
    path = root / cache_key(cfg)
    if not (path / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=root))
        try:
            _build(cfg, tmp, tokenizer, log)
            try:
                os.rename(tmp, path)
            except OSError:  # another process finished the same cache first: use theirs
                if not (path / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _open(path)


def _open(path: Path) -> TokenCache:
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
    offsets = np.load(path / "offsets.npy")
    return TokenCache(path, Tokenizer.load(path / "tokenizer.model"), tokens, offsets, meta)


def _build(cfg: DataConfig, out: Path, tokenizer: Tokenizer | None, log: Any) -> None:
    stats = SourceStats()
    if tokenizer is None:
        lines = sample_lines(iter_documents(cfg, stats), cfg.tokenizer_sample_lines, seed=0)
        _check_nonempty(cfg, stats)
        log(f"training a {cfg.vocab_size}-piece tokenizer on {len(lines)} lines of {stats.documents} documents")
        tokenizer = Tokenizer(train_tokenizer(lines, cfg.vocab_size))
    tokenizer.save(out / "tokenizer.model")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32

    stats = SourceStats()  # count again on the encoding pass (the first may have been skipped)
    offsets = [0]
    docs = iter_documents(cfg, stats)
    with open(out / "tokens.bin", "wb") as f:
        while chunk := list(islice(docs, ENCODE_CHUNK)):
            for ids in tokenizer.encode(chunk):
                ids.append(tokenizer.eos_id)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
    _check_nonempty(cfg, stats)
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": offsets[-1],
        "num_documents": len(offsets) - 1,
        "vocab_size": tokenizer.vocab_size,
        "stats": asdict(stats),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(
        f"tokenized {meta['num_documents']} documents into {meta['num_tokens']:,} tokens"
        + (
            f"; skipped {stats.undecodable_bytes} undecodable bytes in {stats.files_with_undecodable} files"
            if stats.undecodable_bytes
            else ""
        )
    )


def _check_nonempty(cfg: DataConfig, stats: SourceStats) -> None:
    if stats.documents == 0:
        raise FlatlmError(
            f"the corpus is empty after filtering: 0 documents kept, {stats.dropped_short} dropped as "
            f"shorter than data.min_chars={cfg.min_chars}; lower data.min_chars or point the data "
            "source at non-empty text"
        )
