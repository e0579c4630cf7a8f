"""flatlm.train.step: the loss over counted targets normalised by the global count, the step plan, and the loop's
one host sync per step.

Gradients are recorded by an optimizer whose ``step`` copies ``p.grad`` (what the backend hands the optimizer,
after DDP's averaging and before any update), and compared per tensor with an independent one-process autograd
reference of (sum of the counted token losses of the whole global batch) / (their count). Noise: the reference
and the step differ by float32 summation order only; measured worst relative error (Frobenius, per tensor) 6.5e-8
(one process) and 5.2e-8 (DDP, 2 ranks), so 1e-6 is the bound. The bugs it is for move the gradient far more
(measured): normalising by each rank's own count 1.2, by the mean of micro-batch means 1.6, ignoring the mask 0.74;
the first two are asserted beside the comparisons (the local count planted in the step itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import flatlm.train.step as step_module
from flatlm.config import load_config
from flatlm.data import Batch
from flatlm.models import build_model, model_config
from flatlm.optim import build_optimizer
from flatlm.parallel.backend import DDPParallel, Parallel
from flatlm.train.metrics import read_jsonl
from flatlm.train.step import Pass, StepPlan, plan_for, token_losses, train_step
from tests.conftest import tiny_overrides
from tests.ranks import run_ranks

VOCAB, SEQ, MICRO, ACCUM = 64, 8, 2, 2
NOISE_BOUND = 1e-6  # 15x the measured worst (6.5e-8)
# Counted targets per sequence: rank 0 counts most of its targets, rank 1 few (uneven per rank and per sequence);
# one sequence counts nothing.
KEEP = {0: [[8, 7], [6, 8]], 1: [[2, 0], [1, 3]]}  # [rank][micro-batch][sequence] -> counted targets (a prefix)


def _model() -> torch.nn.Module:
    overrides = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    return build_model(model_config("tiny", VOCAB, {**overrides, "num_key_value_heads": 2}), seed=0)


def _batches(rank: int) -> list[Batch]:
    """Rank ``rank``'s micro-batches: random tokens, a loss mask counting a prefix of each sequence's targets."""
    gen = torch.Generator().manual_seed(rank)
    out = []
    for counts in KEEP[rank]:
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        mask = torch.arange(SEQ).expand(MICRO, SEQ) < torch.tensor(counts)[:, None]
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], loss_mask=mask))
    return out


class RecordGrads(torch.optim.Optimizer):
    """Steps nothing; keeps a copy of the gradients it was asked to step with."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def _reference(model: torch.nn.Module, batches: list[Batch], normalise: str = "global") -> list[torch.Tensor]:
    """grad of (sum of counted token losses over ``batches``) / (their count), written out with plain autograd;
    ``normalise="micro"``: the mean of each micro-batch's token mean (the bug the global count prevents)."""
    terms = []
    for b in batches:
        logits = model(input_ids=b.inputs).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none").view(b.targets.shape)
        terms.append(((loss * b.loss_mask).sum(), b.loss_mask.sum()))
    if normalise == "global":
        total = sum(s for s, _ in terms) / sum(c for _, c in terms)
    else:
        total = sum(s / c for s, c in terms) / len(terms)
    return list(torch.autograd.grad(total, list(model.parameters())))


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True) if y.norm() > 0)


def test_masked_loss_gradient_is_global_sum_over_count_in_one_process() -> None:
    model = _model()
    everything = _batches(0) + _batches(1)  # the whole global batch in one process: 4 micro-batches
    opt = RecordGrads(model.parameters())
    stats = train_step(Parallel("single", model, model), opt, everything, list(model.parameters()), grad_clip=0.0)
    reference = _reference(model, everything)
    assert _worst(opt.grads, reference) < NOISE_BOUND
    assert _worst(_reference(model, everything, "micro"), reference) > 100 * NOISE_BOUND  # the bug it is for
    # the logged loss: global sum / global count; the count is of counted targets only
    counted = sum(int(b.loss_mask.sum()) for b in everything)
    assert int(stats.counted) == counted == sum(map(sum, KEEP[0] + KEEP[1]))
    with torch.no_grad():
        sums = sum(float(token_losses(model, b, False).sums.sum()) for b in everything)
    assert float(stats.loss_sum) == pytest.approx(sums, rel=1e-6)


def _ddp_masked(rank: int, world: int) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    reference = _reference(_model(), _batches(0) + _batches(1))
    for plant_local_count in (False, True):
        model = _model()
        opt = RecordGrads(model.parameters())
        parallel = DDPParallel(model, DistributedDataParallel(model))
        with contextlib.ExitStack() as stack:
            if plant_local_count:  # the bug: each rank normalises by its own count
                stack.enter_context(_patched(step_module, "all_reduce_sum", lambda x, group=None: x))
            train_step(parallel, opt, _batches(rank), list(model.parameters()), grad_clip=0.0)
        worst = _worst(opt.grads, reference)
        if plant_local_count:
            assert worst > 100 * NOISE_BOUND, f"a local count went unnoticed ({worst:.2e})"
        else:
            assert worst < NOISE_BOUND, f"rank {rank}: gradient differs from global sum / count by {worst:.2e}"
    assert dist.get_world_size() == world


