"""scripts/install.sh says what it installs before each (quiet, minutes-long) pip step.

pip is replaced by a recorder on PATH (a ``python`` that logs its arguments into the same output), so the test
sees the order of the script's messages and its pip calls without installing anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# Records pip calls (and, into $FAKE_ARGV when set, each argument on a line of its own, a blank line after a call);
# "import deepspeed" fails when FAKE_NO_DEEPSPEED is set, so the script installs it.
if [[ "$1" == "-m" && "$2" == "pip" ]]; then
    echo "PIP ${*:3}"
    if [[ -n "${FAKE_ARGV:-}" ]]; then printf '%s\n' "${@:3}" "" >>"$FAKE_ARGV"; fi
    exit 0
fi
if [[ "$1" == "-c" && "$2" == *"import deepspeed"* && -n "${FAKE_NO_DEEPSPEED:-}" ]]; then exit 1; fi
exit 0
"""


def _install(tmp_path: Path, *args: str, status: int = 0, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    environ.pop("FLATLM_TORCH", None)
    environ.update(env)
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert r.returncode == status, r.stderr
    return (r.stdout + r.stderr).splitlines()


@pytest.mark.parametrize("deepspeed_present", [False, True])
def test_every_pip_step_is_announced_first(tmp_path: Path, deepspeed_present: bool) -> None:
    env = {} if deepspeed_present else {"FAKE_NO_DEEPSPEED": "1"}
    lines = _install(tmp_path, "--test", **env)
    pips = [i for i, line in enumerate(lines) if line.startswith("PIP ")]
    assert len(pips) == (2 if deepspeed_present else 3)
    what = {"torch==2.13.0": "torch", "-e .[test]": "flatlm[test]", "deepspeed==0.19.8": "deepspeed"}
    previous = -1
    for i in pips:
        call = lines[i]
        package = next(v for k, v in what.items() if k in call)
        announced = [line for line in lines[previous + 1 : i] if line.startswith("[install] ")]
        assert announced and package in announced[-1], (call, lines)  # said right before it starts
        assert lines[i + 1].startswith("[install]   done in "), lines  # and when it is over
        previous = i
    assert lines[-1].startswith("[install] flatlm is installed")
    if deepspeed_present:
        assert "[install] deepspeed 0.19.8: already installed" in lines


def test_install_pins_the_deepspeed_flatlm_checked() -> None:
    """The DeepSpeed install.sh installs is the one the ZeRO backends accept (they refuse any other at setup)."""
    from flatlm.parallel.zero_views import DEEPSPEED_CHECKED, check_deepspeed_version

    script = (ROOT / "scripts" / "install.sh").read_text().splitlines()
    version = next(line for line in script if line.startswith("deepspeed_version=")).split("=", 1)[1].strip('"')
    check_deepspeed_version(version)
    assert str(DEEPSPEED_CHECKED) == f"=={version}"


def _pip_calls(argv_log: Path) -> list[list[str]]:
    """Each pip call's arguments after pip's own quiet options (``install ...``)."""
    calls = [call.split("\n") for call in argv_log.read_text().split("\n\n") if call]
    return [call[call.index("install") :] for call in calls]


def test_flatlm_torch_is_a_whole_pip_specification(tmp_path: Path) -> None:
    """A CUDA build comes from PyTorch's own index: FLATLM_TORCH's words reach pip as separate arguments (passed as
    one quoted word, pip would look for a package named "torch==... --index-url ...")."""
    argv = tmp_path / "argv"
    spec = "torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
    lines = _install(tmp_path, FLATLM_TORCH=spec, FAKE_ARGV=str(argv))
    torch_call = _pip_calls(argv)[0]
    assert torch_call == ["install", "torch==2.9.1", "--index-url", "https://download.pytorch.org/whl/cu128"]
    assert any(line.startswith("[install] torch (" + spec + ")") for line in lines), lines
    # the default, unchanged: one word
    argv.unlink()
    _install(tmp_path, FAKE_ARGV=str(argv))
    assert _pip_calls(argv)[0] == ["install", "torch==2.13.0"]


def test_blank_flatlm_torch_is_one_clear_error(tmp_path: Path) -> None:
    lines = _install(tmp_path, status=2, FLATLM_TORCH="  ")
    assert not any(line.startswith("PIP ") for line in lines), lines
    assert any("FLATLM_TORCH is set but empty" in line for line in lines), lines
