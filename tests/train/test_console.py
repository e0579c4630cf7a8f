"""What a user sees: progress on a terminal and in a log file, no third-party noise, and what export leaves."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from flatlm.train.metrics import Progress, read_jsonl
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _overrides(out: Path, corpus: Path, **extra: object) -> list[str]:
    # progress_bar on (the default), as a user runs it; plot and TensorBoard on, to catch their noise.
    base = {"train.progress_bar": True, "train.plot": True, "train.tensorboard": True}
    return tiny_overrides(out, corpus, **{**base, **extra})


def _flatlm(*args: str, env: dict[str, str], stderr_file: Path | None = None) -> subprocess.CompletedProcess:
    """``flatlm ...`` with stderr in a file (as a cluster job has it) when ``stderr_file`` is given."""
    cmd = [sys.executable, "-m", "flatlm.train.cli", *args]
    if stderr_file is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    with stderr_file.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=300, cwd=ROOT, env=env)
    proc.stderr = stderr_file.read_text()
    return proc


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, str, dict[str, str]]:
    """One CLI run with stderr in a file and a fresh matplotlib config (its first import builds the font cache and
    logs "generated new fontManager"): the run directory, its stderr and the environment."""
    tmp = tmp_path_factory.mktemp("logged")
    env = _env(MPLCONFIGDIR=str(tmp / "mpl"))
    out = tmp / "run"
    proc = _flatlm("train", *_overrides(out, corpus), env=env, stderr_file=tmp / "stderr.txt")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr, env


@pytest.mark.slow
def test_log_file_gets_lines_not_a_bar(logged_run: tuple[Path, str, dict[str, str]]) -> None:
    out, stderr, _ = logged_run
    assert "\r" not in stderr  # a tqdm bar would be carriage returns
    assert "step 1/6: loss " in stderr and "step 6/6: loss " in stderr  # the first and the last step
    losses = [f"{r['loss']:.4f}" for r in read_jsonl(out / "metrics.jsonl")]
    assert f"step 6/6: loss {losses[-1]}," in stderr


@pytest.mark.slow
def test_only_flatlm_speaks(logged_run: tuple[Path, str, dict[str, str]]) -> None:
    """No third-party line (matplotlib's font cache, torch, tensorboard) reaches the user."""
    _, stderr, env = logged_run
    assert list(Path(env["MPLCONFIGDIR"]).glob("fontlist-*.json"))  # the premise: the font cache was built here
    foreign = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[flatlm] ")]
    assert foreign == []
    assert "fontManager" not in stderr


@pytest.mark.slow
def test_rerun_with_nothing_to_do_adds_no_event_file(
    logged_run: tuple[Path, str, dict[str, str]], corpus: Path, tmp_path: Path
) -> None:
    out, _, env = logged_run
    before = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert len(before) == 1
    proc = _flatlm("train", *_overrides(out, corpus), env=env, stderr_file=tmp_path / "stderr.txt")
    assert proc.returncode == 0 and "nothing to do: the run is at step 6" in proc.stderr
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == before


@pytest.mark.slow
def test_export_is_quiet_and_respects_the_umask(logged_run: tuple[Path, str, dict[str, str]], tmp_path: Path) -> None:
    """Every exported file has the mode the umask gives (safetensors alone wrote 0600), and neither DeepSpeed's
    accelerator warning nor transformers' shard bar is printed."""
    out, _, env = logged_run
    exported = tmp_path / "hf"
    cmd = [sys.executable, "-m", "flatlm.train.cli", "export", str(out), str(exported)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, preexec_fn=lambda: os.umask(0o027)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"exported to {exported}"
    assert proc.stderr == ""
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == dict.fromkeys(modes, 0o640)


def test_export_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    from flatlm.errors import FlatlmError
    from flatlm.train.export import export

    with pytest.raises(FlatlmError, match=r"'.*/nope' does not exist; pass a run directory"):
        export(tmp_path / "nope", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def _run_in_pty(cmd: list[str], env: dict[str, str], timeout: float = 300.0) -> str:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal 160 columns wide; everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_log_lines_are_not_glued_to_the_bar(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flatlm.train.cli", "train", *_overrides(out, corpus, **{"train.plot": False})]
    text = _run_in_pty(cmd, _env())
    assert "train: 100%" in text and "loss=" in text  # the bar was drawn
    starts = [i for i in range(len(text)) if text.startswith("[flatlm]", i)]
    assert len(starts) >= 4  # model, two evaluations, done
    glued = [text[max(0, i - 60) : i + 40] for i in starts if i > 0 and text[i - 1] not in "\r\n"]
    assert glued == []


# ---- the Progress object itself (no processes) -----------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(step: int) -> dict[str, float]:
    return {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "tokens_per_s": 1000.0}


def test_progress_lines_every_interval_first_and_last() -> None:
    clock, lines, stream = _Clock(), [], io.StringIO()  # StringIO: not a terminal
    progress = Progress(10, 2, interval_s=30.0, log=lines.append, stream=stream, clock=clock)
    for step in range(3, 11):
        clock.now += 9.0  # 9 s per step: lines at step 3 (the first), 7 (36 s after it), 10 (the last)
        progress.update(_record(step))
    progress.close()
    assert [line.split(":")[0] for line in lines] == ["step 3/10", "step 7/10", "step 10/10"]
    assert lines[1] == "step 7/10: loss 4.3000, lr 1.00e-03, 1,000 tokens/s, 0:00:45 elapsed, 0:00:27 left"
    assert stream.getvalue() == ""  # no bar, not even an empty one


def test_progress_interval_zero_is_every_step_and_disabled_is_silent() -> None:
    lines: list[str] = []
    progress = Progress(4, 0, interval_s=0.0, log=lines.append, stream=io.StringIO(), clock=_Clock())
    for step in range(1, 5):
        progress.update(_record(step))
    progress.close()
    assert len(lines) == 4
    quiet: list[str] = []
    progress = Progress(4, 0, enabled=False, interval_s=0.0, log=quiet.append, stream=io.StringIO())
    progress.update(_record(1))
    progress.close()
    assert quiet == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_routes_logging_above_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the bar is shown, the root logger's console handler writes through tqdm (clear the bar, the line,
    redraw); after close() the handler is the user's own again."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("[x] %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    lines: list[str] = []
    progress = Progress(3, 0, interval_s=0.0, log=lines.append, stream=term)
    progress.update(_record(1))
    logging.getLogger("flatlm.test").warning("hello")
    progress.update(_record(2))
    progress.close()
    text = term.getvalue()
    assert "[x] hello\n" in text and text[text.index("[x] hello") - 1] in "\r\n"
    assert lines == []  # a terminal gets the bar, not the lines
    assert root.handlers == [handler]


def test_library_future_warnings_are_hidden_flatlm_ones_kept() -> None:
    """DeepSpeed's deprecated all_gather_into_tensor warns from torch.distributed on every rank of a ZeRO run."""
    import warnings

    from flatlm.train.cli import _quiet_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_warnings()
        for module in ("torch.distributed.c10d_logger", "deepspeed.comm", "flatlm.optim", "flatlm", "flatlmx"):
            warnings.warn_explicit("deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("a real problem", UserWarning, "f.py", 1, module="torch.optim")
    assert [(str(w.message), w.category) for w in caught] == [
        ("deprecated", FutureWarning),
        ("deprecated", FutureWarning),
        ("a real problem", UserWarning),
    ]
