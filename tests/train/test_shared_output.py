"""``check_shared_output_dir`` on two gloo ranks: a run directory every rank sees passes; one that rank 1 does not
see (each "node" its own local disk: here, its own directory) stops both ranks at the start with one error naming
rank 1, instead of failing at the first checkpoint save."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlm.errors import FlatlmError
from tests.ranks import run_ranks


def _check(rank: int, world_size: int, shared: str, local: str) -> None:
    from flatlm.parallel.collectives import barrier
    from flatlm.train.rundir import CONFIG_FILE, check_shared_output_dir

    if rank == 0:
        (Path(shared) / CONFIG_FILE).write_text("seed: 1\n")
        (Path(local) / "node0" / CONFIG_FILE).write_text("seed: 1\n")
    barrier()
    check_shared_output_dir(Path(shared), wait_s=0.5)  # the same directory: passes
    own = Path(local) / f"node{rank}"  # each rank's "local disk": rank 1 never sees rank 0's file
    with pytest.raises(FlatlmError) as err:
        check_shared_output_dir(own, wait_s=0.5)
    text = str(err.value)
    assert "is not shared: rank(s) 1 (" in text and "do not see the config.yaml rank 0" in text, text
    assert "rank(s) 0" not in text


@pytest.mark.timeout(120)
def test_an_output_dir_that_is_not_shared_is_refused_at_the_start(tmp_path: Path) -> None:
    for d in ("shared", "local/node0", "local/node1"):
        (tmp_path / d).mkdir(parents=True)
    run_ranks(_check, str(tmp_path / "shared"), str(tmp_path / "local"))
