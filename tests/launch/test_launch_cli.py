"""``flatlm launch``: the printed launcher line for every layout and backend, SLURM's defaults, the node-list
expansion, user errors, the SLURM batch template under stubs of ``srun``/``scontrol``, and one real run on 2 CPU
processes stopped by SIGTERM (exit 75) and resumed.

The dry runs go through ``flatlm.train.cli.main`` in this process (fast); the printed line is split with shlex and
every flag checked. Two tests hand the line to accelerate's and DeepSpeed's own argument parsers, so a flag they
read differently from what flatlm meant (accelerate's defaults shadow its config file) fails here.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatlm.errors import FlatlmError
from flatlm.launch.plan import REPO_ROOT
from flatlm.launch.slurm import expand_nodelist, job_port
from flatlm.train.cli import main

SBATCH = REPO_ROOT / "configs" / "slurm" / "flatlm.sbatch"
LAYOUTS = [(1, 1), (1, 8), (4, 8)]
OVERRIDES = ["train.max_steps=3", "output_dir=/shared/runs/x y"]  # a space: the line must quote it


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SLURM variables and no GPUs unless a test sets them; this machine's own must not leak in."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "DS_ACCELERATOR"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def dry(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, str], list[str], list[str]]:
    """``flatlm launch --dry-run ARGS``: (environment additions, launcher argv, comment lines)."""
    assert main(["launch", "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    (line,) = [line for line in lines if not line.startswith("#")]  # one copy-pasteable line
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == sys.executable
    return env, words[1:], comments


def flags(argv: list[str], module: str) -> tuple[dict[str, str], list[str]]:
    """``-m MODULE --a 1 --b 2 ... -m flatlm.train ARGS`` -> ({"--a": "1", ...}, ARGS); a bare flag maps to ""."""
    assert argv[:2] == ["-m", module], argv
    rest, out = argv[2:], {}
    end = rest.index("flatlm.train")
    head, train_args = rest[:end], rest[end + 1 :]
    i = 0
    while i < len(head):
        if i + 1 < len(head) and not head[i + 1].startswith("-"):
            out[head[i]], i = head[i + 1], i + 2
        else:
            out[head[i]], i = "", i + 1
    return out, train_args


def check_accelerate(argv: list[str], backend: str, nodes: int, gpus: int, rank: int, host: str, port: int) -> None:
    got, train_args = flags(argv, "accelerate.commands.launch")
    assert got.pop("-m") == ""  # the "-m" before flatlm.train
    config = Path(got.pop("--config_file"))
    assert config.is_file() and config.name == f"{backend}.yaml"
    assert (config.parent.name == "multinode") == (nodes > 1), config
    assert got == {
        "--num_processes": str(nodes * gpus),
        "--num_machines": str(nodes),
        "--machine_rank": str(rank),
        "--main_process_ip": host,
        "--main_process_port": str(port),
    }
    assert train_args == OVERRIDES


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
def test_accelerate_line_for_every_layout_and_backend(
    capsys: pytest.CaptureFixture[str], backend: str, nodes: int, gpus: int
) -> None:
    rank = nodes - 1
    layout = ["--nodes", str(nodes), "--gpus-per-node", str(gpus), "--node-rank", str(rank)]
    env, argv, _ = dry(capsys, "--backend", backend, *layout, "--main-addr", "gpu001", *OVERRIDES)
    check_accelerate(argv, backend, nodes, gpus, rank, "gpu001", 29500)
    # a step and a save (2 x parallel.timeout_s, 600 s by default) before torchrun's agent SIGKILLs the workers
    want = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1260"}
    assert env == (want | {"DS_ACCELERATOR": "cpu"} if backend.startswith("zero") else want)
    if (nodes, gpus) == (4, 8):  # planted bug: the per-node count where accelerate wants the total fails the check
        wrong = [("8" if a == "32" else a) for a in argv]
        with pytest.raises(AssertionError):
            check_accelerate(wrong, backend, nodes, gpus, rank, "gpu001", 29500)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
def test_deepspeed_line_and_hostfile(capsys: pytest.CaptureFixture[str], backend: str, nodes: int, gpus: int) -> None:
    rank = nodes - 1
    layout = ["--nodes", str(nodes), "--gpus-per-node", str(gpus), "--node-rank", str(rank), "--main-addr", "gpu001"]
    env, argv, comments = dry(capsys, "--launcher", "deepspeed", "--backend", backend, *layout, *OVERRIDES)
    got, train_args = flags(argv, "deepspeed.launcher.runner")
    hostfile = Path(got.pop("--hostfile"))
    hosts = ["localhost"] if nodes == 1 else [f"node{r}" for r in range(nodes)]
    lines = [line for line in hostfile.read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"{h} slots={gpus}" for h in hosts]
    assert [c.strip("# ") for c in comments[2:]] == lines  # the dry run shows the file it wrote
    assert got == {
        "--num_nodes": str(nodes),
        "--num_gpus": str(gpus),
        "--no_ssh": "",
        "--node_rank": str(rank),
        "--master_addr": "gpu001",
        "--master_port": "29500",
        "--no_local_rank": "",
        "--module": "",
    }
    assert train_args == OVERRIDES
    stage = backend.removeprefix("zero")
    assert env == {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage,
        "DS_ACCELERATOR": "cpu",
    }


@pytest.mark.timeout(120)
def test_accelerate_and_deepspeed_read_the_flags_as_meant(capsys: pytest.CaptureFixture[str]) -> None:
    """accelerate 1.16's own validation and torchrun arguments for 4 x 8 FSDP2, node 2; DeepSpeed's runner parser."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from deepspeed.launcher.runner import parse_args

    capsys.readouterr()  # what importing DeepSpeed printed

    layout = [
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--node-rank",
        "2",
        "--main-addr",
        "gpu001",
        "--main-port",
        "23456",
    ]
    _, argv, _ = dry(capsys, "--backend", "fsdp2", *layout, *OVERRIDES)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    assert args.use_fsdp and args.fsdp_version == 2 and args.num_processes == 32
    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "4", 2)
    assert args.rdzv_endpoint == "gpu001:23456" and args.rdzv_backend == "static" and args.max_restarts == 0
    assert args.module and args.training_script == "flatlm.train" and args.training_script_args == OVERRIDES

    _, argv, _ = dry(capsys, "--backend", "fsdp2", *layout, "--max-restarts", "3")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    assert args.max_restarts == 3

    _, argv, _ = dry(capsys, "--launcher", "deepspeed", "--backend", "zero3", *layout, *OVERRIDES)
    ds = parse_args(argv[2:])
    assert (ds.num_nodes, ds.num_gpus, ds.node_rank, ds.master_addr, ds.master_port) == (4, 8, 2, "gpu001", 23456)
    assert ds.no_ssh and ds.no_local_rank and ds.module and ds.user_script == "flatlm.train"
    assert ds.user_args == OVERRIDES


