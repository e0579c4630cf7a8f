"""The run configuration: one typed tree, YAML files as bases, dotted ``key=value`` overrides.

Each section is a pydantic model whose field docstrings are the documentation (``flatlm train
--help`` prints them). Unknown keys and wrong types are refused with one :class:`FlatlmError`
that names the key, the valid choices and the closest match.

Precedence: defaults < ``--config FILE.yaml`` < command-line overrides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flatlm.errors import FlatlmError, did_you_mean


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    name: str = "tiny"
    """A preset (tiny, llama-60m, llama-125m, llama-350m, llama-1b), an HF config name or a local path."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Fields of the transformers config to override, e.g. model.overrides.num_hidden_layers=2."""
    init_from: str | None = None
    """Start from these weights: a Hugging Face model directory (e.g. from flatlm export) or hub name."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass (saves memory)."""
    compile: bool = False
    """Wrap the model with torch.compile."""


class DataConfig(Section):
    source: Literal["stdlib", "stdlib_docs", "files", "hf"] = "stdlib"
    """stdlib: this Python's own standard-library sources; stdlib_docs: a chat set built from the standard library's
    docstrings ("what does `module.function` do?" -> its docstring's first paragraph; data.format=chat); files:
    data.paths; hf: a datasets dataset."""
    format: Literal["text", "chat"] = "text"
    """text: documents for pretraining (every token counts); chat: conversations for supervised fine-tuning (loss
    on the assistant's tokens only), rows shaped as data.chat_format."""
    chat_format: Literal["auto", "messages", "prompt_response", "alpaca"] = "auto"
    """Shape of a chat row: messages (a list of {role, content}), prompt_response (prompt/response) or alpaca
    (instruction/input/output); auto: detected from each row's keys."""
    chat_template: str | None = None
    """data.format=chat: a Jinja chat template file, or 'builtin'; None: the tokenizer's own template if it has one,
    else flatlm's built-in one. The template used is written to output_dir/chat_template.jinja."""
    packing: bool = True
    """data.format=chat: pack several examples into each data.seq_len sequence, attention confined to each example;
    false: one example per row, padded to the longest in the micro-batch."""
    paths: list[str] = Field(default_factory=list)
    """Files or globs for source=files: .txt (one document per file), .jsonl/.json, .parquet."""

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        """``data.paths=corpus/*.txt`` (no brackets) means a list of one."""
        return [value] if isinstance(value, str | Path) else value

    name: str | None = None
    """Dataset name or local dataset directory for source=hf (datasets.load_dataset's path)."""
    config_name: str | None = None
    """Dataset configuration for source=hf."""
    split: str = "train"
    """Dataset split for source=hf."""
    streaming: bool = False
    """Stream the hf dataset instead of downloading it whole (pair with data.max_documents)."""
    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hf data."""
    max_documents: int | None = Field(default=None, gt=0)
    """Use at most this many documents (after filtering), in source order."""
    seed: int | None = None
    """Seeds the train/validation split and data order apart from the model's init (None: the run's seed), e.g. to
    vary initialisation across an ablation's seeds over one data order."""
    min_chars: int = Field(default=1, ge=0)
    """Drop documents shorter than this many characters."""
    seq_len: int = Field(default=128, gt=0)
    """Tokens per packed training sequence."""
    val_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    """Fraction of documents held out for validation (split by document, from the seed)."""
    vocab_size: int = Field(default=4096, ge=300)
    """Size of the sentencepiece vocabulary trained on the corpus."""
    tokenizer: str | None = None
    """Use this tokenizer instead of training one: a sentencepiece .model file; a flatlm run directory or one of its
    checkpoints (the run's own tokenizer.model or tokenizer/); a flatlm export (its tokenizer.model: the ids the model
    was trained on); or any local Hugging Face tokenizer directory (AutoTokenizer)."""
    tokenizer_sample_lines: int = Field(default=300_000, gt=0)
    """Lines sampled from the training documents to train the tokenizer."""
    cache_dir: str = "~/.cache/flatlm"
    """Where tokenizers and token caches are kept (per node). FLATLM_CACHE overrides the default."""


