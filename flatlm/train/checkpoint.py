"""Checkpoints under ``output_dir/checkpoints/step-N/``, written sharded by every rank, and resuming from them.

Layout of one checkpoint (single process, DDP and FSDP2):

    state/              torch.distributed.checkpoint: {"model": ..., "optim": ...} keyed by parameter name
                        (``get_state_dict``); each rank writes its own shards, DTensors reshard on load
    rng-rank<R>.json    python, numpy and torch RNG states of rank R
    trainer_state.json  step, tokens, scheduler, backend and world size (written last: marks it complete)
    config.yaml         the resolved config

DeepSpeed ZeRO runs write DeepSpeed's engine checkpoint (``deepspeed/``, resumable with the same stage and number
of processes) and ``model.safetensors`` (the whole model, rank 0) instead of ``state/``.

The seam with the backends (``flatlm.parallel.backend.Parallel``): a backend only describes its format
(``checkpoint_format``: "dcp", the state dicts of ``checkpoint_state`` / ``load_state``; or "engine", a directory it
writes and reads itself, ``save_engine`` / ``engine_pickles`` / ``load_engine``) and never imports this module.
Everything else is here: the directory layout, the trainer state, RNG files, the weights-only checks, which
backend and world size may resume what, and the ranks' agreement.

Resuming (``agreed_candidates`` then ``resume``, called by the loop): rank 0 lists the resumable checkpoints and
broadcasts the list; every rank loads the first, and all confirm with one exchange of their errors; if any rank
failed, all fall back together to the next one on rank 0's list.

Atomicity: everything goes into ``.step-N.tmp``; rank 0 renames it into place once every rank has written its
part, then replaces the ``latest`` file (a rename too), then deletes checkpoints beyond ``keep_last``. The ranks
agree on each phase's success with one exchange of their errors (never a bare barrier a failed rank would not
reach), so a failure on one rank fails the save on all of them at once, with the same one-line error. A crash at
any point leaves ``latest`` naming a complete checkpoint (or none). Loading reads tensors through DCP (torch's
weights-only unpickler), DCP's ``.metadata`` through an unpickler that allows only DCP's own metadata classes,
everything else from JSON: no pickled code is ever executed. A checkpoint that cannot be read is described in one
line (``unreadable_reason``: the missing or truncated file, else the original error).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from flatlm.errors import FlatlmError
from flatlm.parallel.collectives import all_gather_object, broadcast_object, initialized, world
from flatlm.parallel.deepspeed import ENGINE_DIR

if TYPE_CHECKING:
    from flatlm.parallel.backend import Parallel

log = logging.getLogger("flatlm")

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` (a pickle) allowing only the classes DCP writes there: a checkpoint can
    never make loading run code (the tensor files themselves go through torch's weights-only unpickler)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise UnsafeCheckpointError(
                f"the checkpoint's metadata asks to load {module}.{name}, which a DCP checkpoint never contains; "
                "refusing to unpickle it (it could run code)"
            )
        return super().find_class(module, name)


class UnsafeCheckpointError(FlatlmError):
    """A checkpoint file that would need arbitrary code to load."""


def _safe_reader(path: Path) -> Any:
    """A DCP FileSystemReader whose metadata goes through ``_MetadataUnpickler``."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def _distributed() -> bool:
    return initialized()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as JSON-able values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else x for x in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(
    output_dir: Path,
    step: int,
    state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    *,
    rank: int = 0,
    legacy_files: dict[str, Any] | None = None,
    save_engine: Callable[[Path], None] | None = None,
) -> Path:
    """Write step ``step``; every rank calls this.

    ``state``: the DCP state ({"model": ..., "optim": ...}, collective save), or None for DeepSpeed runs, whose
    ``legacy_files`` ({file name: tensors}) each rank writes with safetensors / torch.save.

    A failure on any rank (disk full on one node, an exception) fails the save on every rank with the same
    one-line error: the ranks agree on success with one ``all_gather_object`` of their errors after each phase
    (create the directory, write the parts, rename), never a bare barrier that a failed rank would never reach.
    The temporary directory is removed, the previous checkpoints and ``latest`` are untouched.
    """
    root = output_dir / CHECKPOINT_DIR
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"

    def fail(failures: list[tuple[int, str]]) -> FlatlmError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        messages = list(dict.fromkeys(msg for _, msg in failures))
        if len(messages) == 1 and (len(failures) > 1 or not _distributed()):
            where = messages[0]  # one error every rank saw (DCP agrees on its own failures)
        else:
            where = "; ".join(f"rank {r}: {msg}" for r, msg in failures)
        return FlatlmError(
            f"saving checkpoint step-{step} into {root} failed ({where}); the previous checkpoints and "
            f"{LATEST} are intact; free space or fix permissions and rerun to resume"
        )

    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            error = describe_error(exc)
    if failures := agree_on_errors(error):
        raise fail(failures)
    try:
        _write_parts(tmp, state, legacy_files, save_engine, rank)
    except (Exception, CheckpointException) as exc:  # any failure: every rank must hear of it
        error = describe_error(exc)
    if failures := agree_on_errors(error):
        raise fail(failures)
    old = root / f".step-{step}.old"
    if rank == 0:
        try:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
            if final.exists():  # the same step saved again: swap (a kill in between: recover_interrupted_swap)
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            write_text_atomic(root / LATEST, final.name + "\n")
        except OSError as exc:
            error = describe_error(exc)
    if failures := agree_on_errors(error):
        raise fail(failures)
    if rank == 0:  # saved, and latest names it: what remains is clean-up, whose failure loses nothing
        try:
            shutil.rmtree(old, ignore_errors=True)
            _rotate(root, keep_last, step)
        except OSError as exc:
            log.warning(
                f"checkpoint step-{step} is saved, but removing older checkpoints failed ({describe_error(exc)})"
            )
    return final