@pytest.mark.timeout(60)
def test_environment_additions_follow_the_config_and_keep_the_users(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _, _ = dry(capsys, "parallel.timeout_s=100")
    assert env == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "260"}
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # 3 GPUs: the default count, and no DS_ACCELERATOR=cpu
    env, argv, _ = dry(capsys, "--backend", "zero2")
    assert env == {} and argv[argv.index("--num_processes") + 1] == "3"


@pytest.mark.timeout(60)
def test_the_backend_comes_from_the_config_and_never_contradicts_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("parallel:\n  backend: zero2\n")
    _, argv, _ = dry(capsys, "--config", str(config))
    assert Path(argv[argv.index("--config_file") + 1]).name == "zero2.yaml"
    assert argv[-2:] == ["--config", str(config)]
    assert main(["launch", "--dry-run", "--backend", "ddp", "--config", str(config)]) == 2
    assert "parallel.backend=zero2" in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nodes", "2", "--node-rank", "2", "--main-addr", "h"], "--node-rank 2 with 2 node(s)"),
        (["--nodes", "2"], "needs --main-addr HOST"),
        (["--launcher", "deepspeed", "--backend", "zero2", "--hostfile", "/no/such/hostfile"], "no such file"),
        (["--launcher", "deepspeed", "--backend", "fsdp2"], "--launcher deepspeed runs DeepSpeed ZeRO"),
        (["--launcher", "deepspeed", "--backend", "zero1", "--max-restarts", "1"], "--max-restarts needs"),
        (["--hostfile", "/etc/hostname"], "--hostfile is for --launcher deepspeed"),
        (["--gpus-per-node", "0"], "at least 1"),
        (["trian.max_steps=3"], "unknown config key 'trian'"),
    ],
)
def test_bad_input_is_one_error_line(capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
    assert main(["launch", "--dry-run", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatlm launch: error: ") and says in lines[0], captured.err
    assert captured.out == ""


@pytest.mark.timeout(60)
def test_a_short_hostfile_is_refused_and_a_good_one_passed_through(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nalpha slots=8\nbeta slots=8\n")
    base = ["--launcher", "deepspeed", "--backend", "zero2", "--hostfile", str(hostfile), "--main-addr", "alpha"]
    _, argv, _ = dry(capsys, *base, "--nodes", "2")
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert main(["launch", "--dry-run", *base, "--nodes", "3"]) == 2
    assert "lists 2 host(s) for --nodes 3" in capsys.readouterr().err


# -- SLURM -------------------------------------------------------------------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "1",
    "SLURM_GPUS_ON_NODE": "4",
}


@pytest.mark.timeout(60)
def test_inside_slurm_the_layout_comes_from_its_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the Python expansion
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    _, argv, comments = dry(capsys, "--backend", "fsdp2", *OVERRIDES)
    check_accelerate(argv, "fsdp2", 2, 4, 1, "node07", job_port("4242"))
    assert job_port("4242") == 24242 and "SLURM job 4242" in comments[0]
    _, argv, _ = dry(capsys, "--launcher", "deepspeed", "--backend", "zero2", *OVERRIDES)
    hostfile = Path(argv[argv.index("--hostfile") + 1]).read_text()
    assert [line for line in hostfile.splitlines() if not line.startswith("#")] == ["node07 slots=4", "node08 slots=4"]
    assert argv[argv.index("--node_rank") + 1] == "1"
    # explicit flags win over SLURM's values
    _, argv, _ = dry(capsys, "--node-rank", "0", "--main-port", "31000", "--gpus-per-node", "2", *OVERRIDES)
    check_accelerate(argv, "ddp", 2, 2, 0, "node07", 31000)
    # inside a step, its own node list and count win over the job's
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[08,11]")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "0")
    _, argv, _ = dry(capsys, *OVERRIDES)
    check_accelerate(argv, "ddp", 2, 4, 0, "node08", job_port("4242"))
    # an error on a node other than the first is said too (run_command lets only global rank 0 speak)
    assert main(["launch", "--dry-run", "--node-rank", "5"]) == 2
    assert "flatlm launch: error: --node-rank 5" in capsys.readouterr().err


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[07-08]", ["node07", "node08"]),
        ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: widths grow
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding of the first bound, then wider
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),  # several groups: every combination
        ("solo", ["solo"]),
        ("a,b[3],c-x[9-10].ib", ["a", "b3", "c-x9.ib", "c-x10.ib"]),
        (" gpu[1, 3 ] ", ["gpu1", "gpu3"]),
    ],
)
def test_nodelist_expansion(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nodelist", ["a[1-", "a]", "a[3-1]", "a[x]", "a,,b", "a[[1]]", "a[1-2-3]"])
def test_nodelist_errors(nodelist: str) -> None:
    with pytest.raises(FlatlmError, match="SLURM node list"):
        expand_nodelist(nodelist)


# -- the batch template ------------------------------------------------------------------------------------------------

SRUN_STUB = """#!/bin/bash
# srun stub: record the arguments; run the command that follows srun's own --options with --dry-run appended
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
while [[ "$1" == --* ]]; do shift; done
"$@" --dry-run > "$STUB_LOG/launch.out" 2> "$STUB_LOG/launch.err"
status=$?
exit "${STUB_SRUN_STATUS:-$status}"
"""
SCONTROL_STUB = """#!/bin/bash
# scontrol stub: record every call; expand node lists into names that only this stub gives
echo "$*" >> "$STUB_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'from-scontrol-a\\nfrom-scontrol-b\\n'; fi
"""


def run_sbatch(tmp_path: Path, srun_status: str | None) -> tuple[int, Path]:
    stubs, logs = tmp_path / "bin", tmp_path / "stub-logs"
    stubs.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    flatlm = stubs / "flatlm"  # the flatlm of this Python
    flatlm.write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -m flatlm "$@"\n')
    flatlm.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= SLURM_ENV | {"PATH": f"{stubs}:{env['PATH']}", "STUB_LOG": str(logs), "FLATLM_BACKEND": "zero2"}
    env |= {"STUB_SRUN_STATUS": srun_status} if srun_status is not None else {}
    args = ["--config", str(REPO_ROOT / "configs" / "default.yaml"), "train.max_steps=3"]
    done = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    return done.returncode, logs


@pytest.mark.timeout(120)
def test_sbatch_template_composes_srun_and_requeues_on_75(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    for directive in ("--ntasks-per-node=1", "--signal=TERM@", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text

    status, logs = run_sbatch(tmp_path, None)
    assert status == 0
    srun = (logs / "srun.args").read_text().splitlines()
    assert srun[:4] == ["--kill-on-bad-exit=1", "--output=logs/%x-%j-%N.out", "--open-mode=append", "flatlm"]
    assert srun[4:7] == ["launch", "--backend", "zero2"] and srun[-1] == "train.max_steps=3"
    assert (tmp_path / "logs").is_dir()  # srun's --output directory exists before srun starts
    argv = shlex.split((logs / "launch.out").read_text().splitlines()[-1])
    launch = argv[argv.index("accelerate.commands.launch") + 1 :]
    # the layout from SLURM's variables, the node names from scontrol (preferred over the Python expansion)
    assert launch[launch.index("--main_process_ip") + 1] == "from-scontrol-a"
    assert launch[launch.index("--machine_rank") + 1] == "1" and launch[launch.index("--num_processes") + 1] == "8"
    assert Path(launch[launch.index("--config_file") + 1]).parts[-2:] == ("multinode", "zero2.yaml")
    calls = (logs / "scontrol.calls").read_text().splitlines()
    assert calls == ["show hostnames node[07-08]"]  # no requeue after a normal end

    status, logs = run_sbatch(tmp_path, "75")
    assert status == 75
    assert (logs / "scontrol.calls").read_text().splitlines()[-1] == "requeue 4242"

    (logs / "scontrol.calls").unlink()
    status, logs = run_sbatch(tmp_path, "1")  # a failure is not requeued
    assert status == 1 and "requeue" not in (logs / "scontrol.calls").read_text()


# -- a real run ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_dry_run_imports_no_torch() -> None:
    code = "import sys; from flatlm.train.cli import main; main(['launch', '--dry-run'])"
    code += "; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sigterm_to_flatlm_launch_saves_exits_75_and_the_rerun_resumes(tmp_path: Path, corpus: Path) -> None:
    from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST
    from flatlm.train.metrics import read_jsonl
    from tests.launch.jobs import free_port, run_args

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def launch(max_steps: int, log: Path) -> subprocess.Popen[bytes]:
        args = run_args(out, corpus, **{"train.max_steps": max_steps, "checkpoint.every": 0})
        cmd = [sys.executable, "-m", "flatlm", "launch", "--backend", "ddp", "--gpus-per-node", "2"]
        with log.open("wb") as f:
            return subprocess.Popen(
                [*cmd, "--main-port", str(free_port()), *args], stdout=f, stderr=subprocess.STDOUT, env=env
            )

    first = launch(10_000, tmp_path / "first.log")
    deadline = time.time() + 200
    while not (out / "metrics.jsonl").is_file() or len(read_jsonl(out / "metrics.jsonl")) < 3:
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)  # to flatlm launch alone: it relays the stop to every process below it
    status, text = first.wait(120), (tmp_path / "first.log").read_text()
    assert status == 75, text[-3000:]
    done = len(read_jsonl(out / "metrics.jsonl"))
    assert f"stopped by SIGTERM after step {done}; checkpoint saved" in text, text[-3000:]
    assert (out / CHECKPOINT_DIR / LATEST).read_text().strip() == f"step-{done}"

    second = launch(done + 2, tmp_path / "second.log")
    status, text = second.wait(200), (tmp_path / "second.log").read_text()
    assert status == 0, text[-3000:]
    assert f"resuming from {out / CHECKPOINT_DIR / f'step-{done}'}" in text, text[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 3))
