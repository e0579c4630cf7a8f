"""The tokenized corpus on disk: a memory-mapped token array with document offsets, checked on every open.

Layout of the cache directory (``data.cache_dir``, or ``FLATLM_CACHE``):

- ``tokenizers/<tkey>.model`` (+ ``.json``): a tokenizer trained on a corpus; ``tkey`` hashes the source's
  fingerprint and the tokenizer options, so a rerun on the same data reuses it instead of training again.
- ``<key>/``: ``tokenizer.model`` (or ``tokenizer/``, a Hugging Face one), ``tokens.bin`` (every document
  followed by EOS, uint16 or uint32), ``offsets.npy`` (int64, document i is ``tokens[offsets[i]:offsets[i+1]]``,
  EOS included) and ``meta.json``.
  ``key`` hashes the source's fingerprint and the tokenizer's ``sha256`` (of a sentencepiece model's bytes, of a
  Hugging Face tokenizer's canonical serialization): the same corpus tokenized by two tokenizers (a resumed run
  keeps its own) is two caches, never one mixed up with the other.

Integrity: ``meta.json`` records the tokenizer's sha256 (checked against the tokenizer opening it and the copy
stored beside the tokens), the blake2b digests of ``tokens.bin`` and ``offsets.npy`` and the range of
token ids. Every open checks sizes, offsets and digests (about 20 ms for the 10.5M-token stdlib corpus on
this project's CPU); a damaged cache is reported in one line and rebuilt. Caches are built in a temporary
directory and renamed into place (readers never see a half-written one), under a file lock per key
(concurrent builders never race: the second waits, then uses the first one's cache). Where the lock holds on one
node only (a shared file system whose flock is node-local), ``publish`` keeps whichever whole cache came first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from flatlm.config import DataConfig
from flatlm.data.hf_tokenizer import HFTokenizer
from flatlm.data.sources import SourceStats, check_text, iter_documents, source_fingerprint
from flatlm.data.tokenizer import (
    RUN_TOKENIZER_DIR,
    RUN_TOKENIZER_FILE,
    TOKENIZER_VERSION,
    AnyTokenizer,
    Tokenizer,
    load_tokenizer,
    sample_lines,
    train_tokenizer,
)
from flatlm.errors import FlatlmError

ENCODE_CHUNK = 512  # documents per sentencepiece batch call
CACHE_FORMAT = 2  # bump when the layout or meta.json changes
TOKENIZER_DIR = "tokenizers"
Log = Callable[[str], None]


@dataclass
class TokenCache:
    path: Path
    tokenizer: AnyTokenizer
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


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_key(cfg: DataConfig, fingerprint: str) -> str:
    """Names a tokenizer trained on this corpus with these options."""
    return digest(
        {
            "source": fingerprint,
            "vocab_size": cfg.vocab_size,
            "tokenizer_sample_lines": cfg.tokenizer_sample_lines,
            "tokenizer_version": TOKENIZER_VERSION,
        }
    )


def cache_key(cfg: DataConfig, tokenizer: AnyTokenizer, fingerprint: str | None = None) -> str:
    """Names the token cache of this corpus encoded by exactly this tokenizer (its sha256)."""
    return digest(
        {
            "source": fingerprint or source_fingerprint(cfg),
            "tokenizer_sha256": tokenizer.sha256,
            "format": CACHE_FORMAT,
        }
    )


def load_or_build(
    cfg: DataConfig, log: Log = print, tokenizer: AnyTokenizer | None = None, warn: Log | None = None
) -> TokenCache:
    """Open the cache for ``cfg``, building it first when it does not exist yet or is damaged.

    ``tokenizer``: encode with this one (a resumed run's own); by default ``data.tokenizer`` or one trained
    on the corpus (and cached). ``log`` gets progress lines, ``warn`` (default ``log``) what went wrong.
    """
    warn = warn or log
    root = default_cache_dir(cfg)
    fingerprint = source_fingerprint(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else trained_tokenizer(cfg, root, fingerprint, log)
    key = cache_key(cfg, tokenizer, fingerprint)
    path = root / key
    cache, problem = _open_checked(path, tokenizer)
    if cache is not None:
        return cache
    with locked(root, key, log):
        cache, problem = _open_checked(path, tokenizer)  # another process may have built it meanwhile
        if cache is not None:
            return cache
        if problem != "missing":
            warn(f"the token cache {path} is damaged ({problem}); rebuilding it")
        _remove_stale(root, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{builder()}-", dir=root))
        try:
            _build(cfg, tmp, tokenizer, fingerprint, log, warn)
            publish(tmp, path, lambda: _open_checked(path, tokenizer)[0] is not None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cache, problem = _open_checked(path, tokenizer)
    if cache is None:
        raise RuntimeError(f"the token cache {path} just built does not verify: {problem}")
    return cache


def resume_tokenizer(cfg: DataConfig, run_tokenizer: Path, warn: Log) -> AnyTokenizer:
    """A resumed run's own tokenizer (``run_tokenizer``: its ``tokenizer.model`` or ``tokenizer/``), and a warning
    when the data would now give another one.

    The model's embedding rows mean that tokenizer's pieces: resuming with a new one would silently
    train the old model on renumbered text. So the run keeps its tokenizer, whatever the corpus.
    """
    tokenizer = _read_run_tokenizer(run_tokenizer)
    if cfg.tokenizer:
        try:
            changed = load_tokenizer(cfg.tokenizer).sha256 != tokenizer.sha256
            why = "it is another tokenizer now"
        except FlatlmError:  # moved or deleted since: the run has its own copy
            changed, why = True, "it cannot be read now"
        if changed:
            warn(
                f"data.tokenizer {cfg.tokenizer!r} is not the tokenizer this run started with ({why}); "
                f"resuming with the run's own {run_tokenizer} ({tokenizer.vocab_size} pieces)"
            )
        return tokenizer
    if tokenizer.kind == "hf":  # never trained on the corpus: nothing to compare it with
        warn(f"data.tokenizer is not set; resuming with the run's own {run_tokenizer} ({tokenizer.vocab_size} ids)")
        return tokenizer
    root = default_cache_dir(cfg)
    trained = _cached_tokenizer(root / TOKENIZER_DIR / tokenizer_key(cfg, source_fingerprint(cfg)))
    if trained is None or trained.sha256 != tokenizer.sha256:
        why = (
            "a tokenizer trained on the current data differs from it"
            if trained is not None
            else f"no tokenizer trained on the current data is in {root} (the data files changed, or the cache moved)"
        )
        warn(
            f"the data are not what this run's tokenizer was trained on ({why}); resuming with the run's own "
            f"{run_tokenizer} ({tokenizer.vocab_size} pieces) and tokenizing the current data with it"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
def _read_run_tokenizer(path: Path) -> AnyTokenizer:
    """The run's own tokenizer at ``path``, or one error saying how to go on without it."""
    try:
        if path.is_dir():
            return HFTokenizer.load(path)
        return Tokenizer(path.read_bytes())
    except (OSError, RuntimeError, FlatlmError) as exc:
        if isinstance(exc, OSError):
            why = exc.strerror
        elif isinstance(exc, RuntimeError):
            why = "not a sentencepiece model"
        else:
            why = "not a loadable Hugging Face tokenizer"
        raise FlatlmError(
            f"the run's tokenizer {str(path)!r} cannot be read ({why}); restore it from a copy, or pass "
            "overwrite=true to start the run over with a new one"
        ) from None


def _stored_name(tokenizer: AnyTokenizer) -> str:
    """Where a cache directory keeps its tokenizer: ``tokenizer.model``, or ``tokenizer/`` for a Hugging Face one."""
    return RUN_TOKENIZER_DIR if tokenizer.kind == "hf" else RUN_TOKENIZER_FILE


def _stored_sha256(path: Path) -> str | None:
    """The sha256 of the tokenizer stored at ``path`` (a sentencepiece file: its bytes, no parsing), else None."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        return HFTokenizer.load(path).sha256
    except FlatlmError:
        return None


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise FlatlmError(
            f"the data cache directory {str(root)!r} is not writable ({exc.strerror or exc}); set data.cache_dir "
            "(or FLATLM_CACHE) to a directory this user can write"
        ) from None


@contextmanager
def locked(root: Path, key: str, log: Log) -> Iterator[None]:
    """Hold ``root/.<key>.lock``: one builder per key at a time, on this machine and across processes."""
    _writable(root)
    lock = FileLock(root / f".{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process building {root / key}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def builder() -> str:
    """This process among all builders of a cache, on every node: ``host-pid`` (pids repeat across machines)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _stale(suffix: str) -> bool:
    """Whether the directory a builder named with ``suffix`` (``<host>-<pid>-<random>``) is left over: its process on
    this host is gone. Another host's builder may be running (its node cannot be asked); a name without host and pid
    (an older flatlm's) is left over."""
    host, _, pid = suffix.rpartition("-")[0].rpartition("-")
    if not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _remove_stale(root: Path, key: str) -> None:
    """Temporary and damaged directories of ``key`` left by killed builders (run under the key's lock). A builder
    still running elsewhere keeps its own: on a shared file system the lock may hold on one node only."""
    for p in root.glob(f".{key}.*-*"):
        kind, _, suffix = p.name[len(key) + 2 :].partition("-")  # ".<key>.tmp-<host>-<pid>-<random>"
        if p.is_dir() and kind in ("tmp", "damaged") and _stale(suffix):
            shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, path: Path, whole: Callable[[], bool]) -> None:
    """Rename the directory ``tmp``, just built, to ``path``, unless ``whole()`` says ``path`` holds a whole one
    already: that one stays, and the caller drops ``tmp``.

    The key's lock lets one process build at a time, but on a shared file system the lock may hold on its own node
    only (flock is node-local on BeeGFS by default, and on Lustre mounted with ``localflock``), so another node may
    have built and published the same cache meanwhile. Its readers may have it open and it holds the same data: it
    is kept, never replaced. A damaged one is moved aside before it is removed (a rename is atomic, rmtree is not);
    a rename that another builder's rename beat leaves that builder's cache, which is used if whole."""
    if path.exists() and whole():
        return
    if path.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.damaged-{builder()}-", dir=path.parent))
        with contextlib.suppress(FileNotFoundError):  # another builder moved it first
            os.rename(path, aside / path.name)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path.exists() and whole()):
            raise


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _open_checked(path: Path, tokenizer: AnyTokenizer) -> tuple[TokenCache | None, str]:
    """The cache at ``path`` if it is whole, else ``(None, what is wrong)`` ("missing" when absent)."""
    if not path.exists():
        return None, "missing"
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None, f"format {meta.get('format')!r}, expected {CACHE_FORMAT}"
        stored = _stored_name(tokenizer)
        if meta.get("tokenizer_sha256") != tokenizer.sha256:
            return None, "meta.json names another tokenizer than the one it was keyed by"
        if _stored_sha256(path / stored) != tokenizer.sha256:
            return None, f"{stored} is not the tokenizer it was keyed by"
        dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        size = (path / "tokens.bin").stat().st_size
        if size != n * dtype.itemsize:
            return None, f"tokens.bin has {size:,} bytes, meta.json says {n * dtype.itemsize:,}"
        if file_digest(path / "offsets.npy") != meta["offsets_blake2b"]:
            return None, "offsets.npy does not match its checksum"
        offsets = np.load(path / "offsets.npy")
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
        if hashlib.blake2b(memoryview(tokens)).hexdigest() != meta["tokens_blake2b"]:
            return None, "tokens.bin does not match its checksum"
        if not (offsets[0] == 0 and offsets[-1] == n and len(offsets) == meta["num_documents"] + 1):
            return None, "offsets.npy does not fit tokens.bin"
        low, high = int(tokens.min()), int(tokens.max())  # one more pass at memory speed (~1 ms per 20 MB)
        if (low, high) != (meta["min_id"], meta["max_id"]) or high >= tokenizer.vocab_size:
            return None, (
                f"token ids {low}..{high}, meta.json says {meta['min_id']}..{meta['max_id']}, "
                f"for a {tokenizer.vocab_size}-piece tokenizer"
            )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # unreadable, garbled JSON or array
        return None, f"{type(exc).__name__}: {exc}"
    return TokenCache(path, tokenizer, tokens, offsets, meta), ""


