"""Document sources: this Python's standard library, local files, or a ``datasets`` dataset.

Each source yields documents (str) in a deterministic order and fills a :class:`SourceStats`.
Text files are decoded as UTF-8; bytes that do not decode are dropped and counted. A few are normal
(a stray Latin-1 byte, the standard library's own KOI8-R test module). A corpus where more than
``MAX_BINARY_FRACTION`` of the bytes are not text (undecodable, or NUL) is binary files or another
encoding, and :func:`check_text` refuses it, naming the worst files; below that, files holding a NUL
byte (what git and grep call binary) are named in a warning. Malformed JSON lines and unreachable
datasets are one clear error each.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlm.config import DataConfig
from flatlm.errors import FlatlmError

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_BINARY_FRACTION = 0.01
"""Refuse a corpus whose text files hold more than this fraction of non-text bytes (undecodable or NUL)."""
WORST_FILES = 5


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
    text_files: int = 0
    """Text files read (not .jsonl/.json/.parquet)."""
    text_bytes: int = 0
    """Bytes of those files."""
    binary_bytes: int = 0
    """Bytes of those files that are not text: undecodable, or NUL."""
    worst_files: list[tuple[str, int, int]] = field(default_factory=list)
    """The files with the most non-text bytes: (path, non-text bytes, size), most first."""
    binary_files: int = 0
    """Files holding a NUL byte."""
    largest_binary_files: list[tuple[str, int]] = field(default_factory=list)
    """The largest of those: (path, size), largest first."""

    def add_file(self, path: Path, size: int, undecodable: int, nul: int) -> None:
        self.text_files += 1
        self.text_bytes += size
        self.undecodable_bytes += undecodable
        self.files_with_undecodable += undecodable > 0
        bad = undecodable + nul
        self.binary_bytes += bad
        if bad:
            self.worst_files.append((str(path), bad, size))
            self.worst_files.sort(key=lambda t: -t[1])
            del self.worst_files[WORST_FILES:]
        if nul:
            self.binary_files += 1
            self.largest_binary_files.append((str(path), size))
            self.largest_binary_files.sort(key=lambda t: -t[1])
            del self.largest_binary_files[WORST_FILES:]


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):  # pruned: rglob walked all of site-packages (3 s, torch's)
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    files.sort()
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
        raw = path.read_bytes()
        text, bad = decode_utf8(raw)
        stats.add_file(path, len(raw), bad, raw.count(0))
        yield text


def check_text(stats: SourceStats, warn: Callable[[str], None]) -> None:
    """Refuse a corpus that is mostly not text (binary files); warn about binary files in a text corpus."""
    if not stats.binary_bytes:
        return
    worst = ", ".join(f"{p} ({bad / max(size, 1):.0%})" for p, bad, size in stats.worst_files)
    fraction = stats.binary_bytes / max(stats.text_bytes, 1)
    if fraction > MAX_BINARY_FRACTION:
        raise FlatlmError(
            f"the data files are not text: {stats.binary_bytes:,} of their {stats.text_bytes:,} bytes "
            f"({fraction:.1%}, more than {MAX_BINARY_FRACTION:.0%}) are not UTF-8 text (undecodable or NUL), most "
            f"in {worst}; point data.paths at text files (e.g. a glob such as 'corpus/*.txt') or convert them to UTF-8"
        )
    if stats.binary_files:
        named = ", ".join(p for p, _ in stats.largest_binary_files)
        more = f" (and {stats.binary_files - WORST_FILES} more)" if stats.binary_files > WORST_FILES else ""
        warn(
            f"{stats.binary_files} data file(s) hold NUL bytes (binary, not text) and are trained on as text: "
            f"{named}{more}; narrow data.paths to text files"
        )


def _table_rows(dataset: Any, field: str, where: str) -> Iterator[str]:
    for row in dataset:
        if field not in row:
            raise FlatlmError(f"{where} has no column {field!r} (columns: {', '.join(row)}); set data.text_field")
        value = row[field]
        if value is not None:
            yield str(value)


def _jsonl_objects(path: Path, stats: SourceStats, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each line of a JSON-lines file (stdlib json: a bad line is named by its number)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line, bad = decode_utf8(raw)
            stats.undecodable_bytes += bad
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FlatlmError(
                    f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); fix or remove line "
                    f"{number} (each line of a .jsonl file is one JSON object)"
                ) from None
            if not isinstance(row, dict):
                raise FlatlmError(
                    f"{path}:{number}: a JSON {type(row).__name__}, not an object with {what}; "
                    f"fix or remove line {number} (each line of a .jsonl file is one JSON object)"
                )
            yield number, row


def _jsonl_rows(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    """The ``field`` of each line of a JSON-lines file."""
    for number, row in _jsonl_objects(path, stats, f"a {field!r} field"):
        yield from _table_rows([row], field, f"{path}:{number}")


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence libraries' own logging inside the block: their failures reach the user as one FlatlmError."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dataset_file_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a .json or .parquet file, through datasets (streaming: nothing is copied to its cache)."""
    import datasets
    import pyarrow as pa

    builder = TABLE_SUFFIXES[path.suffix.lower()]
    try:
        with _quiet("datasets"):  # datasets logs its own "Failed to load JSON" before raising
            yield from datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    except (ValueError, pa.ArrowException) as exc:  # pyarrow's and the json fallback's parse errors
        kind = "JSON (a list of objects, or one object per line)" if builder == "json" else "parquet"
        raise FlatlmError(f"{path} is not valid {kind} ({exc}); fix or remove the file") from None


