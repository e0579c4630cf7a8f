"""Models: presets and construction from transformers configs (never imports torch.distributed)."""

from flatlm.models.build import build_model, count_parameters, load_pretrained_weights, max_positions, model_config
from flatlm.models.presets import PRESETS

__all__ = ["PRESETS", "build_model", "count_parameters", "load_pretrained_weights", "max_positions", "model_config"]
