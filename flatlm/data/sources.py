"""Document sources: this Python's standard library, local files, or a ``datasets`` dataset.

Each source yields documents (str) in a deterministic order and fills a :class:`SourceStats`.
Text files are decoded as UTF-8; bytes that do not decode are dropped and counted, never fatal.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlm.config import DataConfig
from flatlm.errors import FlatlmError

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class SourceStats:
    documents: int = 0
    """Documents kept."""
    dropped_short: int = 0
    """Documents dropped for having fewer than data.min_chars characters."""
    undecodable_bytes: int = 0
    """Bytes skipped because they were not valid UTF-8."""
    files_with_undecodable: int = 0
    """Files that held at least one such byte."""


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not files:
        raise FlatlmError(f"found no .py files under the standard library at {root}; use data.source=files")
    return files


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``data.paths`` (globs allowed, ``**`` recursive), sorted, each checked."""
    if not patterns:
        raise FlatlmError("data.source=files needs data.paths, e.g. data.paths='[corpus/*.txt]'")
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FlatlmError(
                f"data path {pattern!r} does not exist (no file matches it); fix data.paths to "
                "name existing files or globs"
            )
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            else:
                files.append(path)
    return files


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode ``raw`` as UTF-8, dropping undecodable bytes; returns (text, bytes dropped)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="surrogateescape")
        # surrogateescape maps each bad byte to one lone surrogate in U+DC80..U+DCFF.
        kept = "".join(ch for ch in text if not "\udc80" <= ch <= "\udcff")
        return kept, len(text) - len(kept)


def _text_files(files: list[Path], stats: SourceStats) -> Iterator[str]:
    for path in files:
        text, bad = decode_utf8(path.read_bytes())
        if bad:
            stats.undecodable_bytes += bad
            stats.files_with_undecodable += 1
        yield text


def _table_rows(dataset: Any, field: str, where: str) -> Iterator[str]:
    for row in dataset:
        if field not in row:
            raise FlatlmError(f"{where} has no column {field!r} (columns: {', '.join(row)}); set data.text_field")
        value = row[field]
        if value is not None:
            yield str(value)


def _table_files(files: list[Path], field: str) -> Iterator[str]:
    import datasets

    for path in files:
        builder = TABLE_SUFFIXES[path.suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        yield from _table_rows(ds, field, str(path))


def _hf_dataset(cfg: DataConfig) -> Iterator[str]:
    import datasets

    if not cfg.name:
        raise FlatlmError("data.source=hf needs data.name (a dataset name or a local dataset directory)")
    try:
        ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    except FileNotFoundError as exc:
        raise FlatlmError(
            f"data path {cfg.name!r} does not exist or holds no dataset ({exc}); set data.name to a "
            "local dataset directory or a dataset id this machine can reach"
        ) from None
    yield from _table_rows(ds, cfg.text_field, f"dataset {cfg.name!r}")


def _raw_documents(cfg: DataConfig, stats: SourceStats) -> Iterator[str]:
    if cfg.source == "stdlib":
        yield from _text_files(stdlib_files(), stats)
    elif cfg.source == "files":
        files = expand_paths(cfg.paths)
        text = [p for p in files if p.suffix.lower() not in TABLE_SUFFIXES]
        tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
        yield from _text_files(text, stats)
        yield from _table_files(tables, cfg.text_field)
    else:
        yield from _hf_dataset(cfg)


def iter_documents(cfg: DataConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Documents of ``cfg``'s source after the min_chars filter, at most max_documents of them."""
    stats = stats if stats is not None else SourceStats()
    for text in _raw_documents(cfg, stats):
        if len(text) < max(cfg.min_chars, 1):
            stats.dropped_short += 1
            continue
        stats.documents += 1
        yield text
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return


def source_fingerprint(cfg: DataConfig) -> str:
    """A short hash that changes when the documents could change (files by size and mtime)."""
    h = hashlib.sha256()
    keys = ("source", "name", "config_name", "split", "text_field", "max_documents", "min_chars")
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    files: list[Path] = []
    if cfg.source == "stdlib":
        files = stdlib_files()
    elif cfg.source == "files":
        files = expand_paths(cfg.paths)
    elif cfg.name and Path(cfg.name).is_dir():
        files = sorted(p for p in Path(cfg.name).rglob("*") if p.is_file())
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
