"""Muon and Adafactor as DeepSpeed ZeRO client optimizers (flat partitions) equal one process, ZeRO-1/2/3.

Two gloo ranks each run a DeepSpeed engine on half of a global batch; the reference is the same optimizer
in one process on the whole batch. Checked: the weights after 3 steps, Newton-Schulz once per Muon matrix
per step across the ranks, Adafactor's state factored (O(n + m) per matrix), and that the partition
fragments of all ranks tile every parameter exactly once.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from tests.ranks import run_ranks

STEPS = 3
HPARAMS = {
    "adamw": {"lr": 1e-2},
    # Newton-Schulz in float32: the per-tensor (reference) and batched (sharded) bf16 kernels round differently
    "muon": {"lr": 1e-2, "ns_dtype": "float32"},
    "adafactor": {"lr": 1e-2, "relative_step": False, "beta1": 0.9},
}


def _model() -> torch.nn.Module:
    from flatlm.models import build_model, model_config

    overrides = {"num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2}
    return build_model(model_config("tiny", 50, {**overrides, "num_key_value_heads": 2}), seed=0)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(step))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from flatlm.train.step import per_sequence_loss

    return per_sequence_loss(model, tokens[:, :-1], tokens[:, 1:], False).mean()


def _run(rank: int, world: int, name: str, stage: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from flatlm.optim import build_optimizer, model_param_groups
    from flatlm.parallel.deepspeed import _shape_aware_on_partitions
    from flatlm.parallel.layouts import distribution
    from flatlm.parallel.zero_views import skip_shm_comm_build, zero_fragments

    model = _model()
    reference = copy.deepcopy(model)
    ref_opt = build_optimizer(name, model_param_groups(name, reference, 0.1), **HPARAMS[name])
    injected = distribution(f"zero{stage}")  # what the ZeRO backend builds its client optimizer with
    opt = build_optimizer(name, model_param_groups(name, model, 0.1), distribution=injected, **HPARAMS[name])
    before = (type(opt), sorted(vars(opt)))
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        # Buckets as flatlm sizes them (DeepSpeed's 5e8-element default costs ~1 s per allocation on CPU).
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": sum(p.numel() for p in model.parameters()),
            "allgather_bucket_size": sum(p.numel() for p in model.parameters()),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    skip_shm_comm_build()  # as flatlm's backend does: no g++ build of DeepSpeed's inference all-reduce
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    _shape_aware_on_partitions(injected.layout, engine, model)  # binds the layout; the optimizer is not touched
    assert (type(opt), sorted(vars(opt))) == before

    # the fragments of all ranks tile every parameter exactly once
    mine = [(f.name, f.start, f.numel) for frags in zero_fragments(engine, model) for f in frags]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    for pname, p in reference.named_parameters():
        covered = sorted((s, n) for frags in everyone for (name_, s, n) in frags if name_ == pname)
        assert [s for s, _ in covered] == [sum(n for _, n in covered[:k]) for k in range(len(covered))], pname
        assert sum(n for _, n in covered) == p.numel(), pname

    for step in range(STEPS):
        tokens = _batch(step)
        engine.backward(_loss(engine, tokens[2 * rank : 2 * rank + 2]))
        engine.step()
        ref_opt.zero_grad()
        _loss(reference, tokens).backward()
        ref_opt.step()

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=pname)
    if name == "muon":
        count = torch.tensor([injected.orthogonalize.ns_matrices])
        dist.all_reduce(count)
        n_muon = sum(len(g["params"]) for g in ref_opt.param_groups if g["use_muon"])
        assert count.item() == STEPS * n_muon  # Newton-Schulz once per matrix and step, over all ranks
    elif name == "adafactor":  # factored on the partitions: R [n] and C [m] per matrix, never a matrix
        assert opt.state
        for lay in injected.layout.layouts.values():
            st = opt.state.get(lay.flat)
            for i, shape in enumerate(lay.shapes):
                if st and len(shape) == 2:
                    assert st["exp_avg_sq_row"][i].shape == (shape[0],)
                    assert st["exp_avg_sq_col"][i].shape == (shape[1],)
                    assert i not in st["exp_avg_sq"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", ["muon", "adafactor", "adamw"])
def test_shape_aware_on_zero_partitions_equal_single(name: str, stage: int) -> None:
    run_ranks(_run, name, stage)