def _cached_tokenizer(stem: Path) -> Tokenizer | None:
    """The trained tokenizer at ``stem.model`` if it is whole (its digest in ``stem.json``), else None."""
    try:
        info = json.loads(stem.with_suffix(".json").read_text())
        tokenizer = Tokenizer(stem.with_suffix(".model").read_bytes())
    except (OSError, ValueError, RuntimeError):
        return None
    return tokenizer if tokenizer.sha256 == info.get("sha256") else None


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` whole or not at all, through a temporary name no other writer picks (pids repeat across nodes)."""
    tmp = path.with_name(f".{path.name}.tmp-{builder()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def trained_tokenizer(cfg: DataConfig, root: Path, fingerprint: str, log: Log) -> Tokenizer:
    """The tokenizer trained on this corpus: from the cache, else trained now (once, under a lock) and cached."""
    key = tokenizer_key(cfg, fingerprint)
    stem = root / TOKENIZER_DIR / key
    tokenizer = _cached_tokenizer(stem)
    if tokenizer is not None:
        return tokenizer
    with locked(root, f"tokenizer-{key}", log):
        tokenizer = _cached_tokenizer(stem)
        if tokenizer is not None:
            return tokenizer
        stats = SourceStats()
        lines = sample_lines(iter_documents(cfg, stats), cfg.tokenizer_sample_lines, seed=0)
        _check_nonempty(cfg, stats)
        check_text(stats, lambda _: None)  # refuse binary data before training on it; warnings come when encoding
        log(f"training a {cfg.vocab_size}-piece tokenizer on {len(lines)} lines of {stats.documents} documents")
        tokenizer = Tokenizer(train_tokenizer(lines, cfg.vocab_size))
        if tokenizer.vocab_size < cfg.vocab_size:
            more = " or raise data.tokenizer_sample_lines" if len(lines) >= cfg.tokenizer_sample_lines else ""
            raise FlatlmError(
                f"data.vocab_size={cfg.vocab_size} is more than this corpus supports: sentencepiece finds at most "
                f"{tokenizer.vocab_size} pieces in its {len(lines):,} sampled lines; set data.vocab_size="
                f"{tokenizer.vocab_size} or less (or add data{more})"
            )
        stem.parent.mkdir(exist_ok=True)
        _atomic_write(stem.with_suffix(".model"), tokenizer.proto)
        info = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "lines": len(lines)}
        _atomic_write(stem.with_suffix(".json"), json.dumps(info, indent=2).encode())  # last: marks it whole
    return tokenizer


def _build(cfg: DataConfig, out: Path, tokenizer: AnyTokenizer, fingerprint: str, log: Log, warn: Log) -> None:
    tokenizer.save(out / _stored_name(tokenizer))
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    stats = SourceStats()
    offsets = [0]
    low, high = tokenizer.vocab_size, -1
    digest = hashlib.blake2b()
    docs = iter_documents(cfg, stats)
    with open(out / "tokens.bin", "wb") as f:
        while chunk := list(islice(docs, ENCODE_CHUNK)):
            for ids in tokenizer.encode(chunk):
                ids.append(tokenizer.eos_id)
                data = np.asarray(ids, dtype=dtype)
                low, high = min(low, int(data.min())), max(high, int(data.max()))
                f.write(data.tobytes())
                digest.update(data.tobytes())
                offsets.append(offsets[-1] + len(ids))
    _check_nonempty(cfg, stats)
    check_text(stats, warn)
    if high >= tokenizer.vocab_size:  # a tokenizer never does this; a wrong dtype would
        raise RuntimeError(f"token id {high} is outside the {tokenizer.vocab_size}-piece vocabulary")
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    meta = {
        "format": CACHE_FORMAT,
        "source_fingerprint": fingerprint,
        "tokenizer_sha256": tokenizer.sha256,
        "dtype": np.dtype(dtype).name,
        "num_tokens": offsets[-1],
        "num_documents": len(offsets) - 1,
        "vocab_size": tokenizer.vocab_size,
        "min_id": low,
        "max_id": high,
        "tokens_blake2b": digest.hexdigest(),
        "offsets_blake2b": file_digest(out / "offsets.npy"),
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
