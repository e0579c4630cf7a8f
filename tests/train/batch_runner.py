"""Run several flatlm training configs one after another in the same processes (one launch, start-up paid once).

    torchrun --nproc_per_node N -m tests.train.batch_runner SPEC.json
    accelerate launch --config_file configs/accelerate/<backend>.yaml -m tests.train.batch_runner SPEC.json

SPEC.json: ``{"results": DIR, "cases": [{"id": ..., "overrides": [...], "plant": null | {...},
"check_replicated": bool}, ...]}``. Each case
is ``flatlm.train.loop.train(load_config(None, overrides))``, which joins the gloo process group and leaves it
again (the batch checks that repeated init/destroy works). Rank 0 writes ``DIR/<id>.json`` (``{"ok": true,
"seconds": ...}``) after a case; a case that raises writes ``DIR/<id>.rank<R>.err`` (the traceback) and the batch goes
on with the next case (a rank left waiting in a collective gets gloo's timeout, ``CASE_TIMEOUT_S``, and fails the
case too); a case that hangs past ``WATCHDOG_S`` prints every thread's stack and ends the launch.

``plant`` injects a known bug into that case's run, for the tests that prove a comparison can fail:

    {"kind": "frozen", "param": FQN}        the parameter is put back to its value before every step
    {"kind": "reset_state", "param": FQN, "key": K}   state tensor K of the parameter is zeroed after every step
    {"kind": "no_weight_decay"}             every param group's weight decay is set to 0 before the first step
    {"kind": "drop_state", "param": FQN, "key": K}    K of the parameter is left out of the saved checkpoint (DCP)
    {"kind": "desync", "param": FQN}        rank 1 adds 1e-6 to one element of the parameter after every step

``check_replicated`` (ddp, zero1/2: every rank holds whole weights) fails the case at the first step after which
the ranks' weights are not bit-identical.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

CASE_TIMEOUT_S = 120  # gloo's timeout per collective: a case takes about a second (the first, with imports, ~30 s)
WATCHDOG_S = 400  # a case still running after this is hung: dump the stacks, end the launch


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _zero_pieces(parallel: Any, name: str, like: Callable[[Any], torch.Tensor | None]) -> list[torch.Tensor]:
    """This rank's fragments of parameter ``name`` in the flat tensors ``like(fragment)`` (a DeepSpeed run)."""
    from flatlm.parallel.zero_views import zero_fragments

    out = []
    for frags in zero_fragments(parallel.engine, parallel.model):
        for f in frags:
            if f.name == name:
                t = like(f)
                if t is not None:
                    out.append(f.slice(t))
    return out


def _param_views(parallel: Any, name: str) -> list[torch.Tensor]:
    """Writable views of this rank's values of parameter ``name`` (its master weights)."""
    if hasattr(parallel, "engine"):
        return _zero_pieces(parallel, name, lambda f: f.flat.detach())
    return [_local(dict(parallel.model.named_parameters())[name].detach())]


def _state_views(parallel: Any, optimizer: Any, name: str, key: str) -> list[torch.Tensor]:
    """This rank's views of optimizer-state tensor ``key`` of parameter ``name``."""
    from flatlm.optim.registry import inner_optimizers

    if hasattr(parallel, "engine"):
        out = []
        for opt in inner_optimizers(optimizer):
            out += _zero_pieces(parallel, name, lambda f, o=opt: o.state.get(f.flat, {}).get(key))
        return out
    p = dict(parallel.model.named_parameters())[name]
    for opt in inner_optimizers(optimizer):
        if p in opt.state and key in opt.state[p]:
            return [_local(opt.state[p][key])]
    return []


