"""Every registered optimizer builds from the config and trains the default model for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatlm.config import load_config
from flatlm.optim import OPTIMIZERS
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides
from tests.train.test_loop import checkpoint_keys

LR = {"sgd": 0.1, "adagrad": 1e-2, "adadelta": 1.0, "adafactor": 1e-2, "lion": 3e-4, "muon": 3e-3, "rmsprop": 1e-3}
EXTRA = {"adafactor": {"optim.hparams.relative_step": False, "optim.hparams.scale_parameter": False}}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trains_default_model(tmp_path: Path, text_corpus: Path, name: str) -> None:
    out = tmp_path / name
    overrides = {
        # The default model (tiny preset) at full size; short sequences keep it fast.
        "model.overrides.num_hidden_layers": 4,
        "model.overrides.hidden_size": 128,
        "model.overrides.intermediate_size": 352,
        "optim.name": name,
        "optim.lr": LR.get(name, 3e-3),
        "train.max_steps": 5,
        "checkpoint.every": 5,
        **EXTRA.get(name, {}),
    }
    result = train(load_config(None, tiny_overrides(out, text_corpus, **overrides)))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    keys = checkpoint_keys(result.checkpoint)  # its state is in the sharded checkpoint, keyed by parameter name
    assert "optim.param_groups.0.lr" in keys
    if name != "sgd":  # plain SGD keeps no state
        assert any(k.startswith("optim.state.model.layers.0.mlp.up_proj.weight.") for k in keys), sorted(keys)[:5]
