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
  scaled by max(1, |reference value|): zero1 x 4 at most 1.8e-7 in a loss, 8.1e-8 in a gradient norm and 1.4e-6 in a
  state tensor; zero3 x 2 8.9e-8, 8.7e-8 and 9.0e-7. ``TOL`` is 1e-5, about seven times the largest. The planted
  bug, one process with a learning rate 1% higher, differs by 1.3e-3 (loss), 1.4e-3 (gradient norm) and 5.8e-3
  (state): far beyond ``TOL``. Both zero runs' states also differ from the reference by more than 0: the
  bit-for-bit comparisons above tell rounding apart, so they are not vacuous.
* Who builds the caches (``_record_builds``, a probe wrapped around each worker): with a cache per node, each node's
  local rank 0 builds its own once, the tokenizer and the token cache (on node 1 that is global rank 1, or 2 with two
  processes per node), and no other rank builds; with one cache shared by both nodes, both local ranks 0 race for it
  and exactly one build happens (the cache's file lock; the loser reads the winner's cache).
* In one process, the file-system audit's fixes: ``local_main_first`` pairs each node's ranks with that node's local
  rank 0 under torchrun's and srun's cyclic rank layouts; a shared cache whose lock holds on one node only keeps the
  cache published first (``flatlm.data.cache.publish``); the stale-build clean-up spares another node's build.

Cost: 14 launchers and 20 workers, each importing torch and transformers (about 5 s of CPU a worker, 3 s a
launcher, DeepSpeed 3.5 s more): about 290 CPU-seconds, 150 s on this project's 2 shared cores. The jobs of a test
run at once; one set of single-node references serves the whole module.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import flatlm.data.cache as cache
from flatlm.config import OptimConfig, load_config
from flatlm.parallel.distributed import local_main_first
from flatlm.parallel.environment import environment
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
# A learning rate that does not depend on the run's length: a 4-step run continued to 6 is then the 6-step run.
CONSTANT = {"schedule.name": "constant"}
STEPS = {**CONSTANT, "train.max_steps": 6, "checkpoint.every": 4}  # the references: checkpoints at steps 4 and 6


def _record_builds() -> None:
    """Append ``{"rank", "local_rank", "cache", "what"}`` to the file ``$FLATLM_TEST_BUILDS`` whenever this process
    trains a tokenizer or builds a token cache."""

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


def _cache_files(root: Path) -> dict[str, bytes]:
    """A cache directory's tokenizers and token caches, file by file (no locks or temporaries)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name[0] != "."
    }


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
    args = run_args(two, corpus, **CONSTANT, **{"train.max_steps": 4})
    log = tmp_path / "builds.jsonl"
    nodes = start_nodes("two", tmp_path, args, caches, backend=backend, module=PROBE, env={BUILDS: str(log)})
    references.start(backend)
    finished(nodes)
    # Each node's local rank 0 (global ranks 0 and 1) built its own node's tokenizer and token cache, once.
    want = [(0, 0, "node0-cache", w) for w in ("tokenizer", "tokens")] + [
        (1, 0, "node1-cache", w) for w in ("tokenizer", "tokens")
    ]
    assert builds(log) == want
    # The same tokenizer, trained on each node (training is deterministic), so the same token cache: node 1's ranks
    # read the same ids as node 0's. Nothing in a run compares them across nodes; this does.
    assert _cache_files(caches[0]) == _cache_files(caches[1])
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
    # The planted bug, in this process while the jobs run (one process: the cheapest run): a learning rate 1% higher.
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


# -- the file-system audit's fixes, in one process --------------------------------------------------------------


class _Store:
    """The job's store as ``local_main_first`` uses it; a waiter whose key no local rank 0 posted fails at once
    (the real one would wait forever)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def set(self, key: str, value: str) -> None:
        self.keys.add(key)

    def check(self, keys: list[str]) -> bool:
        if not set(keys) <= self.keys:
            raise AssertionError(f"waiting forever for {keys}: posted {sorted(self.keys)}")
        return True