@contextlib.contextmanager
def planted(plant: dict[str, Any] | None) -> Iterator[None]:
    """Patch flatlm for the duration of one case so that it has the bug ``plant`` describes."""
    if not plant:
        yield
        return
    import flatlm.train.loop as loop

    kind = plant["kind"]
    original_step = loop.train_step
    seen: dict[str, Any] = {"applied": 0}

    def step(parallel: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if kind == "no_weight_decay":
            from flatlm.optim.registry import inner_optimizers

            for opt in inner_optimizers(optimizer):
                for g in opt.param_groups:
                    g["weight_decay"] = 0.0
            seen["applied"] += 1
        saved = None
        if kind == "frozen":
            saved = [v.clone() for v in _param_views(parallel, plant["param"])]
        stats = original_step(parallel, optimizer, *args, **kwargs)
        if kind == "frozen":
            with torch.no_grad():
                for v, s in zip(_param_views(parallel, plant["param"]), saved, strict=True):
                    v.copy_(s)
            if hasattr(parallel, "engine"):
                from flatlm.parallel.zero_views import push_master_to_model

                push_master_to_model(parallel.engine)
            seen["applied"] += 1
        if kind == "desync" and int(os.environ.get("RANK", "0")) == 1:  # one rank's copy drifts by one ulp-ish
            with torch.no_grad():
                for v in _param_views(parallel, plant["param"]):
                    v.view(-1)[0] += 1e-6
            seen["applied"] += 1
        if kind == "reset_state":
            views = _state_views(parallel, optimizer, plant["param"], plant["key"])
            with torch.no_grad():
                for v in views:
                    v.zero_()
            seen["applied"] += len(views)
        return stats

    loop.train_step = step
    from flatlm.parallel.backend import Parallel

    base_state = Parallel.checkpoint_state
    if kind == "drop_state":

        def checkpoint_state(self: Any, optimizer: Any) -> Any:
            state = base_state(self, optimizer)
            entry = state["optim"]["state"].get(plant["param"], {})
            if plant["key"] in entry:
                del entry[plant["key"]]
                seen["applied"] += 1
            return state

        Parallel.checkpoint_state = checkpoint_state  # type: ignore[method-assign]
    try:
        yield
    finally:
        loop.train_step = original_step
        Parallel.checkpoint_state = base_state  # type: ignore[method-assign]
    if not seen["applied"] and kind in ("frozen", "no_weight_decay"):  # applied on every rank
        raise RuntimeError(f"plant {plant} never took effect")


def _forget_deepspeed_groups() -> Callable[[], None]:
    """DeepSpeed caches process groups in module globals (``deepspeed.utils.groups``); after a case destroyed its
    group they name a dead one. Returns a function that puts those globals back to their import-time values."""
    import copy

    import deepspeed.utils.groups as groups

    initial = {  # _WORLD_GROUP, _DATA_PARALLEL_GROUP, _EXPERT_PARALLEL_GROUP, ...
        k: copy.copy(v)
        for k, v in vars(groups).items()
        if k.startswith("_") and not k.startswith("__") and k.upper() == k and not callable(v)
    }

    def reset() -> None:
        for k, v in initial.items():
            setattr(groups, k, copy.copy(v))

    return reset


class ReplicasDiverged(AssertionError):
    """Ranks that should hold the same whole weights (ddp, zero1/2) hold different ones."""


@contextlib.contextmanager
def replicas_checked(enabled: bool) -> Iterator[None]:
    """After every step, check that every rank holds bit-identical weights (a DCP save of a replicated model keeps
    rank 0's copy only, so a divergence would never reach the checkpoint): one all-gather of a digest per step."""
    if not enabled:
        yield
        return
    import hashlib

    import torch.distributed as dist

    import flatlm.train.loop as loop

    original_step = loop.train_step
    count = {"step": 0}

    def step(parallel: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        stats = original_step(parallel, optimizer, *args, **kwargs)
        count["step"] += 1
        digests = {}
        for name, p in parallel.model.named_parameters():
            digests[name] = hashlib.sha1(p.detach().float().contiguous().numpy().tobytes()).hexdigest()
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, digests)
        bad = [n for n in digests if len({d[n] for d in everyone}) > 1]
        if bad:
            raise ReplicasDiverged(
                f"after step {count['step']} the ranks hold different {bad[:4]} ({len(bad)} tensors)"
            )
        return stats

    loop.train_step = step
    try:
        yield
    finally:
        loop.train_step = original_step


def run_case(case: dict[str, Any]) -> None:
    from flatlm.config import load_config
    from flatlm.train.loop import train

    with planted(case.get("plant")), replicas_checked(bool(case.get("check_replicated"))):
        train(load_config(None, case["overrides"]))


def _join(store: Any, index: int, rank: int, world: int) -> None:
    """Join a fresh gloo process group for case ``index``: flatlm's ``train`` then finds it initialised and
    destroys it at its end. A second ``env://`` init would read the first group's stale addresses from the
    launcher's store, so each case gets its own key prefix."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=CASE_TIMEOUT_S)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank, world_size=world, timeout=timeout
    )


def main(spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    store = None
    if world > 1:
        store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=CASE_TIMEOUT_S)))
    reset_deepspeed = _forget_deepspeed_groups()
    for index, case in enumerate(spec["cases"]):
        reset_deepspeed()
        t0 = time.perf_counter()
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        try:
            if store is not None:
                _join(store, index, rank, world)
            run_case(case)
            faulthandler.cancel_dump_traceback_later()
        except Exception:  # the traceback goes to the case's file; the next case runs in a fresh process group
            faulthandler.cancel_dump_traceback_later()
            (results / f"{case['id']}.rank{rank}.err").write_text(traceback.format_exc())
            sys.stderr.write(f"case {case['id']} failed on rank {rank}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            if dist.is_initialized():
                dist.destroy_process_group()
            continue
        if rank == 0:
            (results / f"{case['id']}.json").write_text(json.dumps({"ok": True, "seconds": time.perf_counter() - t0}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads occasionally abort it after all cases passed


if __name__ == "__main__":
    main(sys.argv[1])
