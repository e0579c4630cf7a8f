"""``flatlm export RUN_DIR_OR_CHECKPOINT OUT_DIR``: a (sharded) checkpoint as a Hugging Face model directory.

The checkpoint's model state is consolidated in one process (DCP reshards whatever the run used: one process,
DDP, FSDP2; DeepSpeed runs' ``model.safetensors`` is read directly) into the model its ``config.yaml``
describes, then written with ``save_pretrained`` (config.json + safetensors) beside the run's tokenizer: a
sentencepiece one as a ``LlamaTokenizer`` (``tokenizer.model`` + configs), a Hugging Face one (``tokenizer/``) as
it is (its ``save_pretrained``), each with a fine-tuning run's ``chat_template.jinja`` as its chat template,
so ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained(OUT_DIR)`` load it.
``init_weights_from`` reads the same consolidated weights for ``model.init_from`` of a run or checkpoint. Written
into a temporary directory and renamed: an existing OUT_DIR is never overwritten. Every file gets the mode the
user's umask gives new files (safetensors writes 0600 on its own), and the libraries' progress bars and
DeepSpeed's accelerator warning (transformers imports DeepSpeed to check for it) stay out of the user's terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from flatlm.config import RunConfig
from flatlm.data.hf_tokenizer import HFTokenizer
from flatlm.data.tokenizer import (
    EXPORT_MARKER,
    HF_FILES,
    RUN_CONFIG,
    AnyTokenizer,
    Tokenizer,
    encoding_sha256,
    load_tokenizer,
    run_tokenizer_path,
    with_run_chat_template,
)
from flatlm.errors import FlatlmError
from flatlm.models import build_model, load_pretrained_weights, model_config
from flatlm.models.build import copy_weights
from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST, STATE_DIR, TRAINER_STATE, load_model_weights
from flatlm.train.rundir import TOKENIZER_FILE


def find_checkpoint(source: Path) -> Path:
    """The checkpoint ``source`` names: a checkpoint directory, or a run directory (its ``latest``)."""
    source = source.expanduser()
    if not source.exists():
        raise FlatlmError(
            f"{str(source)!r} does not exist; pass a run directory (flatlm train's output_dir) or one of its "
            "checkpoints/step-N directories"
        )
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


def load_checkpoint_model(checkpoint: Path) -> tuple[torch.nn.Module, AnyTokenizer, RunConfig]:
    """The model of ``checkpoint`` with its weights, in one process, with the run's tokenizer and config."""
    run_dir = checkpoint.parent.parent
    cfg = RunConfig.model_validate(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    tokenizer_path = run_tokenizer_path(run_dir)
    if not tokenizer_path.exists():
        raise FlatlmError(
            f"{str(run_dir)!r} has no {TOKENIZER_FILE} or tokenizer/ (written by flatlm train); cannot read its model"
        )
    tok = load_tokenizer(tokenizer_path)
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
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlatlmError(f"{str(out)!r} exists and is not empty; choose a new directory for the export")
    checkpoint = find_checkpoint(source)
    model, tok, _ = load_checkpoint_model(checkpoint)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_libraries():
        model.save_pretrained(tmp, safe_serialization=True)
    run_dir = checkpoint.parent.parent
    tok = with_run_chat_template(tok, run_dir)  # a fine-tuning run's template, not the one its tokenizer shipped
    if isinstance(tok, HFTokenizer):  # the tokenizer the run was given (data.tokenizer=DIR), with that template
        tok.hf.save_pretrained(tmp)
    else:
        _save_as_llama_tokenizer(tok, run_dir / TOKENIZER_FILE, tmp, tok.chat_template)
    mode = 0o666 & ~_umask()  # what open() gives a new file here
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(mode)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def init_weights_from(model: torch.nn.Module, path: str) -> None:
    """``model.init_from=path``: the weights of a flatlm run directory (its latest checkpoint) or checkpoint
    directory, consolidated as ``export`` does, else of a Hugging Face model directory (or Hub id); every tensor of
    ``model`` must be there with its shape."""
    source = Path(path).expanduser()
    hub_id = len(source.parts) == 2 and not source.is_absolute() and not source.parent.exists()  # org/name
    if not source.exists() and not hub_id:
        raise FlatlmError(
            f"model.init_from={path!r} does not exist; pass a flatlm run directory (flatlm train writes runs/default "
            "unless output_dir says otherwise), one of its checkpoints/step-N, or a Hugging Face model directory"
        )
    if not (
        (source / RUN_CONFIG).is_file() or (source / CHECKPOINT_DIR).is_dir() or (source / TRAINER_STATE).is_file()
    ):
        load_pretrained_weights(model, path)
        return
    checkpoint = find_checkpoint(source)
    trained, _, cfg = load_checkpoint_model(checkpoint)
    fix = f"the run's model.name={cfg.model.name} (and its model.overrides) with data.tokenizer={path}"
    copy_weights(model, trained.state_dict(), path, fix=fix)


def is_flatlm_source(source: Path) -> bool:
    """Whether ``source`` is a flatlm run directory, one of its checkpoints, or a flatlm export of a sentencepiece
    run: a model whose embedding rows are the ids of a tokenizer flatlm knows (``load_tokenizer(source)``)."""
    marks = ((RUN_CONFIG, "file"), (CHECKPOINT_DIR, "dir"), (TRAINER_STATE, "file"), (EXPORT_MARKER, "file"))
    return any((source / name).is_file() if kind == "file" else (source / name).is_dir() for name, kind in marks)


def check_init_from_tokenizer(cfg: RunConfig) -> str | None:
    """Refuse a ``model.init_from`` whose embedding the data's ids would not mean, before any data are read; returns a
    warning (or None) for a Hugging Face model directory, whose user may know better.

    A flatlm run, checkpoint or export was trained on its own tokenizer's ids: without ``data.tokenizer`` the data
    would get a newly trained tokenizer (another id mapping, silently), and another ``data.tokenizer`` renumbers the
    text too. Tokenizers are compared by the ids they give (``encoding_sha256``: not their chat templates)."""
    path = cfg.model.init_from
    if not path:
        return None
    source = Path(path).expanduser()
    if not source.is_dir():
        return None  # missing (init_weights_from says so) or a Hub id: nothing to compare here
    given = cfg.data.tokenizer
    if is_flatlm_source(source):
        if not given:
            raise FlatlmError(
                f"model.init_from={path} is a flatlm run: set data.tokenizer={path} (its tokenizer), the ids its "
                "embedding was trained on"
            )
        try:
            own = load_tokenizer(source)
        except FlatlmError:
            return None  # a run without its tokenizer: init_weights_from names what is missing
        data_tok = load_tokenizer(given)
        if encoding_sha256(own) != encoding_sha256(data_tok):
            raise FlatlmError(
                f"data.tokenizer={given} (sha256 {encoding_sha256(data_tok)[:12]}) is not the tokenizer of "
                f"model.init_from={path} (sha256 {encoding_sha256(own)[:12]}), whose ids its embedding was trained on; "
                f"set data.tokenizer={path}"
            )
        return None
    if not any((source / name).is_file() for name in HF_FILES):
        return None  # weights without a tokenizer: nothing to compare with
    if not given:
        return (
            f"data.tokenizer is not set: the data get a new tokenizer, not the one model.init_from={path} was "
            f"trained with; set data.tokenizer={path} unless that is what you want"
        )
    try:
        own, data_tok = load_tokenizer(source), load_tokenizer(given)
    except FlatlmError:
        return None  # the data's loading names an unreadable data.tokenizer
    if encoding_sha256(own) != encoding_sha256(data_tok):
        return (
            f"data.tokenizer={given} gives other ids than the tokenizer of model.init_from={path}; its embedding "
            f"rows will mean other text (set data.tokenizer={path} unless that is what you want)"
        )
    return None


def _save_as_llama_tokenizer(tok: Tokenizer, model_file: Path, out: Path, chat_template: str | None) -> None:
    """A sentencepiece run's ``tokenizer.model`` as a ``LlamaTokenizer`` directory (with a fine-tuning run's chat
    template), and the marker that makes flatlm read the ``tokenizer.model`` itself back (``load_tokenizer``)."""
    from transformers import LlamaTokenizer

    shutil.copy(model_file, out / TOKENIZER_FILE)  # converted from here
    hf_tok = LlamaTokenizer.from_pretrained(
        out,
        unk_token=tok.sp.id_to_piece(tok.sp.unk_id()),
        bos_token=tok.sp.id_to_piece(tok.bos_id),
        eos_token=tok.sp.id_to_piece(tok.eos_id),
        add_bos_token=False,  # flatlm trains on documents followed by EOS, with no BOS
        add_eos_token=False,
        legacy=False,  # encodes as sentencepiece does, except text that begins with a space or a newline
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(out)
    marker = {"tokenizer": TOKENIZER_FILE, "why": "the sentencepiece model this model was trained with"}
    (out / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """transformers' "Writing model shards" bar off, and DeepSpeed (which ``save_pretrained`` imports through
    accelerate to check for its engine) told the accelerator it would pick itself on a machine without CUDA,
    so it does not warn "Setting accelerator to CPU" on every export."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    set_accelerator = "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
    if set_accelerator:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        if set_accelerator:
            os.environ.pop("DS_ACCELERATOR", None)
        if bars:
            hf_logging.enable_progress_bar()
