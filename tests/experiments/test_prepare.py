"""ablate builds the data caches once before the cells (the first cell's wall time and peak RSS must not include the
tokenizer training and the encoding): one load per distinct data config, a failure said but not fatal."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlm.config import load_config
from flatlm.experiments import prepare
from flatlm.experiments.prepare import distinct_data, prepare_data


def test_one_preparation_per_distinct_data_config(tmp_path: Path) -> None:
    """Cells that differ in optimizer or seed share one data config; another vocab_size is a second one."""
    configs = [
        load_config(None, ["optim.name=adamw", "seed=0"]),
        load_config(None, ["optim.name=sam", "seed=1"]),
        load_config(None, ["data.vocab_size=512"]),
    ]
    assert [c.data.vocab_size for c in distinct_data(configs)] == [configs[0].data.vocab_size, 512]
    calls: list[list[str]] = []

    def fake(command: list[str], log: Path) -> int:
        calls.append(command)
        return 0

    said: list[str] = []
    prepare_data(configs, tmp_path, said.append, run=fake)
    assert len(calls) == 2 and all(c[-3:-1] == ["-m", "flatlm.experiments.prepare"] for c in calls)
    assert "flatlm.experiments.pdeathsig" in calls[0]  # the child dies with ablate
    assert load_config(calls[1][-1]).data.vocab_size == 512  # the config it was handed is the cell's data
    assert said[0].startswith("preparing the data (1/2")
    prepare_data([], tmp_path / "none", said.append, run=fake)
    assert len(calls) == 2 and not (tmp_path / "none").exists()  # every cell finished: nothing to prepare


def test_a_failed_preparation_is_said_not_fatal(tmp_path: Path) -> None:
    def failing(command: list[str], log: Path) -> int:
        log.write_text("error: data.vocab_size=100000 is more than this corpus supports\n")
        return 2

    said: list[str] = []
    prepare_data([load_config(None, [])], tmp_path, said.append, run=failing)
    assert "preparing the data failed (exit 2)" in said[-1] and "more than this corpus supports" in said[-1]


@pytest.mark.timeout(60)
def test_main_builds_the_cache(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's entry point, in process: afterwards the cache directory holds the tokenizer and tokens."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLATLM_CACHE", str(cache))
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data: {{source: files, paths: ['{corpus}/*.txt'], vocab_size: 300, seq_len: 32, val_fraction: 0.1}}\n"
    )
    assert prepare.main([str(config)]) == 0
    assert cache.is_dir() and sum(1 for p in cache.rglob("*") if p.is_file()) >= 2
    config.write_text(f"data: {{source: files, paths: ['{tmp_path}/nothing/*.txt'], vocab_size: 300}}\n")
    assert prepare.main([str(config)]) == 2  # a FlatlmError is one line on stderr, exit 2