class AdversarialConfig(Section):
    """Adversarial training on the input embeddings (flatlm.train.adversarial): K projected-gradient ascent steps on
    a perturbation delta of each micro-batch's token embeddings, then the training pass at x + delta."""

    steps: int = Field(default=0, ge=0)
    """K, the ascent steps per micro-batch (each one forward + backward w.r.t. delta only); 0: off (plain training)."""
    epsilon: float = 0.0
    """Radius of the ball delta stays in, per position: ||delta[b, t, :]|| <= epsilon (l2) or |delta| <= epsilon
    (linf). Pick it relative to the embeddings' own norm (about sqrt(d) * 0.02 at transformers' default init)."""
    norm: Literal["l2", "linf"] = "l2"
    """l2: steps along g / ||g|| per position, projected onto the l2 ball; linf: steps along sign(g), clamped."""
    step_size: float | None = Field(default=None, gt=0.0)
    """alpha, the length of one ascent step; None: 2 epsilon / K (K such steps can cross the ball's diameter; Madry
    et al. used 2.5 epsilon / K)."""
    init: Literal["zero", "uniform"] = "zero"
    """delta_0: zero (deterministic on every world size), or uniform in the ball (FreeLB; drawn per rank, step and
    micro-batch from train.adversarial.seed)."""
    objective: Literal["perturbed", "mean"] = "perturbed"
    """perturbed: train on L(x + delta) (Madry et al.); mean: on (L(x) + L(x + delta)) / 2 (one more pass)."""
    seed: int | None = None
    """Seeds the uniform init (None: the run's seed); the draw of each micro-batch comes from (seed, step, rank,
    micro-batch index), so a resume draws what the uninterrupted run would have."""

    @model_validator(mode="after")
    def _on_needs_a_ball(self) -> AdversarialConfig:
        if self.steps > 0 and not self.epsilon > 0:
            raise ValueError(
                f"train.adversarial.steps={self.steps} needs train.adversarial.epsilon > 0 (got {self.epsilon}): "
                "set the radius of the perturbation, e.g. train.adversarial.epsilon=0.01, or steps=0 to turn it off"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    @property
    def alpha(self) -> float:
        """The ascent step length (``step_size``, default 2 epsilon / K)."""
        return self.step_size if self.step_size is not None else 2.0 * self.epsilon / max(self.steps, 1)


class TrainConfig(Section):
    max_steps: int = Field(default=300, gt=0)
    """Optimizer steps to run."""
    global_batch_size: int = Field(default=32, gt=0)
    """Sequences per optimizer step, summed over all processes and accumulation steps."""
    micro_batch_size: int = Field(default=16, gt=0)
    """Sequences per forward/backward on one device; accumulation = global / (micro x world)."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip gradients to this global L2 norm (0 disables clipping; the norm is still logged)."""
    eval_every: int = Field(default=100, ge=0)
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_batches: int = Field(default=8, gt=0)
    """Micro-batches per evaluation."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast (weights and optimizer state stay fp32)."""
    deterministic: bool = True
    """Use deterministic kernels (bit-identical losses for the same config and seed)."""
    progress_bar: bool = True
    """Show loss, lr, tokens/s: a bar on a terminal; with stderr in a file, a line every train.log_interval_s."""
    log_interval_s: float = Field(default=30.0, ge=0.0)
    """Seconds between progress lines when stderr is not a terminal (0: a line every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""
    plot: bool = True
    """Write output_dir/loss.png at the end."""
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig, exclude_if=lambda a: not a.enabled)
    """Adversarial training on the input embeddings (off by default: train.adversarial.steps=0). Written to
    config.yaml only when on, so runs and grids from before it existed keep their identity."""


class OptimConfig(Section):
    name: str = "adamw"
    """Optimizer name (see flatlm.optim.OPTIMIZERS)."""
    lr: float = Field(default=3e-3, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """Decoupled weight decay for matrices; norms, biases and embeddings get none."""
    hparams: dict[str, Any] = Field(default_factory=dict)
    """Further keyword arguments of the optimizer, e.g. optim.hparams.betas=[0.9,0.99]."""


class ScheduleConfig(Section):
    name: str = "cosine"
    """Learning-rate schedule: constant, cosine, linear, wsd or step (flatlm.optim.SCHEDULES)."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warmup from 0 to the peak learning rate over this many steps (ignored when warmup_fraction is set)."""
    warmup_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Warmup as a fraction of train.max_steps (rounded to whole steps), in place of warmup_steps: a schedule that
    fits the run whatever its length."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of the peak (cosine, linear, wsd)."""
    decay_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    """wsd: fraction of the post-warmup steps spent decaying at the end (a fraction of the run: it fits any length)."""
    step_size: int = Field(default=1000, gt=0)
    """step: multiply the learning rate by gamma every step_size steps."""
    gamma: float = Field(default=0.1, gt=0.0)
    """step: the factor applied every step_size steps."""


class CheckpointConfig(Section):
    every: int = Field(default=0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_last: int = Field(default=3, ge=1)
    """Keep this many newest checkpoints."""
    load_optimizer: bool = True
    """On resume, load the optimizer state too; false resumes weights, step and schedule only (switch optimizer)."""


BACKENDS = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
Backend = Literal["single", "ddp", "fsdp2", "zero1", "zero2", "zero3"]


class ParallelConfig(Section):
    backend: Backend = "single"
    """single, ddp, fsdp2, zero1, zero2 or zero3; an accelerate launcher's FSDP/DeepSpeed config overrides it."""
    shard_optimizer_state: bool = False
    """ddp only: shard optimizer state ZeRO-1 style (each rank steps the parameters it owns, then broadcasts)."""
    reshard_after_forward: bool = True
    """fsdp2: free the gathered parameters after forward (re-gathered in backward; less memory, more traffic)."""
    world_size: int = Field(default=1, ge=1)
    """Processes the run used: written to config.yaml by flatlm (the launcher decides it; not an input)."""
    timeout_s: float = Field(default=600.0, gt=0)
    """Seconds any collective may wait for the other ranks (the process group's timeout: steps, set-up, evaluation,
    checkpoint saves) and a step may last, before the job ends with a message naming the step. Keep it above the
    slowest step and save; building a token cache is not bounded by it. One rank's error ends every rank within
    seconds whatever its value."""


class SamConfig(Section):
    perturbation: Literal["global", "replica"] = "global"
    """SAM family: eps from the global-batch gradient (global) or from each rank's own (replica, m-sharpness)."""


class RunConfig(Section):
    output_dir: str = "runs/default"
    """Directory for config.yaml, metrics.jsonl, TensorBoard, plots and checkpoints."""
    seed: int = 0
    """Seeds model init, and the train/validation split and data order unless data.seed is set."""
    overwrite: bool = False
    """Allow reusing an output_dir that holds a different run (its outputs are replaced)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    sam: SamConfig = Field(default_factory=SamConfig)

    @model_validator(mode="after")
    def _source_has_its_input(self) -> RunConfig:
        """Checked with the config, before any data is read: each source needs its own keys."""
        if self.data.source == "files" and not self.data.paths:
            raise ValueError("data.source=files needs data.paths, e.g. data.paths='[corpus/*.txt]'")
        if self.data.source == "hf" and not self.data.name:
            raise ValueError("data.source=hf needs data.name (a dataset name or a local dataset directory)")
        if self.data.source == "stdlib_docs" and self.data.format != "chat":
            raise ValueError("data.source=stdlib_docs is a chat set; set data.format=chat")
        if self.data.format == "chat" and self.data.source == "stdlib":
            raise ValueError(
                "data.format=chat needs chat rows: data.source=stdlib_docs, or files / hf data with messages, "
                "prompt/response or instruction/input/output fields"
            )
        return self


# Keys that may change between invocations on one output_dir without making it a different run.
NOT_RUN_IDENTITY = (
    "overwrite",
    "output_dir",  # a run directory that was moved or copied is still that run
    "parallel.",  # the same math on every backend and world size: a checkpoint resumes on any of them
    "train.max_steps",
    "train.eval_every",
    "train.eval_batches",
    "train.progress_bar",
    "train.log_interval_s",
    "train.tensorboard",
    "train.plot",
    "checkpoint.every",
    "checkpoint.keep_last",
    "data.cache_dir",
)


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``dotted.key=value`` overrides; validated."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        tree = _read_yaml(Path(config_file))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return validate(tree)


def validate(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise FlatlmError(_explain(exc, tree)) from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: RunConfig | dict[str, Any]) -> str:
    tree = to_dict(cfg) if isinstance(cfg, RunConfig) else cfg
    return yaml.safe_dump(tree, sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (free-form dicts are flattened too)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def run_identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring NOT_RUN_IDENTITY (and the optimizer's
    keys when the new config resumes without its state: ``checkpoint.load_optimizer=false``)."""
    a, b = flatten(old), flatten(new)
    ignored = (*NOT_RUN_IDENTITY, "checkpoint.load_optimizer")
    if b.get("checkpoint.load_optimizer") is False:
        ignored += ("optim.", "sam.")
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(ignored)]


def describe_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, docstring) for every leaf key: the text behind ``flatlm train --help``."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_keys(annotation, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", repr(default), field.description or ""))
    return rows


# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-8`` as a string, since its floats need a dot; YAML 1.2 and every user mean a
    number. Typed keys are coerced by pydantic anyway, free-form ones (``optim.hparams.eps=1e-8``) are not."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        inside = f" (it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
        raise FlatlmError(f"--config {str(path)!r} is a directory; pass a YAML file{inside}")
    if not path.is_file():
        raise FlatlmError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
    try:
        tree = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FlatlmError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise FlatlmError(f"config file {str(path)!r} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise FlatlmError(f"override {item!r} is not of the form dotted.key=value (e.g. train.max_steps=30)")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise FlatlmError(f"cannot set {key!r}: {where!r} is a value, not a section")
        node = child
    node[leaf] = value


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _explain(exc: ValidationError, tree: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):  # a check across keys says it all
            lines.append(str(err["ctx"]["error"]))
        elif err["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            valid = sorted(section.model_fields) if section else []
            where = ".".join(str(p) for p in loc[:-1])
            prefix = f"{where}." if where else ""
            hint = did_you_mean(str(loc[-1]), valid)
            lines.append(
                f"unknown config key {key!r}{hint}; valid keys"
                f"{' under ' + repr(where) if where else ''}: {', '.join(prefix + v for v in valid)}"
            )
        else:
            lines.append(f"invalid value for {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
