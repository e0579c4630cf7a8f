"""The ZeRO backends refuse a DeepSpeed other than the one their reads of its internals were checked on, at setup,
with one line naming both versions and the fix (the version is faked: the installed one is the checked one)."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from flatlm.errors import FlatlmError
from flatlm.parallel import zero_views
from flatlm.parallel.zero_views import DEEPSPEED_CHECKED, check_deepspeed_version


def test_the_installed_deepspeed_is_the_checked_one() -> None:
    check_deepspeed_version()
    assert metadata.version("deepspeed") in DEEPSPEED_CHECKED


@pytest.mark.parametrize("version", ["0.19.7", "0.19.9", "0.20.0", "0.16.4", "1.0.0"])
def test_another_version_is_refused_with_the_fix(version: str) -> None:
    with pytest.raises(FlatlmError) as err:
        check_deepspeed_version(version)
    message = str(err.value)
    assert "\n" not in message
    assert f"DeepSpeed {version} is installed" in message and "deepspeed==0.19.8" in message
    assert "scripts/install.sh" in message and "parallel.backend=ddp or fsdp2" in message


def test_zero_setup_refuses_before_deepspeed_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed_parallel checks first: with a faked 0.20.0 nothing of DeepSpeed is initialised (cfg is never read)."""
    from flatlm.parallel import deepspeed as ds_backend

    real = metadata.version
    monkeypatch.setattr(zero_views.metadata, "version", lambda name: "0.20.0" if name == "deepspeed" else real(name))
    monkeypatch.setattr(ds_backend, "deepspeed_config", lambda *a, **k: pytest.fail("setup went on past the check"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FlatlmError, match=r"DeepSpeed 0\.20\.0 is installed.*deepspeed==0\.19\.8"):
        ds_backend.deepspeed_parallel(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1)  # type: ignore[arg-type]


def test_a_missing_deepspeed_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(zero_views.metadata, "version", missing)
    with pytest.raises(FlatlmError, match="need DeepSpeed, which is not installed: run scripts/install.sh"):
        check_deepspeed_version()