def _tasks(layout: str) -> list[dict[str, str]]:
    """The variables of the 4 tasks of 2 nodes x 2: torchrun's (consecutive ranks per node), srun's with
    ``--distribution=cyclic`` (ranks dealt round the nodes: 0, 2 on node 0; 1, 3 on node 1)."""
    if layout == "torchrun":
        keys = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")
        return [dict(zip(keys, map(str, (4, r, 2, r % 2, r // 2)), strict=True)) for r in range(4)]
    keys = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE", "SLURM_LOCALID", "SLURM_NODEID")
    return [dict(zip(keys, map(str, (4, r, 2, r // 2, r % 2)), strict=True)) for r in range(4)]


@pytest.mark.parametrize("layout", ["torchrun", "cyclic srun"])
def test_each_node_waits_for_its_own_local_rank_0(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``local_main_first`` on every task of a layout, each node's local rank 0 first: every other task finds the
    key its own node's local rank 0 posted. Keyed by ``rank // local_world_size`` (checked), the cyclic layout's
    rank 1, node 1's local rank 0, posted node 0's key and ranks 2 and 3 waited for node 1's forever."""
    import flatlm.parallel.distributed as distributed

    store = _Store()
    monkeypatch.setattr(distributed, "connect", lambda: store)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    calls = next(distributed._LOCAL_MAIN_CALLS)  # every task makes the same (one) call: the same number
    tasks = sorted(_tasks(layout), key=lambda v: environment(v).local_rank)  # local ranks 0 first
    for variables in tasks:
        for name in ("RANK", "GROUP_RANK", "SLURM_NODEID", "LOCAL_RANK", "SLURM_LOCALID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(distributed, "_LOCAL_MAIN_CALLS", itertools.count(calls))
        ran = []
        with local_main_first(environment(variables)):
            ran.append(True)
        assert ran
    assert len(store.keys) == 2, store.keys  # one key per node


def _no_lock(root: Path, key: str, log: object) -> contextlib.AbstractContextManager[None]:
    """``cache.locked`` where the lock does not hold (another node's holder is not seen): nothing but the directory."""
    root.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext()


def test_a_cache_another_node_published_meanwhile_is_kept(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cache directory whose lock holds on one node only: the other node builds the same cache while this
    one does (planted: a whole ``load_or_build`` runs inside this one's build). The cache published first stays, the
    same files (its readers have them memory-mapped), and the later build is dropped. Before ``publish`` the later
    builder moved the first one aside and deleted it (checked: this test then fails on the file's identity)."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("FLATLM_CACHE", str(shared))
    monkeypatch.setattr(cache, "locked", _no_lock)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", corpus)).data
    real_build, published = cache._build, []

    def build_while_another_node_builds(*args: object, **kwargs: object) -> None:
        if not published:
            monkeypatch.setattr(cache, "_build", real_build)
            theirs = cache.load_or_build(cfg, log=lambda _: None).path / "tokens.bin"
            published.append((theirs, theirs.stat().st_ino))
        real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "_build", build_while_another_node_builds)
    mine = cache.load_or_build(cfg, log=lambda _: None)
    ((theirs, inode),) = published
    assert theirs == mine.path / "tokens.bin" and theirs.stat().st_ino == inode
    assert not [p.name for p in shared.iterdir() if ".tmp-" in p.name or ".damaged-" in p.name]


def test_stale_build_directories_of_a_running_builder_on_another_node_stay(tmp_path: Path) -> None:
    """Under the key's lock a builder removes what killed builders left; one that runs on another node (the lock did
    not hold there) keeps its temporary directory."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    names = {
        f".k.tmp-other-host-{os.getpid()}-ab_c1": True,  # another node's: it may be building
        f".k.tmp-{here}-{os.getpid()}-x1": True,  # this host, alive
        f".k.tmp-{here}-{dead.stdout.strip()}-x2": False,  # this host, gone
        ".k.damaged-12345": False,  # an older flatlm's names
        ".k.tmp-abc123": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    cache._remove_stale(tmp_path, "k")
    assert {name: (tmp_path / name).exists() for name in names} == names


if __name__ == "__main__":  # a worker of the jobs above: tests.launch.faulty with the build probe
    from tests.launch import faulty

    _record_builds()
    sys.exit(faulty.main())
