"""The command line as a user meets it: exit codes, one-line errors, --help, the default job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, module: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flatlm.train", *args] if module else [sys.executable, "-m", "flatlm.train.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=os.environ.copy())


def test_unknown_key_is_one_line_and_exit_2() -> None:
    r = _cli("train", "train.max_stepz=3")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown config key 'train.max_stepz'" in lines[0] and "max_steps" in lines[0]


def test_help_lists_keys() -> None:
    r = _cli("train", "--help")
    assert r.returncode == 0
    for key in ("output_dir", "train.max_steps", "checkpoint.every", "optim.name", "data.source"):
        assert key in r.stdout


def test_unknown_command() -> None:
    r = _cli("trian")
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr


def test_module_entry_point_runs(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    r = _cli(*tiny_overrides(out, text_corpus, **{"train.max_steps": 2}), module=True)
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_config_file_and_overrides(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 50\n")
    r = _cli("train", "--config", str(cfg), *tiny_overrides(out, text_corpus, **{"train.max_steps": 3}))
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


@pytest.mark.slow
def test_default_job_30_steps(tmp_path: Path) -> None:
    """The README's default job, shortened: stdlib corpus, tiny Llama, 30 steps."""
    out = tmp_path / "default"
    r = _cli("train", f"output_dir={out}", "train.max_steps=30", "train.progress_bar=false")
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[0]["loss"] - records[-1]["loss"] > 0.5
    assert (out / "checkpoints" / "step-30" / "state" / ".metadata").is_file()
    assert (out / "loss.png").is_file()


_FAST_ERRORS = r"""
import contextlib, io, json, sys, time
from flatlm.train.cli import main
cases = json.loads(sys.argv[1])
results = []
for args in cases:
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(["train", *args])
    heavy = sorted(m for m in ("transformers", "flatlm.train.loop", "flatlm.models") if m in sys.modules)
    results.append({"rc": rc, "stderr": err.getvalue(), "heavy": heavy, "s": time.perf_counter() - t0})
print(json.dumps(results))
"""


def test_static_errors_come_before_the_heavy_imports(tmp_path: Path) -> None:
    """A typo, a wrong-shaped hyperparameter or a data path that matches nothing is one line, exit 2, before the
    CLI imports the loop (transformers, checkpointing) and long before any data is read."""
    import json

    out = f"output_dir={tmp_path / 'run'}"
    cases = [
        [out, "schedule.name=cosin"],
        [out, "optim.hparams.betas=[0.9]"],
        [out, "data.source=files"],
        [out, "data.source=files", f"data.paths={tmp_path}/absent/*.txt"],
    ]
    expected = [
        "flatlm train: error: unknown schedule 'cosin' (did you mean 'cosine'?)",
        "flatlm train: error: optim.hparams.betas=[0.9] does not work for optimizer 'adamw' (IndexError",
        "flatlm train: error: data.source=files needs data.paths",
        f"flatlm train: error: data path '{tmp_path}/absent/*.txt' does not exist",
    ]
    r = subprocess.run(
        [sys.executable, "-c", _FAST_ERRORS, json.dumps(cases)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    for result, start in zip(json.loads(r.stdout), expected, strict=True):
        lines = result["stderr"].splitlines()
        assert result["rc"] == 2 and len(lines) == 1 and lines[0].startswith(start), result
        assert result["heavy"] == [], result
    assert not (tmp_path / "run").exists()


def test_a_command_is_one_entry_of_the_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``flatlm --help`` lists the table; a new entry is dispatched, parsed and its errors reported like the
    others (one line, status 2), with no other change."""
    import argparse

    from flatlm.errors import FlatlmError
    from flatlm.train import cli

    def parser(prog: str) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=prog)
        p.add_argument("what")
        return p

    def run(args: argparse.Namespace) -> int:
        if args.what == "bad":
            raise FlatlmError("'bad' is not a thing to probe; try 'good'")
        print(f"probed {args.what}")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "probe", cli.Command("probe something", parser, run))
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("train", "export", "probe")) and "probe something" in listed
    assert cli.main(["probe", "good"]) == 0 and capsys.readouterr().out == "probed good\n"
    assert cli.main(["probe", "bad"]) == 2
    assert capsys.readouterr().err == "flatlm probe: error: 'bad' is not a thing to probe; try 'good'\n"
    with pytest.raises(SystemExit) as stop:
        cli.main(["nope"])
    assert stop.value.code == 2 and re.search(r"commands: train, export, .*probe\n", capsys.readouterr().err)
