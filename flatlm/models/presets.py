"""Named Llama-style model sizes, as keyword arguments of ``transformers.LlamaConfig``.

The 60m-1b sizes follow the Llama shapes used in optimizer papers (GaLore, Adam-mini); vocabulary
size is taken from the tokenizer at build time. Parameter counts in the names assume a 32k vocab.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~0.8M non-embedding parameters (1.9M with a 4k vocab): the CPU default and the tests' model.
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    },
    "llama-60m": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "llama-125m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
    },
    "llama-350m": {
        "hidden_size": 1024,
        "intermediate_size": 2736,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 5461,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """LlamaConfig keyword arguments of a preset (a copy the caller may change)."""
    return {**_COMMON, **PRESETS[name]}
