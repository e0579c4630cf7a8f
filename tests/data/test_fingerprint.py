"""``data_fingerprint``: the same data give the same print, whatever cache directory holds them (two nodes' own
caches); another tokenizer, one document changed or removed, or another split gives another print. And
``check_same_data`` on two gloo ranks: ranks fed different data stop with one error naming both groups, ranks fed
the same data pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flatlm.config import load_config
from flatlm.data.splits import data_fingerprint, load_data
from flatlm.errors import FlatlmError
from tests.conftest import tiny_overrides
from tests.ranks import run_ranks


def _print(corpus: Path, cache: Path, tmp: Path, **extra: object) -> str:
    cfg = load_config(None, [*tiny_overrides(tmp / "out", corpus, **extra), f"data.cache_dir={cache}"])
    return data_fingerprint(load_data(cfg))


@pytest.mark.timeout(120)
def test_the_fingerprint_follows_the_data_not_the_cache(tmp_path: Path, corpus: Path) -> None:
    base = _print(corpus, tmp_path / "cache-a", tmp_path)
    copy = tmp_path / "copy"  # another node's copy of the corpus (other paths, other mtimes), its own cache
    shutil.copytree(corpus, copy)
    for f in copy.iterdir():
        os.utime(f, (1, 1))
    assert _print(copy, tmp_path / "cache-b", tmp_path) == base
    assert _print(corpus, tmp_path / "cache-a", tmp_path, **{"data.vocab_size": 300}) != base  # another tokenizer
    assert _print(corpus, tmp_path / "cache-a", tmp_path, **{"data.seed": 5}) != base  # another split
    changed = tmp_path / "changed"
    shutil.copytree(corpus, changed)
    first = sorted(changed.iterdir())[0]
    first.write_text(first.read_text().replace(" ", "  ", 1) + " an extra word")
    assert _print(changed, tmp_path / "cache-c", tmp_path) != base
    sorted(changed.iterdir())[-1].unlink()  # a document fewer
    assert _print(changed, tmp_path / "cache-d", tmp_path) != base


def _check(rank: int, world_size: int, prints: list[str]) -> None:
    from flatlm.train.checks import check_same_data

    check_same_data("same", f"node{rank}")  # the same everywhere: passes
    if len(set(prints)) == 1:
        check_same_data(prints[rank], f"node{rank}")
        return
    with pytest.raises(FlatlmError) as err:
        check_same_data(prints[rank], f"node{rank}")
    text = str(err.value)
    assert "ranks 0 (node0) have data aaaa" in text and "ranks 1 (node1), 2 (node2) have data bbbb" in text, text
    assert "FLATLM_CACHE on a shared file system" in text


@pytest.mark.timeout(120)
def test_ranks_fed_different_data_stop_with_one_error() -> None:
    run_ranks(_check, ["aaaa", "bbbb", "bbbb"], world_size=3)
