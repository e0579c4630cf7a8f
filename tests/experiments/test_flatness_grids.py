"""The shipped flatness grids resolve and pass the static checks offline (--dry-run), list their analysis commands,
and give the adversarial cells their own method in the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlm.config import to_dict
from flatlm.experiments.grid import load_grid, resolve_cells
from flatlm.experiments.report_cells import config_columns
from flatlm.train.cli import main

GRIDS = Path(__file__).resolve().parents[2] / "configs" / "ablations"
METHODS = ("adamw", "adamw+adv", "sam", "asam", "ssam", "gsam", "lion", "muon")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["flatness-cpu", "flatness-gpu"])
def test_flatness_grid_dry_run(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["ablate", str(GRIDS / f"{name}.yaml"), "--dry-run", f"output_dir={out}"]) == 0
    listing = capsys.readouterr().out
    assert "24 cells" in listing
    for cell in ("adamw-adv0-seed0", "adamw-adv2-seed2", "asam-seed1", "muon-seed2"):
        assert f"\n  {cell} " in listing, listing
    assert f"-m flatlm landscape {out / 'cells' / '<cell>'} --out" in listing
    assert f"-m flatlm eval {out / 'cells' / '<cell>'} --out" in listing
    assert not out.exists()

    grid = load_grid(GRIDS / f"{name}.yaml", [f"output_dir={out}"])
    cells = resolve_cells(grid)
    methods = {}
    for cell in cells:
        methods.setdefault(config_columns(to_dict(cell.cfg))["optimizer"], []).append(cell.cfg.seed)
    assert {m: sorted(s) for m, s in methods.items()} == {m: [0, 1, 2] for m in METHODS}
    adv = next(c for c in cells if c.spec.name == "adamw-adv2-seed0").cfg
    assert adv.train.adversarial.steps == 2 and adv.train.adversarial.norm == "l2" and adv.optim.name == "adamw"
    rho = {c.cfg.optim.name: c.cfg.optim.hparams.get("rho") for c in cells}
    assert rho["asam"] == 0.5 and rho["sam"] == rho["ssam"] == rho["gsam"] == 0.05
    assert all(c.cfg.train.max_steps == cells[0].cfg.train.max_steps for c in cells)  # equal steps