def _table_files(files: list[Path], field: str, stats: SourceStats) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_rows(path, field, stats)
            continue
        for row in _dataset_file_rows(path):
            yield from _table_rows([row], field, str(path))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What datasets raises when the Hub cannot be reached (or, online, has no such dataset)."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return ConnectionError, TimeoutError, DatasetNotFoundError, HfHubHTTPError, OfflineModeIsEnabled


def _hf_dataset(cfg: DataConfig) -> Iterator[str]:
    yield from _table_rows(_hf_rows(cfg), cfg.text_field, f"dataset {cfg.name!r}")


def _hf_rows(cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The rows of ``data.name`` (one clear error when it cannot be reached or does not exist)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    if not cfg.name:
        raise FlatlmError("data.source=hf needs data.name (a dataset name or a local dataset directory)")
    try:
        # huggingface_hub logs every retry of an unreachable Hub (twice, through flatlm's handler too): the
        # failure reaches the user as one line instead. Streaming datasets may fail later, while iterating.
        with _quiet("huggingface_hub", "datasets"):
            ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
            yield from ds
    except FileNotFoundError as exc:
        if isinstance(exc, DatasetNotFoundError) and not Path(cfg.name).expanduser().exists():  # a FileNotFoundError
            raise FlatlmError(
                f"dataset {cfg.name!r} is not on the Hugging Face Hub or is not public "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); check data.name "
                "(or log in with `hf auth login` for a gated dataset)"
            ) from None
        raise FlatlmError(
            f"data path {cfg.name!r} does not exist or holds no dataset ({exc}); set data.name to a "
            "local dataset directory or a dataset id this machine can reach"
        ) from None
    except _hub_errors() as exc:
        if Path(cfg.name).expanduser().exists():
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FlatlmError(
            f"could not reach dataset {cfg.name!r} on the Hugging Face Hub ({detail}); without network, set "
            "data.name to a local dataset directory, or load the dataset once where the Hub is reachable and "
            "rerun with HF_DATASETS_OFFLINE=1 to read it from the datasets cache"
        ) from None


def _raw_documents(cfg: DataConfig, stats: SourceStats) -> Iterator[str]:
    if cfg.source == "stdlib":
        yield from _text_files(stdlib_files(), stats)
    elif cfg.source == "files":
        files = expand_paths(cfg.paths)
        text = [p for p in files if p.suffix.lower() not in TABLE_SUFFIXES]
        tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
        yield from _text_files(text, stats)
        yield from _table_files(tables, cfg.text_field, stats)
    else:
        yield from _hf_dataset(cfg)


def iter_rows(cfg: DataConfig, stats: SourceStats | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of each row of a chat source, ``where`` naming it in errors (``file:line``); at most
    ``data.max_documents`` rows. Chat files are .jsonl, .json or .parquet (one row per conversation)."""
    stats = stats if stats is not None else SourceStats()
    rows: Iterator[tuple[str, dict[str, Any]]]
    if cfg.source == "stdlib_docs":
        from flatlm.data.docstrings import docstring_rows

        rows = ((f"stdlib_docs row {i}", row) for i, row in enumerate(docstring_rows(), start=1))
    elif cfg.source == "files":
        rows = _file_rows(expand_paths(cfg.paths), stats)
    elif cfg.source == "hf":
        rows = ((f"dataset {cfg.name!r} row {i}", row) for i, row in enumerate(_hf_rows(cfg), start=1))
    else:
        raise FlatlmError(f"data.source={cfg.source} has no chat rows; use stdlib_docs, files or hf")
    for where, row in rows:
        stats.documents += 1
        yield where, row
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return


def _file_rows(files: list[Path], stats: SourceStats) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise FlatlmError(
                f"{path} is not a table of chat rows; data.format=chat reads .jsonl, .json or .parquet files "
                "(one conversation per row): fix data.paths"
            )
        if suffix == ".jsonl":
            for number, row in _jsonl_objects(path, stats, "chat fields"):
                yield f"{path}:{number}", row
        else:
            for i, row in enumerate(_dataset_file_rows(path), start=1):
                yield f"{path} row {i}", row


def chat_texts(cfg: DataConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Every string of each chat row (contents, prompts, answers), one document per row: what a tokenizer for a
    chat set is trained on."""
    for _, row in iter_rows(cfg, stats):
        yield "\n".join(_strings(row))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def iter_documents(cfg: DataConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Documents of ``cfg``'s source after the min_chars filter, at most max_documents of them. A chat source
    (data.format=chat) gives the text of each row (``chat_texts``): what its tokenizer is trained on."""
    stats = stats if stats is not None else SourceStats()
    if cfg.format == "chat":
        yield from chat_texts(cfg, stats)
        return
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
    if cfg.format == "chat":  # only for chat: the text caches' keys stay what they were
        h.update(json.dumps({"format": cfg.format, "chat_format": cfg.chat_format}).encode())
    files: list[Path] = []
    if cfg.source in ("stdlib", "stdlib_docs"):
        files = stdlib_files()
    elif cfg.source == "files":
        files = expand_paths(cfg.paths)
    elif cfg.name and Path(cfg.name).is_dir():
        files = sorted(p for p in Path(cfg.name).rglob("*") if p.is_file())
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
