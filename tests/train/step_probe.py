"""Look inside the training loop's steps: what the options under test really did, recorded from the running loop.

``probing(...)`` wraps ``flatlm.train.loop.train_step`` (the function the loop calls once per optimizer step) so a
test sees every step as users get it, from the loop's own config handling: the parameters before and after, the
accumulated gradient before clipping, the dtypes of every matmul, how often the decoder sublayers ran, the bytes
autograd saved, the optimizer's state dtypes, and the training model's own logits after the last step. Nothing in
the loop is replaced: the wrapper calls the real step with the real arguments.

Run as a module under torchrun (``launch_probed``), each rank records its steps into
``output_dir/probe-rank<R>.pt``, so the same observations work for 2-process backends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
PROBE_IDS = torch.arange(3, 3 + 2 * 16).remainder(300).view(2, 16)  # fixed token ids, [2, 16], below any vocab used

_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default}


class KernelDtypes(TorchDispatchMode):
    """Records the floating dtypes that every matmul and every gradient reduce-scatter receives (after autocast
    and FSDP2's casts: what the kernels and the collectives really get)."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls: list[tuple[str, tuple[torch.dtype, ...]]] = []
        self.reductions: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        calls = self.matmuls if func in MATMULS else self.reductions if "reduce_scatter" in name else None
        if calls is not None:
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            calls.append(
                (name, tuple(t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()))
            )
        return func(*args, **(kwargs or {}))


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32-preserving copy of the whole tensor (a DTensor is gathered: collective)."""
    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()


@dataclass
class StepRecord:
    """One optimizer step as the loop ran it."""

    before: dict[str, torch.Tensor]
    """Every parameter (whole, by name) before the step."""
    after: dict[str, torch.Tensor]
    """Every parameter after the step."""
    grads: dict[str, torch.Tensor]
    """The accumulated gradient before clipping (single process and DDP; empty where gradients arrive by
    reduce-scatter, FSDP2)."""
    grad_norm: float
    """What the step returned (the loop logs it)."""
    lr: float
    sublayer_calls: dict[str, int]
    """Forward calls of each kind of decoder-block sublayer (``self_attn``, ``mlp``, ...), summed over blocks."""
    saved_bytes: int
    """Bytes autograd saved for backward outside any checkpointed region."""
    matmuls: list[tuple[str, tuple[torch.dtype, ...]]]
    """(op, input dtypes) of every matmul in the step, forward and backward (``Probe.dispatch``)."""
    reductions: list[tuple[str, tuple[torch.dtype, ...]]]
    """(op, dtypes) of every gradient reduce-scatter (FSDP2; ``Probe.dispatch``)."""
    param_dtypes: set[torch.dtype]
    """Dtypes of the parameters (local shards) after the step."""
    grad_dtypes: set[torch.dtype]
    """Dtypes of the gradients the optimizer stepped with."""
    state_dtypes: set[torch.dtype]
    """Dtypes of the optimizer's floating state tensors after the step."""
    optimizer_defaults: dict[str, Any]
    model_type: str
    """Class of the module the step ran forward through (``OptimizedModule`` when compiled)."""
    compiles_forward_module: bool
    """That module is ``torch.compile`` of the backend's forward module (``_orig_mod``)."""
    num_micro_batches: int
    logits: torch.Tensor | None = None
    """The training model's own logits on ``PROBE_IDS`` after the last step (eval mode, no autocast)."""


@dataclass
class Probe:
    dispatch: bool = False
    """Record matmul and reduce-scatter dtypes (a dispatch mode around the step; slower)."""
    grads: bool = True
    saved: bool = True
    sublayers: bool = True
    """Count decoder sublayer calls (forward hooks; off under torch.compile, where new hooks force recompiles)."""
    """Count the bytes autograd saves (a saved-tensors hook around the step; off under torch.compile)."""
    logits_after_step: int | None = None
    """After this step (1-based) record the model's logits on ``PROBE_IDS``."""
    steps: list[StepRecord] = field(default_factory=list)


def _sublayers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from flatlm.parallel.fsdp2 import transformer_blocks

    return [item for block in transformer_blocks(model) for item in block.named_children()]


def _float_state(optimizer: torch.optim.Optimizer) -> set[torch.dtype]:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed/wrappers keep the real one inside
    return {
        v.dtype
        for s in inner.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim > 0
    }


def _wrap(real: Any, probe: Probe) -> Any:
    def probed_train_step(parallel: Any, optimizer: Any, batches: list, params: list, **kwargs: Any) -> Any:
        named = list(parallel.model.named_parameters())
        before = {n: full(p) for n, p in named}
        grads: dict[str, torch.Tensor] = {}
        hooks = []
        if probe.grads:
            for n, p in named:  # the last accumulation of a step leaves the whole micro-batch sum
                hooks.append(p.register_post_accumulate_grad_hook(lambda q, n=n: grads.__setitem__(n, full(q.grad))))
        calls: dict[str, int] = {}
        for name, m in _sublayers(parallel.model) if probe.sublayers else []:
            hooks.append(m.register_forward_hook(lambda *_, k=name: calls.__setitem__(k, calls.get(k, 0) + 1)))
        grad_dtypes: set[torch.dtype] = set()

        def pre_step(opt: Any, *_: Any) -> None:
            grad_dtypes.update(full(p.grad).dtype for g in opt.param_groups for p in g["params"] if p.grad is not None)

        step_hook = getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(pre_step)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        mode = KernelDtypes()
        model = kwargs["model"] if kwargs.get("model") is not None else parallel.forward_module
        lr = optimizer.param_groups[0]["lr"]
        try:
            saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if probe.saved else _null()
            with saving, mode if probe.dispatch else _null():
                stats = real(parallel, optimizer, batches, params, **kwargs)
        finally:
            for h in [*hooks, step_hook]:
                h.remove()
        record = StepRecord(
            before=before,
            after={n: full(p) for n, p in named},
            grads=grads,
            grad_norm=float(stats.grad_norm),
            lr=lr,
            sublayer_calls=calls,
            saved_bytes=saved[0],
            matmuls=mode.matmuls,
            reductions=mode.reductions,
            param_dtypes={(p.to_local() if isinstance(p, DTensor) else p).dtype for _, p in named},
            grad_dtypes=grad_dtypes,
            state_dtypes=_float_state(optimizer),
            optimizer_defaults={k: v for k, v in getattr(optimizer, "defaults", {}).items() if _plain(v)},
            model_type=type(model).__name__,
            compiles_forward_module=getattr(model, "_orig_mod", None) is parallel.forward_module,
            num_micro_batches=len(batches),
        )
        if probe.logits_after_step == len(probe.steps) + 1:
            was_training = parallel.forward_module.training
            parallel.forward_module.eval()
            with torch.no_grad():
                ids = PROBE_IDS.to(batches[0].inputs.device)
                record.logits = parallel.forward_module(input_ids=ids).logits.detach()
            parallel.forward_module.train(was_training)
        probe.steps.append(record)
        return stats

    return probed_train_step


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, tuple))


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield


