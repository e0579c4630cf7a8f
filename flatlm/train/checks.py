"""Checks on user input that need neither data nor processes, and the hyperparameters a run really uses.

``check_static`` runs first: the CLI calls it right after reading the config, before importing the training
loop (transformers, checkpointing: seconds), and ``flatlm.train.loop`` calls it again before anything is read
or written. A misspelt schedule, a wrong-shaped hyperparameter or a data path that matches nothing therefore
fails in about a second with one :class:`FlatlmError`, not after the corpus is tokenized or, worse, inside
torch at the first step.

"""

from __future__ import annotations

from typing import Any

import torch

from flatlm.config import RunConfig
from flatlm.errors import FlatlmError
from flatlm.optim import build_optimizer, build_scheduler, model_param_groups
from flatlm.optim.registry import get_spec, resolved_hparams
from flatlm.optim.schedules import schedule_arguments

PROBE_STEPS = 2  # two steps: the first creates the state, the second reads it (LookSAM's reuse, moments)


def check_static(cfg: RunConfig) -> None:
    """Every check on ``cfg`` that needs no data, model or process group (each raises one FlatlmError)."""
    check_schedule(cfg)
    check_optimizer(cfg)
    check_adversarial(cfg)
    if cfg.data.source == "files":
        from flatlm.data.sources import expand_paths

        expand_paths(cfg.data.paths)  # every path or glob must match something


def warmup_steps(cfg: RunConfig) -> int:
    """The run's warmup: ``schedule.warmup_fraction`` of ``train.max_steps`` (rounded) when set, else
    ``schedule.warmup_steps``."""
    fraction = cfg.schedule.warmup_fraction
    return cfg.schedule.warmup_steps if fraction is None else round(fraction * cfg.train.max_steps)


def schedule_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The schedule section's values that the chosen schedule takes, plus the run length (warmup resolved)."""
    values = {
        "total_steps": cfg.train.max_steps,
        **cfg.schedule.model_dump(exclude={"name", "warmup_fraction"}),
        "warmup_steps": warmup_steps(cfg),
    }
    return {k: values[k] for k in schedule_arguments(cfg.schedule.name)}


def schedule_warning(cfg: RunConfig) -> str | None:
    """A warning when warmup covers the whole run (the learning rate never reaches its peak, nor decays)."""
    warmup = warmup_steps(cfg)
    if warmup < cfg.train.max_steps:
        return None
    return (
        f"the warmup ({warmup} steps) covers the whole run (train.max_steps={cfg.train.max_steps}): the learning rate "
        "never reaches its peak and never decays; set schedule.warmup_fraction (e.g. 0.1) or fewer "
        "schedule.warmup_steps"
    )


def check_schedule(cfg: RunConfig) -> None:
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    build_scheduler(cfg.schedule.name, dummy, **schedule_kwargs(cfg))


