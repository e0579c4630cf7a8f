"""``flatlm export RUN_DIR_OR_CHECKPOINT OUT_DIR``: a (sharded) checkpoint as a Hugging Face model directory.

The checkpoint's model state is consolidated in one process (DCP reshards whatever the run used: one process,
DDP, FSDP2; DeepSpeed runs' ``model.safetensors`` is read directly) into the model its ``config.yaml``
describes, then written with ``save_pretrained`` (config.json + safetensors) beside the run's sentencepiece
tokenizer as a ``LlamaTokenizer`` (``tokenizer.model`` + configs), so ``AutoModelForCausalLM`` and
``AutoTokenizer.from_pretrained(OUT_DIR)`` load it. Written into a temporary directory and renamed: an
existing OUT_DIR is never overwritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from flatlm.config import RunConfig
from flatlm.data.tokenizer import Tokenizer
from flatlm.errors import FlatlmError
from flatlm.models import build_model, model_config
from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST, STATE_DIR, TRAINER_STATE, load_model_weights
from flatlm.train.rundir import TOKENIZER_FILE


def find_checkpoint(source: Path) -> Path:
    """The checkpoint ``source`` names: a checkpoint directory, or a run directory (its ``latest``)."""
    source = source.expanduser()
    if (source / TRAINER_STATE).is_file():
        return source
    latest = source / CHECKPOINT_DIR / LATEST
    if latest.is_file():
        path = source / CHECKPOINT_DIR / latest.read_text().strip()
        if (path / TRAINER_STATE).is_file():
            return path
    raise FlatlmError(
        f"{str(source)!r} is neither a flatlm checkpoint (a checkpoints/step-N directory with {TRAINER_STATE}) "
        "nor a run directory with a complete checkpoint; pass one of those"
    )


def load_checkpoint_model(checkpoint: Path) -> tuple[torch.nn.Module, Tokenizer, RunConfig]:
    """The model of ``checkpoint`` with its weights, in one process, with the run's tokenizer and config."""
    run_dir = checkpoint.parent.parent
    cfg = RunConfig.model_validate(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FlatlmError(f"{str(run_dir)!r} has no {TOKENIZER_FILE} (written by flatlm train); cannot export")
    tok = Tokenizer.load(tokenizer_path)
    config = model_config(cfg.model.name, tok.vocab_size, cfg.model.overrides, bos_id=tok.bos_id, eos_id=tok.eos_id)
    model = build_model(config, seed=0)
    if (checkpoint / STATE_DIR / ".metadata").is_file():
        load_model_weights(checkpoint, model)
    elif (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    else:
        raise FlatlmError(f"{str(checkpoint)!r} holds no model weights")
    return model.eval(), tok, cfg


def export(source: Path, out: Path) -> Path:
    """Write the checkpoint ``source`` names as a Hugging Face model directory ``out``; returns ``out``."""
    from transformers import LlamaTokenizer

    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlatlmError(f"{str(out)!r} exists and is not empty; choose a new directory for the export")
    checkpoint = find_checkpoint(source)
    model, tok, _ = load_checkpoint_model(checkpoint)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(checkpoint.parent.parent / TOKENIZER_FILE, tmp / TOKENIZER_FILE)  # converted from here
    hf_tok = LlamaTokenizer.from_pretrained(
        tmp,
        unk_token=tok.sp.id_to_piece(tok.sp.unk_id()),
        bos_token=tok.sp.id_to_piece(tok.bos_id),
        eos_token=tok.sp.id_to_piece(tok.eos_id),
        add_bos_token=False,  # flatlm trains on documents followed by EOS, with no BOS
        add_eos_token=False,
        legacy=False,  # encodes exactly as sentencepiece does (tested against flatlm's tokenizer)
    )
    hf_tok.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