@contextlib.contextmanager
def probing(probe: Probe) -> Iterator[Probe]:
    """While active, every training step the loop runs is recorded into ``probe.steps``."""
    import flatlm.train.loop as loop

    real = loop.train_step
    loop.train_step = _wrap(real, probe)
    try:
        yield probe
    finally:
        loop.train_step = real


def launch_probed(
    cases: list[tuple[list[str], list[str]]], nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run each case ``(overrides, probe options)`` one after another in one torchrun launch of ``nproc`` gloo
    processes (start-up paid once); each rank saves its records to the case's ``output_dir/probe-rank<R>.pt``.
    Probe options: ``dispatch``, ``logits=<step>``. A failing case ends the launch (later cases leave no file);
    past ``timeout`` the launcher and its workers are killed (their own session), none is left running."""
    spec = json.dumps([{"overrides": overrides, "probe": probe} for overrides, probe in cases])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "tests.train.step_probe", spec]
    from tests.train.launching import run_in_session

    return run_in_session(cmd, timeout, "launch_probed")


def load_records(output_dir: Path, rank: int = 0) -> list[StepRecord]:
    """The steps rank ``rank`` recorded under ``launch_probed``."""
    saved = torch.load(output_dir / f"probe-rank{rank}.pt", weights_only=False)  # written by this test suite
    return [StepRecord(**fields) for fields in saved]


def _run_case(overrides: list[str], options: list[str]) -> None:
    from flatlm.config import load_config
    from flatlm.train.loop import train

    probe = Probe(dispatch="dispatch" in options, grads=False)
    for opt in options:
        if opt.startswith("logits="):
            probe.logits_after_step = int(opt.split("=", 1)[1])
    with probing(probe):
        result = train(load_config(None, overrides))
    rank = os.environ.get("RANK", "0")
    torch.save([dataclasses.asdict(s) for s in probe.steps], result.output_dir / f"probe-rank{rank}.pt")


def _main(spec: str) -> int:
    """Each case in a fresh gloo group of its own (``batch_runner``'s per-case store prefix), DeepSpeed's group
    caches put back between cases."""
    import datetime

    import torch.distributed as dist

    from tests.train.batch_runner import CASE_TIMEOUT_S, _forget_deepspeed_groups, _join

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    store = None
    if world > 1:
        store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=CASE_TIMEOUT_S)))
    reset_deepspeed = _forget_deepspeed_groups()
    for index, case in enumerate(json.loads(spec)):
        reset_deepspeed()
        if store is not None:
            _join(store, index, rank, world)
        _run_case(case["overrides"], case["probe"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as batch_runner: skip interpreter teardown, which gloo's threads occasionally abort


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
