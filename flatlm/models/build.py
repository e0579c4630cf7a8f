"""Build a causal LM from a preset, an HF config name or a local path. Pure: no distributed code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from flatlm.errors import FlatlmError, did_you_mean
from flatlm.models.presets import PRESETS, preset_kwargs


def model_config(
    name: str, vocab_size: int, overrides: dict[str, Any] | None = None, *, bos_id: int = 1, eos_id: int = 2
) -> PretrainedConfig:
    """The transformers config for ``name`` with the tokenizer's vocabulary and ``overrides``.

    A preset gets exactly the tokenizer's ``vocab_size``; a config loaded from a path or Hub id keeps its own when it
    is larger (an embedding padded past the tokenizer, as Qwen's and Pythia's are, so its weights fit
    ``model.init_from``) and grows to the tokenizer's when it is smaller."""
    overrides = dict(overrides or {})
    if name in PRESETS:
        kwargs = {
            **preset_kwargs(name),
            "vocab_size": vocab_size,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": None,
        }
        unknown = sorted(set(overrides) - set(LlamaConfig().to_dict()))
        if unknown:
            raise FlatlmError(
                f"model.overrides has keys LlamaConfig does not know: {', '.join(unknown)}; "
                "use field names of transformers.LlamaConfig (e.g. num_hidden_layers, hidden_size)"
            )
        return LlamaConfig(**{**kwargs, **overrides})
    if Path(name).exists() or "/" in name:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise FlatlmError(
                f"could not load a transformers config from model.name={name!r}: {exc}. "
                "Pass a preset name, a local directory holding config.json, or a Hub id "
                "reachable from this machine"
            ) from None
        # A pretrained embedding may be padded past its tokenizer (Qwen, Pythia): its rows stay, never cut.
        config.vocab_size = max(int(getattr(config, "vocab_size", 0) or 0), vocab_size)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    raise FlatlmError(
        f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}; valid presets: "
        f"{', '.join(PRESETS)} (or a local path / Hub id of a transformers config)"
    )


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def build_model(config: PretrainedConfig, *, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised causal LM for ``config`` (fp32 weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_pretrained_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the weights of the Hugging Face model at ``path`` into ``model``; every tensor must match."""
    try:
        source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    except (OSError, ValueError) as exc:
        raise FlatlmError(f"model.init_from={path!r} is not a loadable Hugging Face model: {exc}") from None
    copy_weights(model, source, path, fix=f"model.name={path} data.tokenizer={path}")


def copy_weights(model: torch.nn.Module, source: dict[str, torch.Tensor], path: str, fix: str) -> None:
    """Load ``source`` (a state dict read from ``model.init_from=path``) into ``model``: every tensor of the model
    must be there with its shape, else one error naming the first misfit and ``fix`` (the settings that fit)."""
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    wrong = [k for k in target if k in source and source[k].shape != target[k].shape]
    if missing or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"{wrong[0]} is {tuple(source[wrong[0]].shape)} there, {tuple(target[wrong[0]].shape)} here"
        )
        raise FlatlmError(
            f"model.init_from={path!r} does not fit this model ({detail}); use its architecture and tokenizer: {fix}"
        )
    model.load_state_dict({k: source[k] for k in target})