def agree_on_errors(error: Any) -> list[tuple[int, Any]]:
    """Every rank's error of the phase just done, as (rank, message); empty when all succeeded. Collective: the
    one exchange every rank reaches whether or not its own part failed."""
    return [(r, e) for r, e in enumerate(all_gather_object(error)) if e]


def describe_error(exc: BaseException) -> str:
    """One line for an exception: ``Type: message`` (the first line only); for DCP's ``CheckpointException``,
    the original error of the first rank that failed, not its text of tracebacks."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, failure = min(exc.failures.items())
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"{describe_error(inner)} (rank {rank})" if _distributed() else describe_error(inner)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _write_parts(
    tmp: Path,
    state: dict[str, Any] | None,
    legacy_files: dict[str, Any] | None,
    save_engine: Callable[[Path], None] | None,
    rank: int,
) -> None:
    """This rank's part of a checkpoint: the backend's own files, the DCP shards, extra files, RNG states."""
    import torch.distributed.checkpoint as dcp

    if save_engine is not None:
        save_engine(tmp)
    if state is not None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not _distributed())
    for name, value in (legacy_files or {}).items():
        if name.endswith(".safetensors"):
            save_file({k: v.detach().contiguous().clone() for k, v in value.items()}, tmp / name)
        else:
            torch.save(value, tmp / name)
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with their trainer state), oldest first."""
    root = output_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints a rerun may resume from, best first: the one ``latest`` names, then the other complete ones
    (DCP format), newest first; the loop falls back along this list when one cannot be read."""
    root = output_dir / CHECKPOINT_DIR
    candidates = list(reversed(list_checkpoints(output_dir)))
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return [path for path in candidates if (path / STATE_DIR / ".metadata").is_file() or (path / ENGINE_DIR).is_dir()]


def check_weights_only(files: list[Path], allowed: list[type] | None = None) -> None:
    """Refuse files that need more than tensors, plain containers and the ``allowed`` plain data classes (an
    engine's own, ``Parallel.engine_pickles``) to unpickle: anything else could run code."""
    allowed = list(allowed or [])
    for path in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path} needs more than tensors to load ({str(exc).splitlines()[0][:200]}); refusing to unpickle it"
            ) from None


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model's weights of checkpoint ``path`` into ``model`` (resharded to its layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_safe_reader(path / STATE_DIR), no_dist=not _distributed())
    set_model_state_dict(model, state["model"])


