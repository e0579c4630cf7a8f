"""Run a batch of training cases (``tests.train.batch_runner``) while recording, after every optimizer step on every
rank, what the SAM-family optimizer holds and the process's resident memory.

    torchrun --nproc_per_node 2 -m tests.parallel.leak_probe SPEC.json

SPEC.json is batch_runner's; each case may add ``"leak_plant": true``, which reintroduces the bug the leak tests
are for: every step's views get fresh keys (as when SAM keyed its buffers by the tensor objects a backend hands
over, new ones each step). Each rank appends one JSON line per step to ``<results>/<id>.leak-rank<R>.jsonl``:
``{"step", "buffers", "bytes", "state_tensors", "state_bytes", "rss"}`` (SAM's scratch buffers, its per-view
state tensors, the process RSS in bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch


def held(optimizer: Any) -> dict[str, int]:
    """SAM's scratch buffers and per-view state tensors (count and bytes) of ``optimizer`` or what it wraps."""
    from flatlm.optim.registry import inner_optimizers
    from flatlm.optim.sam import SAM

    sams = [o for o in inner_optimizers(optimizer) if isinstance(o, SAM)]
    if not sams:
        raise RuntimeError(f"{type(optimizer).__name__} is not a SAM-family optimizer")
    sam = sams[0]
    buffers, nbytes = sam.scratch_bytes()
    state = [t for st in sam.sam_state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {
        "buffers": buffers,
        "bytes": nbytes,
        "state_tensors": len(state),
        "state_bytes": sum(t.numel() * t.element_size() for t in state),
    }


@contextlib.contextmanager
def recording(log_prefix: Path, plant: bool) -> Iterator[None]:
    import flatlm.train.loop as loop
    from flatlm.optim.sam import SAM

    rank = int(os.environ.get("RANK", "0"))
    log = Path(f"{log_prefix}.leak-rank{rank}.jsonl")
    original_step = loop.train_step
    process = psutil.Process()
    count = {"step": 0}

    def step(parallel: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        stats = original_step(parallel, optimizer, *args, **kwargs)
        count["step"] += 1
        record = {"step": count["step"], **held(optimizer), "rss": process.memory_info().rss}
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return stats

    perturb_views, restore_views = SAM.perturb_views, SAM.restore_views
    fresh = {"n": 0}

    def renamed(views: list[Any]) -> list[Any]:  # views SAM's own perturb() kept from the call are renamed already
        return [v if "@step" in v.key else dataclasses.replace(v, key=f"{v.key}@step{fresh['n']}") for v in views]

    def planted_perturb(self: Any, views: list[Any], grads: list[Any]) -> bool:
        fresh["n"] += 1
        return perturb_views(self, renamed(views), grads)

    def planted_restore(self: Any, views: list[Any], grads: list[Any]) -> None:
        restore_views(self, renamed(views), grads)

    loop.train_step = step
    if plant:
        SAM.perturb_views, SAM.restore_views = planted_perturb, planted_restore  # type: ignore[method-assign]
    try:
        yield
    finally:
        # nothing of the run is kept here: the loop frees the DDP reducer before it destroys the process group
        # (flatlm.train.loop._train), which a reference held past train() would undo (a gloo exit deadlock)
        loop.train_step = original_step
        SAM.perturb_views, SAM.restore_views = perturb_views, restore_views  # type: ignore[method-assign]


def main(spec_path: str) -> None:
    from tests.train import batch_runner

    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])
    real_run_case = batch_runner.run_case

    def run_case(case: dict[str, Any]) -> None:
        with recording(results / case["id"], bool(case.get("leak_plant"))):
            real_run_case(case)

    batch_runner.run_case = run_case
    batch_runner.main(spec_path)


if __name__ == "__main__":
    main(sys.argv[1])
