"""Two nodes simulated on one machine: a launcher per "node" with ``configs/accelerate/multinode/<backend>.yaml``,
``--num_machines 2 --machine_rank 0|1``, rendezvous on 127.0.0.1, CPU gloo processes. Each node has a token cache
directory of its own (``FLATLM_CACHE``, as separate machines have) unless a test shares one (a shared file system);
``output_dir`` is the same for both (a shared file system).

* ddp, fsdp2, zero2, one process per node: losses and gradient norms per step, and every weight and optimizer-state
  tensor at step 4, equal the single-node run with 2 processes (``configs/accelerate/<backend>.yaml``) bit for bit.
  The same ranks do the same math in the same order (a gloo all-reduce of two ranks over TCP is the one sum whether
  the peers share a machine or not), so the comparison allows no difference (measured: 0.0 for all three).
  fsdp2 then resumes on one node with 2 processes from the two-node step-4 checkpoint (each node's rank wrote its own
  shards into the shared directory) and steps 5-6 equal the uninterrupted run bit for bit too.
* zero1 on 2 nodes x 2 processes (world size 4, micro-batches of 2: the same global batch of 8) and zero3 on 2 x 1,
  against the zero2 reference: other reduction orders and partitions, so rounding differs. Measured, each difference
  scaled by max(1, |reference value|): zero1 x 4 at most 8.9e-8 in a loss, 8.1e-8 in a gradient norm and 1.4e-6 in a
  state tensor; zero3 x 2 0, 8.1e-8 and 8.9e-7. ``TOL`` is 1e-5, about seven times the largest. The planted bug, one
  process with a learning rate 1% higher, differs by 1.1e-3 (loss), 1.4e-3 (gradient norm) and 2.4e-3 (state): far
  beyond ``TOL``. Both zero runs' states also differ from the reference by more than 0: the bit-for-bit comparisons
  above tell rounding apart, so they are not vacuous.
* Who builds the caches (``_record_builds``, a probe wrapped around each worker): with a cache per node, each node's
  local rank 0 builds its own once, the tokenizer and the token cache (on node 1 that is global rank 1, or 2 with two
  processes per node), and no other rank builds; with one cache shared by both nodes, both local ranks 0 race for it
  and exactly one build happens (the cache's file lock; the loser reads the winner's cache).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flatlm.config import OptimConfig, load_config
from flatlm.train.checkpoint import CHECKPOINT_DIR, TRAINER_STATE
from flatlm.train.inspect import final_state
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides
from tests.launch.jobs import Job, run_args, start, start_nodes

PROBE = "tests.launch.test_multinode"  # this module as the workers' entry point: tests.launch.faulty plus the probe
BUILDS = "FLATLM_TEST_BUILDS"
WAIT_S = 240
TOL = 1e-5
STEPS = {"train.max_steps": 6, "checkpoint.every": 4}  # the references: checkpoints at steps 4 and 6


def _record_builds() -> None:
    """Append ``{"rank", "local_rank", "cache", "what"}`` to the file ``$FLATLM_TEST_BUILDS`` whenever this process
    trains a tokenizer or builds a token cache."""
    import flatlm.data.cache as cache

    def recorded(what: str, real: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            entry = {k.lower(): int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK")}
            line = json.dumps({**entry, "cache": os.environ["FLATLM_CACHE"], "what": what}) + "\n"
            with open(os.environ[BUILDS], "a") as f:  # one short append: whole lines from concurrent writers
                f.write(line)
            return real(*args, **kwargs)  # type: ignore[operator]

        return call

    cache._build = recorded("tokens", cache._build)  # type: ignore[assignment]
    cache.train_tokenizer = recorded("tokenizer", cache.train_tokenizer)  # type: ignore[assignment]


def builds(path: Path) -> list[tuple[int, int, str, str]]:
    """The probe's records: (rank, local rank, cache directory's name, what), sorted."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return sorted((r["rank"], r["local_rank"], Path(r["cache"]).name, r["what"]) for r in rows)


class References:
    """Single-node runs with 2 processes (``configs/accelerate/<backend>.yaml``), ``STEPS``, one per backend for the
    whole module (started on first use, so that a test's own runs go on meanwhile)."""

    def __init__(self, root: Path, corpus: Path):
        self.root, self.corpus, self.jobs = root, corpus, {}

    def start(self, backend: str) -> Job:
        if backend not in self.jobs:
            args = run_args(self.root / backend, self.corpus, **STEPS)
            self.jobs[backend] = start(backend, self.root, args, backend=backend, env={"FLATLM_CACHE": str(self.root)})
        return self.jobs[backend]

    def run(self, backend: str) -> Path:
        job = self.start(backend)
        assert job.wait(WAIT_S) == 0, job.text()[-3000:]
        return job.out


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> References:
    return References(tmp_path_factory.mktemp("references"), corpus)


def finished(jobs: list[Job]) -> None:
    codes = [job.wait(WAIT_S) for job in jobs]
    for job, code in zip(jobs, codes, strict=True):
        assert code == 0, f"{job.log}:\n{job.text()[-3000:]}"