def load_checkpoint(
    path: Path, parallel: Parallel, optimizer: torch.optim.Optimizer, load_optimizer: bool = True
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``parallel``'s model and (unless ``load_optimizer`` is False) ``optimizer``,
    and this rank's RNG states; returns the trainer state (step, tokens, scheduler). Collective.

    ``parallel`` (a ``flatlm.parallel.backend.Parallel``) says how its state is stored (``checkpoint_format``):
    "dcp": its ``checkpoint_state`` is read back by name with DCP (resharded to this run's layout) and handed to
    its ``load_state``; "engine": its own directory, which only the same backend and world size resume, after its
    pickled files pass the weights-only check. The trainer state, RNG files and safety checks are read here."""
    state = json.loads((path / TRAINER_STATE).read_text())
    rank, world_size = world()
    if parallel.checkpoint_format == "engine":
        if (state.get("backend"), state.get("world_size")) != (parallel.backend, world_size):
            raise FlatlmError(
                f"{path} was written by {state.get('backend')} with {state.get('world_size')} processes; a DeepSpeed "
                f"checkpoint resumes only with the same ZeRO stage and number of processes ({parallel.backend} x "
                f"{world_size} here)"
            )
        check_rng_files(path, world_size)
        files, allowed = parallel.engine_pickles(path)
        check_weights_only(files, allowed)
        parallel.load_engine(path, load_optimizer)
        restore_rng(path, rank)
        return state
    if load_optimizer:
        check_rng_files(path, world_size)
    import torch.distributed.checkpoint as dcp

    sd = parallel.checkpoint_state(optimizer, with_optimizer=load_optimizer)  # what this rank holds: DCP reads these
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, storage_reader=_safe_reader(path / STATE_DIR), no_dist=not _distributed())
    parallel.load_state(optimizer, sd)
    if load_optimizer:
        restore_rng(path, rank)
    return state


@dataclass(frozen=True)
class Resumed:
    """The checkpoint every rank loaded, and its trainer state."""

    path: Path
    trainer_state: dict[str, Any]


def agreed_candidates(output_dir: Path) -> list[Path]:
    """Rank 0's ``resumable_checkpoints``, the same list on every rank (one broadcast): the ranks never walk the
    directory each on their own (a file another rank's save or clean-up touches in between would split them)."""
    return broadcast_object(resumable_checkpoints(output_dir) if world()[0] == 0 else None, src=0)


def resume(
    candidates: list[Path], parallel: Parallel, optimizer: torch.optim.Optimizer, load_optimizer: bool = True
) -> Resumed | None:
    """Load the first of ``candidates`` (rank 0's list, ``agreed_candidates``) that every rank can read; None for
    an empty list. Collective.

    Each rank loads the candidate, then all confirm with one exchange of their errors; a failure on any rank (a
    corrupt or partial file, one rank's unreadable RNG file, an unsafe pickle) is one warning line, and all ranks
    fall back together to the next one (one rank loading an older checkpoint, a collective, while the others train
    on would hang them). A request flatlm refuses (``FlatlmError``, e.g. another backend's engine checkpoint) is
    raised on every rank after the same exchange, also when only one rank refused. None readable: one error naming
    each checkpoint's reason."""
    unreadable = []
    for i, candidate in enumerate(candidates):
        error: tuple[str, str] | None = None
        try:
            trainer_state = load_checkpoint(candidate, parallel, optimizer, load_optimizer)
        except (Exception, CheckpointException) as exc:  # corrupt, partial or unsafe: say so in one line, go back
            refused = isinstance(exc, FlatlmError) and not isinstance(exc, UnsafeCheckpointError)
            error = ("refused", str(exc)) if refused else ("unreadable", unreadable_reason(candidate, exc))
        outcomes = agree_on_errors(error)  # every rank reaches this exchange, whatever its own load did
        refusals = [msg for _, (kind, msg) in outcomes if kind == "refused"]
        if refusals:  # a refusal on any rank (even one alone: DeepSpeed decides per rank) stops every rank
            raise FlatlmError(refusals[0])
        failures = [(r, msg) for r, (_, msg) in outcomes]
        if not failures:
            return Resumed(candidate, trainer_state)
        reasons = list(dict.fromkeys(msg for _, msg in failures))
        reason = (
            reasons[0]
            if len(reasons) == 1 and len(failures) == world()[1]
            else "; ".join(f"rank {r}: {msg}" for r, msg in failures)
        )
        unreadable.append(f"{candidate.name}: {reason}")
        then = f"trying {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older one"
        log.warning(f"cannot resume from {candidate} ({reason}); {then}")
    if candidates:
        raise FlatlmError(
            f"no checkpoint in {candidates[0].parent} can be read ({'; '.join(unreadable)}); "
            "pass overwrite=true to start the run over"
        )
    return None


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why checkpoint ``path`` could not be loaded, in one line: the file that is missing or shorter than its
    metadata says (what a full disk or a killed copy leaves), else the error itself (``describe_error``)."""
    metadata_file = path / STATE_DIR / ".metadata"
    if isinstance(exc, UnsafeCheckpointError):
        return str(exc)
    try:
        with metadata_file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            name = str(info.relative_path)
            needed[name] = max(needed.get(name, 0), info.offset + info.length)
    except Exception:  # no usable metadata: report the load's own error
        needed = {}
    for name, size in sorted(needed.items()):
        file = path / STATE_DIR / name
        if not file.is_file():
            return f"{STATE_DIR}/{name} is missing"
        if file.stat().st_size < size:
            return f"{STATE_DIR}/{name} is truncated ({file.stat().st_size:,} of {size:,} bytes)"
    for name in (TRAINER_STATE,):
        if not (path / name).is_file():
            return f"{name} is missing"
    return describe_error(exc)


def check_rng_files(path: Path, world_size: int) -> None:
    """Refuse a checkpoint that lacks the RNG file of a rank that wrote it (ranks beyond the writers' number keep
    their seeded state). Every rank checks every file, so all ranks take the same decision (a fallback that some
    ranks took and others not would leave them in different collectives)."""
    saved = json.loads((path / TRAINER_STATE).read_text()).get("world_size", 1)
    for r in range(min(saved, world_size)):
        if not (path / f"rng-rank{r}.json").is_file():
            raise FileNotFoundError(f"rng-rank{r}.json is missing")


def restore_rng(path: Path, rank: int) -> None:
    rng = path / f"rng-rank{rank}.json"
    if rng.is_file():  # a checkpoint written with fewer ranks has none for this one: keep the seeded state
        set_rng_state(json.loads(rng.read_text()))


def remove_partial_saves(output_dir: Path) -> list[str]:
    """Delete what a save killed midway left behind (``.step-N.tmp`` / ``.step-N.old``); returns their names."""
    root = output_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.name.startswith(".step-") and p.name.endswith((".tmp", ".old"))]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in partial)


def _rotate(root: Path, keep_last: int, step: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step`` (the one just saved). Newer ones are left alone:
    they are a timeline a resume fell back from, and deleting by step number alone would delete ``step`` itself."""
    upto = [p for p in list_checkpoints(root.parent) if int(p.name.split("-")[1]) <= step]
    for path in upto[:-keep_last]:
        shutil.rmtree(path)


def recover_interrupted_swap(output_dir: Path) -> str | None:
    """A save of a step that already had a checkpoint renames ``step-N`` to ``.step-N.old``, then ``.step-N.tmp`` to
    ``step-N``: a kill between the two leaves ``latest`` naming a missing ``step-N`` with two complete copies beside
    it. Put the newer complete one back (rank 0, before the checkpoints are listed); returns its name, if any."""
    root = output_dir / CHECKPOINT_DIR
    latest = root / LATEST
    if not latest.is_file():
        return None
    final = root / latest.read_text().strip()
    if not _STEP_DIR.match(final.name) or final.exists():
        return None
    for suffix in (".tmp", ".old"):  # .tmp holds the new copy; its trainer state is written once every rank agreed
        copy = root / f".{final.name}{suffix}"
        if (copy / TRAINER_STATE).is_file():
            os.rename(copy, final)
            return copy.name
    return None
