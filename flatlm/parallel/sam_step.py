"""SAM's perturb/restore protocol, written once against the backend protocol (``Parallel``'s members).

Every backend (one process, DDP, FSDP2, DeepSpeed ZeRO-1/2/3; global or replica perturbation) runs the same
sequence; what differs is what its members return:

    perturb (after pass 1)
        local  = parallel.first_pass_was_local()          replica: pass 1's gradients stayed on this rank
        views  = parallel.sam_views(optimizer, local)      built once per backend: stable keys, flags
        grads  = parallel.sam_grads(views, local)          pass 1's gradients, where the step reads them
        optimizer.perturb_views(views, grads)              the math: w -> w + eps (scratch keyed by view)
        True:  parallel.publish_weights(local)             ZeRO pushes its master partitions to the model
               parallel.drop_gradients(views, local)       pass 2 starts from no gradient
        False: parallel.commit_gradients(views, grads,     the final gradient was written into grads (only
                                         local)            a variant that ``writes_final_grad``; a replica
                                                           step then averages them: train.step)
    restore (after pass 2)
        grads  = parallel.second_pass_grads(views, local)  g', laid out like the views (None: not so); fetched
                                                           only where the variant ``writes_final_grad`` (else
                                                           the step reads pass 2's gradients as they are)
        optimizer.restore_views(views, grads)              w back bit for bit, the final gradient into grads
        parallel.publish_weights(local); parallel.commit_gradients(views, grads, local)   (writers only)
        replica and the variant's final gradient uses pass 1 (``final_grad_uses_first_pass``): average it
        over the ranks (one flat all-reduce; SAM and ASAM, whose final gradient is g', skip it)
        parallel.end_local_pass() after a replica step

Which variant may run on which backend is decided before training from declared properties
(``flatlm.parallel.compat``); the checks here only catch a pair that slipped past it.
"""

from __future__ import annotations

from typing import Any

from flatlm.optim.views import ParamView
from flatlm.parallel.backend import Parallel


def perturb(parallel: Parallel, optimizer: Any) -> bool:
    """After pass 1: move to w + eps; True if pass 2 must run."""
    local = parallel.first_pass_was_local()
    views = parallel.sam_views(optimizer, local)
    grads = parallel.sam_grads(views, local)
    kept = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
    views, grads = [v for v, _ in kept], [g for _, g in kept]
    second = optimizer.perturb_views(views, grads)
    if second:
        parallel.publish_weights(local)
        parallel.drop_gradients(views, local)
        parallel.__dict__["_sam_pass"] = (views, local)
        return True
    if local and not parallel.replica_grads_like_first_pass:
        raise RuntimeError(
            f"{type(optimizer).__name__} skipped pass 2 under replica perturbation on {parallel.backend}, whose step "
            "reads gradients of another layout (flatlm.parallel.compat should have refused this pair)"
        )
    if _writes(optimizer):  # views and gradients together: a view dropped above cannot shift the others
        parallel.commit_gradients(views, grads, local)
    return False


def restore(parallel: Parallel, optimizer: Any) -> None:
    """After pass 2: w back exactly, the variant's final gradient where the step reads it."""
    views, local = _pending(parallel)
    # g' as it is (sam, asam, esam): the step reads pass 2's gradients where the backend left them, so they are
    # neither fetched nor written back (on ZeRO-1/2 each fetch and each write is a copy of every partition)
    grads = parallel.second_pass_grads(views, local) if _writes(optimizer) else []
    if grads is None:
        raise RuntimeError(
            f"{type(optimizer).__name__} writes its final gradient, but {parallel.backend}'s pass-2 gradients are "
            "not laid out like the perturbed views (flatlm.parallel.compat should have refused this pair)"
        )
    optimizer.restore_views(views, grads)
    parallel.publish_weights(local)
    if grads:
        parallel.commit_gradients(views, grads, local)
    if local:
        if getattr(optimizer, "final_grad_uses_first_pass", False):
            # each rank's final gradient used its own pass-1 gradient: average, else the replicas step apart
            parallel.average_gradients([v.tensor for v in views])
        parallel.end_local_pass()


def _writes(optimizer: Any) -> bool:
    """Whether the variant rewrites the gradients the step reads (its final gradient is not g' as it is)."""
    return bool(getattr(optimizer, "writes_final_grad", False))


def _pending(parallel: Parallel) -> tuple[list[ParamView], bool]:
    pending = parallel.__dict__.pop("_sam_pass", None)
    if pending is None:
        raise RuntimeError("restore() called without a perturb() that returned True")
    return pending