def _counting_calls(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@pytest.mark.timeout(240)
def test_masked_loss_gradient_under_ddp_with_uneven_counts() -> None:
    """2 DDP ranks, 29 and 6 counted targets: the averaged gradient is grad(global sum / global count) (each rank
    backwards W / N times its sum); with a rank normalising by its own count (planted) the same comparison fails."""
    run_ranks(_ddp_masked)


def test_position_ids_reach_the_model() -> None:
    model = _model().eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    default = token_losses(model, Batch(x, y), False).sums
    explicit = token_losses(model, Batch(x, y, position_ids=torch.arange(SEQ).expand(2, SEQ)), False).sums
    restarted = torch.arange(SEQ).remainder(SEQ // 2).expand(2, SEQ)  # two packed documents, positions from 0 each
    # (a constant shift would not show: rotary attention sees relative positions only)
    per_document = token_losses(model, Batch(x, y, position_ids=restarted), False).sums
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, per_document)


def _tiny_llama(attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_are_isolated_under_every_attention_kernel(attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two examples packed in one row: changing the first changes nothing of the second's losses, which equal the
    second example alone, under SDPA and eager attention alike. Planted bug: a bool mask, which eager attention adds
    to its scores as 1/0, leaks."""
    model = _tiny_llama(attn)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, VOCAB, (6,), generator=g), torch.randint(0, VOCAB, (9,), generator=g)
    positions = torch.cat([torch.arange(5), torch.arange(8)])[None]  # inputs: a[:-1] then b[:-1]

    def second_example_losses(first: torch.Tensor) -> torch.Tensor:
        x = torch.cat([first[:-1], b[:-1]])[None]
        y = torch.cat([first[1:], b[1:]])[None]
        loss_mask = torch.cat([torch.zeros(5, dtype=torch.bool), torch.ones(8, dtype=torch.bool)])[None]
        return token_losses(model, Batch(x, y, loss_mask=loss_mask, position_ids=positions), False).sums

    with torch.no_grad():
        changed_a = a.clone()
        changed_a[1] = (changed_a[1] + 1) % VOCAB
        alone = token_losses(model, Batch(b[:-1][None], b[1:][None]), False).sums
        assert torch.equal(second_example_losses(a), second_example_losses(changed_a))
        assert torch.allclose(second_example_losses(a), alone, rtol=1e-5)
        original = step_module.packed_attention_mask
        monkeypatch.setattr(step_module, "packed_attention_mask", lambda pos: original(pos) == 0)  # the bool form
        leaked = (second_example_losses(a) - second_example_losses(changed_a)).abs().max()
    assert (leaked > 1e-4) == (attn == "eager")  # SDPA honours a bool mask; eager adds it to the scores


def test_bad_batches_are_refused() -> None:
    x = torch.zeros(2, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_mask must have the inputs' shape"):
        Batch(x, x, loss_mask=torch.ones(2, SEQ - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_mask must be a bool tensor"):
        Batch(x, x, loss_mask=torch.ones(2, SEQ))
    with pytest.raises(ValueError, match="inputs and targets must both be"):
        Batch(x, x[:, 1:])


# -- the step plan ----------------------------------------------------------------------------------------------


def test_plans_for_plain_and_sam_family() -> None:
    params = list(_model().parameters())
    assert plan_for(torch.optim.AdamW(params)) == StepPlan((Pass("w", sync=True),))
    sam = build_optimizer("sam", params, lr=1e-3)
    glob, replica = plan_for(sam), plan_for(sam, replica_perturbation=True)
    assert [(p.point, p.sync) for p in glob.passes] == [("w", True), ("w+eps", True)]
    assert [(p.point, p.sync) for p in replica.passes] == [("w", False), ("w+eps", True)]
    assert glob.passes[1].loss == sam.second_pass_loss
    esam = build_optimizer("esam", params, lr=1e-3, gamma=0.5)
    assert plan_for(esam).passes[1].loss == esam.second_pass_loss  # its sample selection runs in pass 2
    with pytest.raises(ValueError, match="starts with a pass at w"):
        StepPlan((Pass("w+eps", sync=True),))


def test_step_runs_the_plan_it_is_given() -> None:
    """A plan is data the step executes: SAM's two passes under the default plan; the same optimizer given a
    one-pass plan never perturbs (a plan with a pass the variant declines, LookSAM's, is in test_sam_replica)."""
    torch.manual_seed(0)
    calls: list[str] = []

    class Counting(Parallel):
        def perturb(self, optimizer: Any) -> bool:
            calls.append("perturb")
            return super().perturb(optimizer)

        def restore(self, optimizer: Any) -> None:
            calls.append("restore")
            super().restore(optimizer)

    model = _model()
    sam = build_optimizer("sam", model.parameters(), lr=1e-3)
    parallel = Counting("single", model, model)
    stats = train_step(parallel, sam, _batches(0), list(model.parameters()), grad_clip=0.0)
    assert stats.second_pass and calls == ["perturb", "restore"]
    calls.clear()
    one = StepPlan((Pass("w", sync=True),))
    stats = train_step(parallel, sam, _batches(0), list(model.parameters()), grad_clip=0.0, plan=one)
    assert not stats.second_pass and calls == []


# -- one host sync per step -------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier")


class Counter:
    """Counts host reads of tensors and Python-level torch.distributed collectives, per optimizer step: the
    counts between one ``train_step`` call of the loop and the next (everything the loop does for one step,
    logging included)."""

    def __init__(self) -> None:
        self.counts = {"host": 0, "collective": 0}
        self.at_step: list[dict[str, int]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        import flatlm.train.loop as loop

        def counting(kind: str, real: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.counts[kind] += 1
                return real(*args, **kwargs)

            return counted

        with contextlib.ExitStack() as stack:
            for name in HOST_READS:
                stack.enter_context(_patched(torch.Tensor, name, counting("host", getattr(torch.Tensor, name))))
            for name in COLLECTIVES:
                stack.enter_context(_patched(dist, name, counting("collective", getattr(dist, name))))
            real_step = loop.train_step

            def step(*args: Any, **kwargs: Any) -> Any:
                self.at_step.append(dict(self.counts))
                return real_step(*args, **kwargs)

            stack.enter_context(_patched(loop, "train_step", step))
            yield

    def per_step(self) -> list[dict[str, int]]:
        """Counts of each full step (from one step's start to the next one's: the last step, which evaluates and
        saves, is left out)."""
        return [{k: b[k] - a[k] for k in a} for a, b in zip(self.at_step, self.at_step[1:], strict=False)]


STEPS = {"train.max_steps": 5, "train.eval_every": 0, "checkpoint.every": 0, "train.log_interval_s": 0}


# Host reads per step: the loop's one; SAM adds the one its perturbation makes inside flatlm/optim/sam.py (the
# scale rho / ||g|| read with .item() to pass as a foreach alpha): the step and the loop add none to it.
HOST_BOUND = {"adamw": 1, "sam": 2}


def test_one_host_read_per_step_in_one_process(tmp_path: Path, text_corpus: Path) -> None:
    """Bound asserted: at most 1 host read per step (the step's loss, grad norm and stop flag, together; SAM: 2, see
    HOST_BOUND) and no collective. A planted ``.item()`` per step is counted, over the bound."""
    import flatlm.train.loop as loop
    from flatlm.train.loop import train

    for optim, bound in HOST_BOUND.items():
        counter, sized = Counter(), []
        measure = _counting_calls(loop.optimizer_state_bytes, sized)
        with counter.active(), _patched(loop, "optimizer_state_bytes", measure):
            train(load_config(None, tiny_overrides(tmp_path / optim, text_corpus, **STEPS, **{"optim.name": optim})))
        steps = counter.per_step()
        assert len(steps) == 4 and all(s["host"] <= bound and s["collective"] == 0 for s in steps), (optim, steps)
        assert len(sized) == 1  # the optimizer state is measured once per run, not every step
        records = read_jsonl(tmp_path / optim / "metrics.jsonl")
        assert len({r["optim_state_bytes"] for r in records}) == 1 and records[0]["optim_state_bytes"] > 0
    planted = Counter()
    real = step_module.StepStats

    def stats_with_a_read(*args: Any, **kwargs: Any) -> Any:
        stats = real(*args, **kwargs)
        stats.grad_norm.item()  # the bug: a second host read per step
        return stats

    with planted.active(), _patched(step_module, "StepStats", stats_with_a_read):
        train(load_config(None, tiny_overrides(tmp_path / "planted", text_corpus, **STEPS)))
    assert planted.per_step() == [{"host": 2, "collective": 0}] * 4


def _loop_on_ranks(rank: int, world: int, out: str, corpus: str) -> None:
    import flatlm.train.loop as loop

    counter = Counter()
    extra = {**STEPS, "train.micro_batch_size": 2, "parallel.backend": "ddp"}
    with counter.active(), _patched(loop, "destroy_process_group", lambda: None):  # run_ranks owns the group
        loop.train(load_config(None, tiny_overrides(Path(out), Path(corpus), **extra)))
    # the count of counted targets (before any backward) and the loss sum with the stop flag: 2 all-reduces;
    # DDP's gradient all-reduce runs in its C++ reducer, not counted here
    assert counter.per_step() == [{"host": 1, "collective": 2}] * 4, (rank, counter.per_step())


@pytest.mark.timeout(240)
def test_one_host_read_per_step_on_two_ddp_ranks(tmp_path: Path, text_corpus: Path) -> None:
    """Bound asserted per step and rank: 1 host read, 2 Python-level collectives (count; loss sum + stop flag)."""
    run_ranks(_loop_on_ranks, str(tmp_path / "ddp"), str(text_corpus))