def differences(got: Path, want: Path, step: int) -> dict[str, float]:
    """The largest difference between two run directories through ``step``, each scaled by max(1, |wanted value|):
    of the losses, of the gradient norms (metrics.jsonl) and of every weight and optimizer-state tensor
    (``final_state`` of checkpoints/step-<step>). Both runs must have logged steps 1..step exactly once."""
    a, b = (read_jsonl(out / "metrics.jsonl")[:step] for out in (got, want))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, step + 1)), (a, b)
    out = {
        k: max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(a, b, strict=True)) for k in ("loss", "grad_norm")
    }
    sa, sb = (final_state(run / CHECKPOINT_DIR / f"step-{step}") for run in (got, want))
    assert sa.keys() == sb.keys() and len(sa) > 20, sorted(set(sa) ^ set(sb))[:5]
    out["state"] = max(
        ((sa[k].double() - sb[k].double()).abs() / sb[k].double().abs().clamp(min=1.0)).max().item() for k in sa
    )
    return out


def trainer_state(run: Path, step: int) -> dict[str, object]:
    return json.loads((run / CHECKPOINT_DIR / f"step-{step}" / TRAINER_STATE).read_text())


def resumed_from(job: Job, checkpoint: Path) -> bool:
    return f"resuming from {checkpoint}" in job.text()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("backend", "resume"), [("ddp", False), ("fsdp2", True), ("zero2", False)])
def test_two_nodes_train_as_one_node(
    backend: str, resume: bool, tmp_path: Path, corpus: Path, references: References
) -> None:
    two = tmp_path / "two"
    caches = [tmp_path / "node0-cache", tmp_path / "node1-cache"]
    args = run_args(two, corpus, **{"train.max_steps": 4, "checkpoint.every": 4})
    log = tmp_path / "builds.jsonl"
    nodes = start_nodes("two", tmp_path, args, caches, backend=backend, module=PROBE, env={BUILDS: str(log)})
    references.start(backend)
    finished(nodes)
    # Each node's local rank 0 (global ranks 0 and 1) built its own node's tokenizer and token cache, once.
    want = [(0, 0, "node0-cache", w) for w in ("tokenizer", "tokens")] + [
        (1, 0, "node1-cache", w) for w in ("tokenizer", "tokens")
    ]
    assert builds(log) == want
    state = trainer_state(two, 4)
    assert (state["backend"], state["world_size"]) == (backend, 2)

    reference = references.run(backend)
    assert differences(two, reference, 4) == {"loss": 0.0, "grad_norm": 0.0, "state": 0.0}
    if not resume:
        return
    # One node, 2 processes, on from the two-node checkpoint to step 6 (node 0's cache: a rerun on that machine).
    more = start(
        "resume", tmp_path, run_args(two, corpus, **STEPS), backend=backend, env={"FLATLM_CACHE": str(caches[0])}
    )
    finished([more])
    assert resumed_from(more, two / CHECKPOINT_DIR / "step-4"), more.text()[-3000:]
    assert differences(two, reference, 6) == {"loss": 0.0, "grad_norm": 0.0, "state": 0.0}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero1_and_zero3_on_two_nodes_and_a_shared_cache(tmp_path: Path, corpus: Path, references: References) -> None:
    zero1, zero3, planted = tmp_path / "zero1", tmp_path / "zero3", tmp_path / "planted"
    log1, log3 = tmp_path / "zero1-builds.jsonl", tmp_path / "zero3-builds.jsonl"
    caches, shared = [tmp_path / "node0-cache", tmp_path / "node1-cache"], [tmp_path / "shared-cache"] * 2
    four = run_args(zero1, corpus, **STEPS, **{"train.micro_batch_size": 2})  # the global batch of 8: 4 x 2
    jobs = start_nodes(
        "zero1", tmp_path, four, caches, backend="zero1", per_node=2, module=PROBE, env={BUILDS: str(log1)}
    )
    two = run_args(zero3, corpus, **STEPS)
    jobs += start_nodes("zero3", tmp_path, two, shared, backend="zero3", module=PROBE, env={BUILDS: str(log3)})
    references.start("zero2")
    # The planted bug, meanwhile in this process (one process: the cheapest run): a learning rate 1% higher.
    train(
        load_config(
            None,
            tiny_overrides(planted, corpus, **STEPS, **{"train.eval_every": 0, "optim.lr": 1.01 * OptimConfig().lr}),
        )
    )
    finished(jobs)
    # Node 1's local rank 0 is global rank 2; the local ranks 1 (global 1 and 3) waited for theirs and built nothing.
    assert builds(log1) == [(r, 0, f"node{r // 2}-cache", w) for r in (0, 2) for w in ("tokenizer", "tokens")]
    # The two nodes' local ranks 0 raced for the shared cache: one of them built it, once, and left no temporary.
    assert [(cache, what) for _, _, cache, what in builds(log3)] == [
        ("shared-cache", "tokenizer"),
        ("shared-cache", "tokens"),
    ]
    assert len([p for p in shared[0].iterdir() if not p.name.startswith(".")]) == 2  # tokenizers/ and one cache
    assert not [p for p in shared[0].rglob(".*") if ".tmp" in p.name]
    for run, world in ((zero1, 4), (zero3, 2)):
        assert (trainer_state(run, 6)["backend"], trainer_state(run, 6)["world_size"]) == (run.name, world)

    reference = references.run("zero2")
    for run in (zero1, zero3):
        got = differences(run, reference, 6)
        assert max(got.values()) <= TOL, f"{run.name}: {got}"
        # Rounding alone, and the bit-for-bit comparisons of the test above would see it: they are not vacuous.
        assert got["state"] > 0, f"{run.name}: {got}"
    got = differences(planted, reference, 6)
    assert min(got.values()) > 10 * TOL, f"the planted bug went unseen: {got}"


if __name__ == "__main__":  # a worker of the jobs above: tests.launch.faulty with the build probe
    from tests.launch import faulty

    _record_builds()
    sys.exit(faulty.main())
