"""The token cache's integrity: damage is detected, said in one line and rebuilt; builds are atomic and never race."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from flatlm.config import DataConfig
from flatlm.data import load_or_build
from flatlm.data.cache import TOKENIZER_DIR, TokenCache, tokenizer_key
from flatlm.data.sources import source_fingerprint
from flatlm.data.tokenizer import Tokenizer, sample_lines, train_tokenizer
from flatlm.errors import FlatlmError
from tests.conftest import make_documents

ROOT = Path(__file__).resolve().parents[2]


def _cfg(corpus: Path, cache: Path, **extra: object) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus)], vocab_size=400, cache_dir=str(cache), **extra)


def _copy(cache: TokenCache) -> tuple[np.ndarray, np.ndarray]:
    return np.array(cache.tokens), np.array(cache.offsets)


class Logs:
    def __init__(self) -> None:
        self.info: list[str] = []
        self.warnings: list[str] = []

    def kwargs(self) -> dict:
        return {"log": self.info.append, "warn": self.warnings.append}


def test_truncated_tokens_are_rebuilt(text_corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(text_corpus, tmp_path / "c")
    built = load_or_build(cfg)
    tokens, offsets = _copy(built)
    assert built.meta["min_id"] >= 0 and built.meta["max_id"] < built.tokenizer.vocab_size
    assert built.meta["max_id"] == tokens.max() and built.meta["min_id"] == tokens.min()
    path = built.path / "tokens.bin"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    logs = Logs()
    again = load_or_build(cfg, **logs.kwargs())
    assert len(logs.warnings) == 1 and "\n" not in logs.warnings[0]
    assert f"the token cache {built.path} is damaged (tokens.bin has" in logs.warnings[0]
    assert "rebuilding it" in logs.warnings[0]
    assert any(m.startswith("tokenized 60 documents") for m in logs.info)  # rebuilt, not trained again
    assert not any(m.startswith("training") for m in logs.info)
    assert again.path == built.path
    np.testing.assert_array_equal(np.array(again.tokens), tokens)
    np.testing.assert_array_equal(np.array(again.offsets), offsets)
    assert sorted(p.name for p in again.path.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        [again.path.name, TOKENIZER_DIR]
    )  # the damaged copy is gone, no temporary directory left


def test_same_size_garbage_is_detected_by_the_checksum(text_corpus: Path, tmp_path: Path) -> None:
    """A garbled tokens.bin of the right size (ids far above the vocabulary) loads today; the digest catches it."""
    cfg = _cfg(text_corpus, tmp_path / "c")
    built = load_or_build(cfg)
    tokens, _ = _copy(built)
    path = built.path / "tokens.bin"
    size = path.stat().st_size
    garbled = tokens.copy()
    garbled[100:110] = 60000
    path.write_bytes(garbled.tobytes())
    assert path.stat().st_size == size  # the size check alone would pass
    logs = Logs()
    again = load_or_build(cfg, **logs.kwargs())
    assert len(logs.warnings) == 1 and "tokens.bin does not match its checksum" in logs.warnings[0]
    np.testing.assert_array_equal(np.array(again.tokens), tokens)
    assert int(np.array(again.tokens).max()) < again.tokenizer.vocab_size


@pytest.mark.parametrize(
    "damage",
    ["meta-json", "meta-missing", "offsets", "tokenizer", "tokenizer-sha", "id-range"],
)
def test_other_damage_is_rebuilt(text_corpus: Path, tmp_path: Path, damage: str) -> None:
    cfg = _cfg(text_corpus, tmp_path / "c")
    built = load_or_build(cfg)
    tokens, offsets = _copy(built)
    meta_path = built.path / "meta.json"
    if damage == "meta-json":
        meta_path.write_text(meta_path.read_text()[:40])
    elif damage == "meta-missing":
        meta_path.unlink()
    elif damage == "offsets":
        off = np.load(built.path / "offsets.npy")
        off[5] += 1
        np.save(built.path / "offsets.npy", off)
    elif damage == "tokenizer":
        (built.path / "tokenizer.model").write_bytes(b"not a model")
    elif damage == "tokenizer-sha":  # meta.json names another tokenizer (the cache is checked by its sha256)
        meta = json.loads(meta_path.read_text())
        meta["tokenizer_sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    else:  # meta.json states an id range the tokens do not have
        meta = json.loads(meta_path.read_text())
        meta["max_id"] = 70000
        meta_path.write_text(json.dumps(meta))
    logs = Logs()
    again = load_or_build(cfg, **logs.kwargs())
    assert len(logs.warnings) == 1 and "is damaged" in logs.warnings[0], logs.warnings
    np.testing.assert_array_equal(np.array(again.tokens), tokens)
    np.testing.assert_array_equal(np.array(again.offsets), offsets)


def test_cache_key_includes_the_tokenizer(text_corpus: Path, tmp_path: Path) -> None:
    """The same corpus tokenized by two tokenizers is two caches; each opens with its own tokenizer."""
    cfg = _cfg(text_corpus, tmp_path / "c")
    trained = load_or_build(cfg)
    other = Tokenizer(train_tokenizer(sample_lines(make_documents(80, seed=5), 10_000, seed=0), 350))
    assert other.sha256 != trained.tokenizer.sha256
    with_other = load_or_build(cfg, tokenizer=other)
    assert with_other.path != trained.path
    assert with_other.tokenizer.proto == other.proto == (with_other.path / "tokenizer.model").read_bytes()
    assert with_other.meta["tokenizer_sha256"] == other.sha256
    assert load_or_build(cfg).path == trained.path  # the trained tokenizer is reused from the cache, not retrained


def _build_in_child(cfg_json: str, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:
    logs: list[str] = []
    cfg = DataConfig.model_validate_json(cfg_json)
    barrier.wait(timeout=100)
    try:
        cache = load_or_build(cfg, log=logs.append)
    except BaseException as exc:  # readable in the parent's assertion, not a 100 s wait for a dead child
        queue.put(("failed", repr(exc), logs))
        raise
    queue.put((str(cache.path), cache.meta["tokens_blake2b"], logs))


@pytest.mark.timeout(120)
def test_concurrent_builders_never_race(text_corpus: Path, tmp_path: Path) -> None:
    """Two processes build the same cache at the same moment: one builds, the other waits and uses it.

    The test holds the tokenizer's build lock while both start, so both queue on it and are let go together.
    """
    cfg = _cfg(text_corpus, tmp_path / "c")
    root = tmp_path / "c"
    root.mkdir()
    held = FileLock(root / f".tokenizer-{tokenizer_key(cfg, source_fingerprint(cfg))}.lock")
    held.acquire()
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(cfg.model_dump_json(), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    barrier.wait(timeout=100)
    time.sleep(1.0)  # both children reach the lock and wait on it
    held.release()
    results = [queue.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0], results
    (path_a, sum_a, logs_a), (path_b, sum_b, logs_b) = results
    assert path_a == path_b and sum_a == sum_b, results
    all_logs = logs_a + logs_b
    assert sum(m.startswith("waiting for another process") for m in all_logs) >= 1, all_logs
    assert sum(m.startswith("training") for m in all_logs) == 1, all_logs
    assert sum(m.startswith("tokenized") for m in all_logs) == 1, all_logs


CHILD = """
import sys
from flatlm.config import DataConfig
from flatlm.data import load_or_build
load_or_build(DataConfig.model_validate_json(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_killed_build_leaves_no_cache(text_corpus: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of a build: no cache under the key, and the next build cleans up and succeeds.

    The corpus includes a named pipe, so the build blocks on reading it: the kill lands mid-build every time.
    """
    tok_path = tmp_path / "tok.model"
    load_or_build(_cfg(text_corpus, tmp_path / "c0")).tokenizer.save(tok_path)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    cfg = DataConfig(
        source="files", paths=[str(text_corpus), str(fifo)], tokenizer=str(tok_path), cache_dir=str(tmp_path / "c")
    )
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json()], cwd=ROOT)
    root = tmp_path / "c"
    deadline = time.monotonic() + 60
    while not (root.is_dir() and [p for p in root.iterdir() if ".tmp-" in p.name]) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    left = [p for p in root.iterdir() if not p.name.endswith(".lock")]
    assert [p.name for p in left if ".tmp-" in p.name], "the build never started"
    assert all(p.name.startswith(".") for p in left)  # only the temporary directory: no cache under its key
    text = make_documents(1, seed=9)[0]
    writer = threading.Thread(target=lambda: fifo.write_text(text))  # unblocks the rebuild's read of the pipe
    writer.start()
    cache = load_or_build(cfg)
    writer.join(timeout=30)
    assert cache.num_documents == 61
    assert cache.tokenizer.decode(cache.tokens[cache.offsets[60] : cache.offsets[61] - 1]) == text
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [cache.path.name]


def test_read_only_cache_dir_is_one_clear_error(text_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = ro / "probe"
        try:
            probe.mkdir()  # root writes anyway: then fail the writes the way the OS fails them for other users
            probe.rmdir()

            def refuse(*args: object, **kwargs: object) -> None:
                raise PermissionError(13, "Permission denied", str(ro))

            monkeypatch.setattr("flatlm.data.cache.tempfile.NamedTemporaryFile", refuse)
        except PermissionError:
            pass
        with pytest.raises(FlatlmError) as info:
            load_or_build(_cfg(text_corpus, ro))
        message = str(info.value)
        assert "\n" not in message
        assert f"the data cache directory {str(ro)!r} is not writable (Permission denied)" in message
        assert "data.cache_dir" in message and "FLATLM_CACHE" in message
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_cache_dir_with_a_built_cache_is_used(text_corpus: Path, tmp_path: Path) -> None:
    """A prepared cache in a read-only directory (shared, pre-built) opens without writing anything."""
    cfg = _cfg(text_corpus, tmp_path / "c")
    built = load_or_build(cfg)
    for p in [tmp_path / "c", *(tmp_path / "c").rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*"))
        again = load_or_build(cfg)
        assert again.path == built.path
        assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*")) == before
    finally:
        for p in [tmp_path / "c", *(tmp_path / "c").rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
