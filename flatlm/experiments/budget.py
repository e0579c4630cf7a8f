r"""Compute per optimizer step, for equal-compute comparisons (``budget: flops``).

One optimizer step of a cell costs

    F = passes(optimizer) * F_model  +  F_optimizer

    F_model = (6 N + 12 L d T) * tokens         tokens = train.global_batch_size * data.seq_len, T = data.seq_len

- ``6 N``: a forward (2 N: a multiply and an add per weight and token) and a backward (4 N: gradients of the inputs
  and of the weights) over N = every parameter that is a matmul, i.e. all of them but the input token embedding (a
  lookup; a tied LM head counts once, as the matmul it is). Norm weights and biases are included: negligible.
- ``12 L d T``: attention's scores (Q K^T) and their mix (A V), 2 T d multiply-adds each per token and layer, times
  3 for forward+backward (PaLM, Chowdhery et al. 2022, appendix B); L = layers, d = hidden size; the causal mask is
  not halved out, as in PaLM's count.
- ``passes``: forward+backward passes per step, from ``PASSES`` (the one table of per-optimizer factors); with
  adversarial training (``train.adversarial``) plus ``K * (4 N + 12 L d T) / (6 N + 12 L d T)`` for its K ascent
  passes, which compute input gradients only (2 N forward + 2 N backward, no weight gradients; attention's scores and
  mix in full), and 1 for objective=mean's clean pass.
- ``F_optimizer``: the optimizer's own matmuls. Only Muon has any (its element-wise updates, like every other
  optimizer's, are O(N) per step against O(N * tokens) for the model: ignored). Newton–Schulz on a matrix X of
  m x n (oriented so that m <= n), per iteration ``A = X X^T`` (2 m^2 n), ``A^2`` (2 m^3), ``(b A + c A^2) X``
  (2 m^2 n; the m x m sums are O(m^2)): 2 (2 m^2 n + m^3) FLOPs, times ``ns_steps``, summed over the matrices Muon
  steps (the 2-D hidden ones, ``flatlm.optim.param_groups.is_muon_matrix``). A SAM wrapper around Muon pays both.

``budget: flops`` gives each cell ``round(max_steps * F(baseline) / F(cell))`` steps, where F(baseline) is the same
cell (model, data, batch) under the grid's baseline optimizer with its default hyperparameters and no adversarial
training; ``budget: steps`` keeps ``train.max_steps``.

The model's shapes come from its transformers config (``flatlm.models.model_config``), built on the meta device: no
weights, no data. The vocabulary is ``data.vocab_size`` (with ``data.tokenizer`` set, the real one may differ; it
only changes the LM head's term).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flatlm.config import AdversarialConfig, RunConfig
from flatlm.experiments.grid import Grid, ResolvedCell

# Forward+backward passes per optimizer step, from the resolved hyperparameters.
PASSES: dict[str, Callable[[dict[str, Any]], float]] = {
    "sam": lambda h: 2.0,  # ascent pass to w + eps, then the pass whose gradient steps
    "asam": lambda h: 2.0,
    "ssam": lambda h: 2.0,
    "gsam": lambda h: 2.0,
    "looksam": lambda h: 1.0 + 1.0 / h["k"],  # the second pass every k-th step only
    # ESAM: 2 passes, as flatlm implements it. The paper's pass 2 backpropagates only the fraction gamma of the
    # samples (1 + (1 + 2 gamma) / 3 passes), but flatlm.optim.esam forwards every sample with grad at w + eps and
    # starts the backward from the selected samples' mean loss, through the whole batch's graph: the backward costs
    # a full one (the unselected samples' gradients are zeros, still computed). Its weight sparsity (beta) saves
    # element-wise work only.
    "esam": lambda h: 2.0,
}


@dataclass(frozen=True)
class StepCost:
    model: float
    """One forward+backward over the step's tokens."""
    passes: float
    optimizer: float
    """The optimizer's own matmuls (Muon's Newton–Schulz)."""

    @property
    def total(self) -> float:
        return self.passes * self.model + self.optimizer


def step_cost(cfg: RunConfig) -> StepCost:
    """FLOPs of one optimizer step of ``cfg`` (see the module docstring)."""
    from flatlm.optim.registry import get_spec, resolved_hparams

    name = cfg.optim.name
    hparams = resolved_hparams(name, cfg.optim.hparams)
    passes = PASSES.get(name, lambda h: 1.0)(hparams)
    core, core_hparams = name, hparams
    if get_spec(name).wrapper:
        core = str(hparams.get("base", "adamw"))
        core_hparams = resolved_hparams(core, {k: v for k, v in cfg.optim.hparams.items() if k != "base"})
    shapes = _shapes(cfg.model.name, cfg.data.vocab_size, json.dumps(cfg.model.overrides, sort_keys=True))
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    attention = 12.0 * shapes.layers * shapes.hidden * cfg.data.seq_len
    model = (6.0 * shapes.matmul_params + attention) * tokens
    adversarial = cfg.train.adversarial
    if adversarial.enabled:  # ascent passes: no weight gradients (4 N, not 6 N); mean: one more full pass
        ascent = (4.0 * shapes.matmul_params + attention) / (6.0 * shapes.matmul_params + attention)
        passes += adversarial.steps * ascent + (1.0 if adversarial.objective == "mean" else 0.0)
    optimizer = 0.0
    if get_spec(core).muon_groups:
        optimizer = float(core_hparams["ns_steps"]) * sum(newton_schulz_flops(m, n) for m, n in shapes.muon_matrices)
    return StepCost(model, passes, optimizer)


def newton_schulz_flops(rows: int, cols: int) -> float:
    """One Newton–Schulz iteration on a rows x cols matrix: 2 (2 m^2 n + m^3) with m = min, n = max."""
    m, n = sorted((rows, cols))
    return 2.0 * (2.0 * m * m * n + m**3)


@dataclass(frozen=True)
class _Shapes:
    matmul_params: int
    layers: int
    hidden: int
    muon_matrices: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=64)
def _shapes(model_name: str, vocab_size: int, overrides_json: str) -> _Shapes:
    """Parameter counts of the model, built on the meta device (shapes only)."""
    import torch

    from flatlm.models import build_model, model_config
    from flatlm.optim.param_groups import is_muon_matrix

    config = model_config(model_name, vocab_size, json.loads(overrides_json))
    with torch.device("meta"):
        model = build_model(config)
    embedding = model.get_input_embeddings().weight
    seen: set[int] = {id(embedding)} if not getattr(config, "tie_word_embeddings", False) else set()
    matmul, muon = 0, []
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        matmul += param.numel()
        if is_muon_matrix(name, param):
            muon.append((int(param.shape[0]), int(param.shape[1])))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    return _Shapes(matmul, layers, hidden, tuple(muon))


def apply_budget(grid: Grid, cells: list[ResolvedCell]) -> None:
    """Set each cell's flops_per_step and, under ``budget: flops``, its train.max_steps (equal compute)."""
    for cell in cells:
        cell.flops_per_step = step_cost(cell.cfg).total
        if grid.budget != "flops":
            continue
        reference = cell.cfg.model_copy(deep=True)
        reference.optim.name = grid.baseline
        reference.optim.hparams = {}
        reference.train.adversarial = AdversarialConfig()  # the baseline trains plainly
        ratio = step_cost(reference).total / cell.flops_per_step
        cell.cfg.train.max_steps = max(1, round(cell.cfg.train.max_steps * ratio))
