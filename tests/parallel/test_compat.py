"""What may run where comes from declared properties (flatlm.parallel.compat), not from name lists.

One table over every registered SAM-family optimizer x every backend x both perturbations: each pair either
passes ``check_parallel`` (from the config alone) or raises the one FlatlmError whose text names the clash, and
the expected outcome is written out here independently of compat.py (so a wrong property shows as a wrong row).
Then the decision is shown to follow the properties: a variant class with one property flipped, or a backend
class with one capability flipped, changes the outcome.
"""

from __future__ import annotations

import pytest

from flatlm.config import RunConfig, load_config
from flatlm.errors import FlatlmError
from flatlm.optim.registry import OPTIMIZERS
from flatlm.optim.sam import SAM
from flatlm.parallel import compat
from flatlm.parallel.compat import BACKENDS, check_pair, check_parallel, refusal

VARIANTS = [name for name, spec in OPTIMIZERS.items() if spec.wrapper]
FINAL_FROM_PASS1 = {"ssam", "gsam", "looksam"}  # final gradient uses this rank's pass 1 (or keeps state from it)

# The table: what must be refused and the words the error must hold (None: it runs).
REASONS = {
    "whole": "shards the weights",
    "replica_layout": "runs sam, asam, esam",
    "pieces": "flat partitions holding pieces of many parameters",
}


def expected(name: str, backend: str, perturbation: str) -> str | None:
    zero = backend.startswith("zero")
    if perturbation == "replica":
        if backend == "zero3":
            return REASONS["whole"]
        if name in FINAL_FROM_PASS1 and (backend == "fsdp2" or zero):
            return REASONS["replica_layout"]
        return None
    if name == "esam" and zero:
        return REASONS["pieces"]
    return None


def _cfg(name: str, backend: str, perturbation: str) -> RunConfig:
    return load_config(None, [f"optim.name={name}", f"parallel.backend={backend}", f"sam.perturbation={perturbation}"])


TABLE = [(n, b, p) for n in VARIANTS for b in BACKENDS for p in ("global", "replica")]


def test_table_covers_every_variant_and_backend() -> None:
    assert set(VARIANTS) == {"sam", "asam", "ssam", "gsam", "looksam", "esam"}
    assert set(BACKENDS) == {"single", "ddp", "fsdp2", "zero1", "zero2", "zero3"}


@pytest.mark.parametrize(("name", "backend", "perturbation"), TABLE, ids=["-".join(t) for t in TABLE])
def test_every_pair_runs_or_is_refused_once(name: str, backend: str, perturbation: str) -> None:
    want = expected(name, backend, perturbation)
    if want is None:
        check_parallel(_cfg(name, backend, perturbation))
        return
    with pytest.raises(FlatlmError) as info:
        check_parallel(_cfg(name, backend, perturbation))
    message = str(info.value)
    assert want in message, message
    assert "\n" not in message  # one line ...
    assert "use " in message or " with " in message  # ... that says what to do instead


def test_non_sam_optimizer_with_replica_on_sharded_weights_is_refused() -> None:
    with pytest.raises(FlatlmError, match="zero3 shards the weights"):
        check_parallel(_cfg("adamw", "zero3", "replica"))
    check_parallel(_cfg("adamw", "zero2", "replica"))


class _Variant(SAM):
    """A SAM-family class whose properties a test flips."""


@pytest.fixture
def variant() -> type[SAM]:
    return type("Probe", (_Variant,), {})


def test_decision_follows_variant_properties(variant: type[SAM]) -> None:
    zero2, fsdp2 = BACKENDS["zero2"], BACKENDS["fsdp2"]
    assert refusal(variant, zero2, "global") is None
    variant.selects_tensors = True  # like ESAM: now refused where tensors are partitions
    assert refusal(variant, zero2, "global") == "tensors_are_parameters"
    assert refusal(variant, fsdp2, "global") is None
    variant.selects_tensors = False
    assert refusal(variant, fsdp2, "replica") is None
    variant.keeps_state = True  # state built from pass 1: refused under replica where the step reads shards
    assert refusal(variant, fsdp2, "replica") == "replica_grads_like_first_pass"
    assert refusal(variant, BACKENDS["ddp"], "replica") is None
    with pytest.raises(FlatlmError, match="sam.perturbation=replica under fsdp2 runs"):
        check_pair("probe", variant, "fsdp2", "replica")


def test_decision_follows_backend_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    from flatlm.optim.esam import ESAM
    from flatlm.optim.gsam import GSAM

    backend = type("ProbeBackend", (BACKENDS["zero2"],), {})
    monkeypatch.setitem(compat.BACKENDS, "probe", backend)
    assert refusal(ESAM, backend, "global") == "tensors_are_parameters"
    backend.tensors_are_parameters = True
    assert refusal(ESAM, backend, "global") is None
    assert refusal(GSAM, backend, "global") is None
    assert refusal(GSAM, backend, "replica") == "replica_grads_like_first_pass"
    backend.replica_grads_like_first_pass = True
    assert refusal(GSAM, backend, "replica") is None
    backend.whole_weights = False
    assert refusal(GSAM, backend, "replica") == "whole_weights"