class _Probe(torch.nn.Module):
    """Every kind of parameter a Llama has, named as in one (the group policy matches names): embeddings, a
    hidden matrix with a bias, a norm and the LM head, so Muon's AdamW groups and weight decay groups all exist."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(8, 4)
        self.proj = torch.nn.Linear(4, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.lm_head = torch.nn.Linear(6, 8, bias=False)


def check_adversarial(cfg: RunConfig) -> None:
    """train.adversarial with a SAM-family optimizer is refused: both perturb, and the step runs one or the other."""
    if cfg.train.adversarial.enabled and get_spec(cfg.optim.name).wrapper:
        raise FlatlmError(
            f"train.adversarial.steps={cfg.train.adversarial.steps} with optim.name={cfg.optim.name} (a SAM-family "
            "optimizer) is not supported: choose one perturbation, adversarial inputs (a plain optimizer such as "
            "adamw) or SAM's weights (train.adversarial.steps=0)"
        )


def _probe_device() -> torch.device:
    """The device this process trains on (options such as ``capturable`` or ``fused`` depend on it)."""
    from flatlm.parallel import environment
    from flatlm.parallel.device import local_device

    return local_device(environment())


def _probe_step(cfg: RunConfig, hparams: dict[str, Any]) -> None:
    """Build ``cfg``'s optimizer with ``hparams`` on a probe model and take PROBE_STEPS steps (SAM family: perturb,
    restore, step, as the loop does), so that a hyperparameter torch only reads while stepping fails here."""
    device = _probe_device()
    rng_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # the probe's init and ESAM's sampling leave the run's RNG alone
        torch.manual_seed(0)
        probe = _Probe().to(device)
        groups = model_param_groups(cfg.optim.name, probe, cfg.optim.weight_decay, hparams)
        optimizer = build_optimizer(cfg.optim.name, groups, lr=cfg.optim.lr, **hparams)
        params = [p for g in groups for p in g["params"]]

        def fill_grads() -> None:
            for i, p in enumerate(params):
                p.grad = torch.linspace(-1.0, 1.0 + i, p.numel(), device=device).reshape(p.shape)

        for _ in range(PROBE_STEPS):
            fill_grads()
            if hasattr(optimizer, "perturb") and optimizer.perturb():
                fill_grads()
                optimizer.restore()
            optimizer.step()
        if not all(torch.isfinite(p).all() for p in params):
            raise FloatingPointError("the probe's weights are not finite after two steps")


def check_optimizer(cfg: RunConfig) -> None:
    """Refuse optimizer settings that cannot step, naming the hyperparameter at fault when one is.

    Names and ranges the optimizers check themselves already fail as FlatlmError; anything else torch raises
    (``betas=[0.9]``: an IndexError; ``eps="x"``: a TypeError) is turned into one error here. The culprit is
    found by leaving out one written hyperparameter at a time: the one whose absence makes the probe step work.
    """
    hparams = dict(cfg.optim.hparams)
    try:
        _probe_step(cfg, hparams)
        return
    except FlatlmError:
        raise
    except Exception as exc:  # whatever torch raises for a value of the wrong type or shape
        failure = f"{type(exc).__name__}: {exc}"
    culprit = None
    for key in hparams:
        try:
            _probe_step(cfg, {k: v for k, v in hparams.items() if k != key})
        except Exception:
            continue
        culprit = key
        break
    name = cfg.optim.name
    if culprit is None:
        raise FlatlmError(
            f"optimizer {name!r} cannot step with optim.lr={cfg.optim.lr:g}, optim.weight_decay="
            f"{cfg.optim.weight_decay:g} and optim.hparams={hparams} ({failure}); check the hyperparameters' types"
        )
    default = resolved_hparams(name, {}).get(culprit, "none")
    raise FlatlmError(
        f"optim.hparams.{culprit}={hparams[culprit]!r} does not work for optimizer {name!r} ({failure}); "
        f"give it the type and shape of its default ({default!r})"
    )


def check_same_data(fingerprint: str, host: str) -> None:
    """Every rank was fed the same data: each node builds its own token cache, and two nodes whose corpus or tokenizer
    differ (another copy of the files, another Python for data.source=stdlib, a stale tokenizer) would train one
    model on two tokenizations without a word. All ranks raise the same error, so rank 0 says it."""
    from flatlm.parallel.collectives import all_gather_object, world

    if world()[1] == 1:
        return
    seen = all_gather_object((fingerprint, host))
    if len({fp for fp, _ in seen}) == 1:
        return
    groups: dict[str, list[str]] = {}
    for rank, (fp, where) in enumerate(seen):
        groups.setdefault(fp, []).append(f"{rank} ({where})")
    described = "; ".join(f"ranks {', '.join(ranks)} have data {fp}" for fp, ranks in groups.items())
    raise FlatlmError(
        f"the ranks were fed different data: {described}. Each node builds its tokenizer and token cache from its "
        "own copy of the corpus (data.paths; data.source=stdlib reads each node's Python), in its own data.cache_dir: "
        "give every node the same files (or the same Python), or put the corpus and FLATLM_CACHE on a shared file "
        "system"
    )
