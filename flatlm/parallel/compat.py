"""What may run where, computed from declared properties: no backend-name or optimizer-name lists.

Each SAM-family variant declares what it needs (class attributes of ``flatlm.optim.sam.SAM`` and its subclasses):
``writes_final_grad``, ``final_grad_uses_first_pass``, ``keeps_state``, ``may_skip_second_pass``,
``selects_tensors``. Each backend class declares what it allows (class attributes of ``flatlm.parallel.backend
.Parallel`` and its subclasses): ``whole_weights``, ``tensors_are_parameters``, ``replica_grads_like_first_pass``.
(Every backend can take a rewritten final gradient under global perturbation, through ``commit_gradients``, so
``writes_final_grad`` decides no refusal; sam_step reads it to skip fetching and writing back g'.) A pair is
impossible when

    replica perturbation   and not whole_weights                      each rank would need its whole weights
    replica perturbation   and the variant needs pass 1 after it      (uses pass 1 for its final gradient, keeps
                           and not replica_grads_like_first_pass       state built from it, or skips pass 2) but
                                                                       the step reads gradients of another layout
    global perturbation    and selects_tensors and not tensors_are_parameters

and ``check_pair`` raises one ``FlatlmError`` that says which property clashes and what runs instead (the
alternatives are computed from the same properties over every registered backend and variant).
``check_parallel(cfg)`` applies it from the config alone, before anything is built or written.
"""

from __future__ import annotations

from flatlm.config import RunConfig
from flatlm.errors import FlatlmError
from flatlm.parallel.backend import DDPParallel, Parallel
from flatlm.parallel.deepspeed import DeepSpeedParallel, Zero3Parallel
from flatlm.parallel.fsdp2 import FSDP2Parallel

BACKENDS: dict[str, type[Parallel]] = {
    "single": Parallel,
    "ddp": DDPParallel,
    "fsdp2": FSDP2Parallel,
    "zero1": DeepSpeedParallel,
    "zero2": DeepSpeedParallel,
    "zero3": Zero3Parallel,
}
"""``parallel.backend`` -> the class that runs it (its capabilities are class attributes)."""


def backend_class(name: str) -> type[Parallel]:
    if name not in BACKENDS:
        raise FlatlmError(f"unknown parallel.backend {name!r}; valid: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def _needs_pass1_after_perturb(variant: type) -> bool:
    return bool(variant.final_grad_uses_first_pass or variant.keeps_state or variant.may_skip_second_pass)


def refusal(variant: type, backend: type[Parallel], perturbation: str) -> str | None:
    """Why ``variant`` cannot run on ``backend`` with ``perturbation`` (None: it can)."""
    if perturbation == "replica":
        if not backend.whole_weights:
            return "whole_weights"
        if _needs_pass1_after_perturb(variant) and not backend.replica_grads_like_first_pass:
            return "replica_grads_like_first_pass"
        return None
    if variant.selects_tensors and not backend.tensors_are_parameters:
        return "tensors_are_parameters"
    return None


def _variants() -> dict[str, type]:
    from flatlm.optim.registry import OPTIMIZERS

    return {name: spec.cls() for name, spec in OPTIMIZERS.items() if spec.wrapper}


def _multi(names: list[str]) -> list[str]:
    return [n for n in names if n != "single"]  # "single" is no alternative to a data-parallel backend


def check_pair(name: str, variant: type, backend_name: str, perturbation: str) -> None:
    """Raise one FlatlmError if SAM-family ``variant`` (``optim.name=name``) cannot run on ``backend_name``."""
    backend = backend_class(backend_name)
    why = refusal(variant, backend, perturbation)
    if why is None:
        return
    others = _multi([b for b, cls in BACKENDS.items() if refusal(variant, cls, perturbation) is None])
    if why == "whole_weights":
        raise FlatlmError(
            f"sam.perturbation=replica perturbs each rank's whole weights by its own gradient, but {backend_name} "
            f"shards the weights; use sam.perturbation=global, or {', '.join(others)}"
        )
    if why == "replica_grads_like_first_pass":
        fine = [v for v, cls in _variants().items() if refusal(cls, backend, perturbation) is None]
        needs = (
            "its final gradient needs pass 1's gradient"
            if variant.final_grad_uses_first_pass
            else "its state or its skipped second pass needs pass 1's gradient"
        )
        raise FlatlmError(
            f"sam.perturbation=replica under {backend_name} runs {', '.join(fine)} (optim.name={name}: {needs}, "
            f"which stays on each rank while {backend_name}'s step reads reduced shards of another layout); use "
            f"sam.perturbation=global or {', '.join(others)}"
        )
    replica = " or sam.perturbation=replica" if refusal(variant, backend, "replica") is None else ""
    raise FlatlmError(
        f"optim.name={name} cannot run under {backend_name}: it perturbs a random subset of whole parameters, but "
        f"{backend_name}'s optimizer tensors are flat partitions holding pieces of many parameters; run {name} with "
        f"{', '.join(others)}{replica}"
    )


def check_parallel(cfg: RunConfig) -> None:
    """Combinations of backend and options that cannot run; each is one clear error (checked before any write)."""
    from flatlm.optim.registry import get_spec

    backend, perturbation = cfg.parallel.backend, cfg.sam.perturbation
    spec = get_spec(cfg.optim.name)
    if spec.wrapper:
        check_pair(cfg.optim.name, spec.cls(), backend, perturbation)
    elif perturbation == "replica" and not backend_class(backend).whole_weights:
        # not a SAM-family optimizer: the key does nothing, but a config asking for it on sharded weights is wrong
        others = _multi([b for b, cls in BACKENDS.items() if cls.whole_weights])
        raise FlatlmError(
            f"sam.perturbation=replica perturbs each rank's whole weights by its own gradient, but {backend} "
            f"shards the weights; use sam.perturbation=global, or {', '.join(others)}"
        )
