"""The run directory as users meet it: which reruns are the same run, read-only directories, what overwrite says."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flatlm.config import dump_yaml, load_config, run_identity_diff, to_dict
from flatlm.errors import FlatlmError
from flatlm.train.loop import train
from flatlm.train.rundir import check_output_dir
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"


def _previous_run(out: Path, *overrides: str, config_file: Path | None = None) -> dict:
    """``out`` as a finished run of this config leaves it (config.yaml as the loop writes it)."""
    cfg = load_config(config_file, [f"output_dir={out}", *overrides])
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return to_dict(cfg)


def test_default_yaml_continues_the_default_run(tmp_path: Path) -> None:
    """`flatlm train` then `flatlm train --config configs/default.yaml` is one run, and so is writing out a
    hyperparameter's default; a real change is still refused, naming the resolved values."""
    out = tmp_path / "default"
    _previous_run(out)
    check_output_dir(load_config(DEFAULT_YAML, [f"output_dir={out}"]))
    check_output_dir(load_config(None, [f"output_dir={out}", "optim.hparams.betas=[0.9,0.95]"]))
    check_output_dir(load_config(None, [f"output_dir={out}", "optim.hparams.eps=1e-8"]))  # torch's default
    with pytest.raises(FlatlmError, match=r"different run \(optim.hparams.betas: \[0.9, 0.95\] -> \[0.9, 0.99\]\)"):
        check_output_dir(load_config(None, [f"output_dir={out}", "optim.hparams.betas=[0.9,0.99]"]))


def test_identity_as_written_would_refuse_the_default_yaml(tmp_path: Path) -> None:
    """The comparison above discriminates: the configs differ as written (the bug compared those)."""
    written = to_dict(load_config(None, ["optim.hparams.betas=[0.9,0.95]"]))
    assert "optim.hparams.betas" in run_identity_diff(to_dict(load_config()), written)


def test_another_optimizer_is_named_not_its_hyperparameters(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _previous_run(out)
    with pytest.raises(FlatlmError, match=r"different run \(optim.name: 'adamw' -> 'lion'\)"):
        check_output_dir(load_config(None, [f"output_dir={out}", "optim.name=lion"]))


def test_sam_resolves_its_base(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _previous_run(out, "optim.name=sam")
    check_output_dir(load_config(None, [f"output_dir={out}", "optim.name=sam", "optim.hparams.base=adamw"]))
    check_output_dir(load_config(None, [f"output_dir={out}", "optim.name=sam", "optim.hparams.rho=0.05"]))
    with pytest.raises(FlatlmError, match=r"optim.hparams.base: 'adamw' -> 'lion'"):
        check_output_dir(load_config(None, [f"output_dir={out}", "optim.name=sam", "optim.hparams.base=lion"]))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make the directory ``path`` unwritable for this process: mode 0555, or (root ignores modes) the immutable
    attribute. Skips when neither works here (root on a file system without chattr)."""
    path.mkdir(parents=True, exist_ok=True)
    immutable = os.geteuid() == 0
    if immutable:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available: cannot make a directory read-only")
    else:
        path.chmod(0o555)
    try:
        with pytest.raises(OSError):  # the premise: nothing can be created in it
            (path / "probe").mkdir()
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


@pytest.mark.parametrize("inside", [False, True], ids=["is-read-only", "under-read-only"])
def test_read_only_output_dir_is_one_error_before_anything(tmp_path: Path, text_corpus: Path, inside: bool) -> None:
    locked = tmp_path / "locked"
    out = locked / "run" if inside else locked
    with read_only(locked):
        with pytest.raises(FlatlmError, match=rf"output_dir '{out}' is not writable .*read-only.*choose a directory"):
            train(load_config(None, tiny_overrides(out, text_corpus)))
        assert list(locked.iterdir()) == []


def test_shard_optimizer_state_in_one_process_is_warned(
    tmp_path: Path, text_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"parallel.shard_optimizer_state": True, "train.max_steps": 1}
    with caplog.at_level(logging.WARNING, logger="flatlm"):
        train(load_config(None, tiny_overrides(tmp_path / "run", text_corpus, **extra)))
    warned = [r.getMessage() for r in caplog.records if "shard_optimizer_state" in r.getMessage()]
    assert len(warned) == 1 and "does nothing in one process" in warned[0]
