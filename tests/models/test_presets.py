from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from flatlm.errors import FlatlmError
from flatlm.models import PRESETS, build_model, count_parameters, max_positions, model_config

# Parameter counts with a 32k vocabulary, untied embeddings (what the preset names refer to).
EXPECTED_MILLIONS = {"llama-60m": 58, "llama-125m": 134, "llama-350m": 368, "llama-1b": 1339}


def _llama_params(c: LlamaConfig) -> int:
    h, i, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_configs_of_the_named_size(name: str) -> None:
    cfg = model_config(name, 32000)
    assert isinstance(cfg, LlamaConfig) and cfg.vocab_size == 32000
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    if name in EXPECTED_MILLIONS:
        assert round(_llama_params(cfg) / 1e6) == pytest.approx(EXPECTED_MILLIONS[name], rel=0.02)


def test_tiny_builds_runs_and_matches_formula() -> None:
    cfg = model_config("tiny", 512)
    model = build_model(cfg, seed=0)
    assert count_parameters(model) == _llama_params(cfg)
    logits = model(input_ids=torch.randint(0, 512, (2, 16))).logits
    assert logits.shape == (2, 16, 512)
    assert max_positions(cfg) == 1024


def test_seeded_init_is_deterministic() -> None:
    cfg = model_config("tiny", 300, {"num_hidden_layers": 1})
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_overrides_and_bad_override() -> None:
    assert model_config("tiny", 300, {"num_hidden_layers": 1}).num_hidden_layers == 1
    with pytest.raises(FlatlmError, match="num_hiden_layers"):
        model_config("tiny", 300, {"num_hiden_layers": 1})


def test_unknown_preset_lists_valid_and_suggests() -> None:
    with pytest.raises(FlatlmError, match=r"unknown model preset 'llama-125'.*did you mean 'llama-125m'.*tiny"):
        model_config("llama-125", 300)


def test_local_hf_config_path(tmp_path: Path) -> None:
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=200
    ).save_pretrained(tmp_path)
    cfg = model_config(str(tmp_path), 300, {"num_hidden_layers": 2})  # grown to the tokenizer (never shrunk)
    assert cfg.hidden_size == 32 and cfg.vocab_size == 300 and cfg.num_hidden_layers == 2
    assert build_model(cfg)(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 300)


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(FlatlmError, match="could not load a transformers config"):
        model_config(str(tmp_path / "missing") + "/", 300)
