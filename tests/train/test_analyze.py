"""``flatlm landscape`` and ``flatlm eval`` on a real (tiny) checkpoint: what they write, that they are seeded, that
their clean numbers are the model's loss on exactly the chosen documents, and that 2 gloo processes (torchrun, DDP
or FSDP2-launched: the commands gather the whole model per process) measure the one-process numbers.

The math itself is checked against dense Hessians and closed forms in tests/analysis/; here the composition: which
windows, which weights, which reduce. A rank that forgot the all-reduce would report its half's numbers (the
2-process comparison fails by far more than its tolerance); a corruption at rate 0 or a weight noise of sigma 0
that chose other documents or moved the weights would have a nonzero gap.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlm.config import load_config
from flatlm.data.eval_text import choose_documents, document_batches, validation_documents
from flatlm.data.splits import data_seed
from flatlm.train.cli import main
from flatlm.train.export import find_checkpoint, load_checkpoint_model
from flatlm.train.loop import train
from flatlm.train.step import evaluate_loss
from tests.conftest import tiny_overrides
from tests.train.launching import ROOT, _env

LANDSCAPE = ["--batches", "1", "--iters", "6", "--top-k", "2", "--trace-samples", "4", "--rho", "0.01,0.05"]
LANDSCAPE += ["--sharpness-steps", "2", "--points", "5", "--plane-points", "3"]
EVAL = ["--batches", "2", "--corrupt", "typo:0,typo:0.2,drop_word:0.2", "--weights-noise", "0,0.05", "--draws", "2"]
EVAL += ["--quantize", "8,4"]
# 2 processes batch other windows together than one does, so float32 kernels round each token's loss differently:
# measured differences up to 2e-7 absolute in losses (~5) and in loss differences (SAM sharpness ~1e-2, the power
# iteration's relative change ~4e-4), 1.5e-6 relative in eigenvalues. A missing all-reduce halves every number.
RTOL, ATOL = 1e-5, 2e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "run"
    train(load_config(None, tiny_overrides(out, corpus, **{"checkpoint.every": 3})))
    return out


def _numbers(record: object) -> object:
    """``record`` without its timings (everything else must be reproducible)."""
    if isinstance(record, dict):
        return {k: _numbers(v) for k, v in record.items() if k not in ("seconds", "processes", "checkpoint")}
    if isinstance(record, list):
        return [_numbers(v) for v in record]
    return record


def test_landscape_writes_every_measure_and_plot_and_is_seeded(run: Path, tmp_path: Path) -> None:
    step3 = run / "checkpoints" / "step-3"
    assert main(["landscape", str(run), "--out", str(tmp_path / "a"), *LANDSCAPE, "--to", str(step3)]) == 0
    record = json.loads((tmp_path / "a" / "landscape.json").read_text())
    assert record["step"] == 6 and record["tokens"] > 0
    hessian = record["hessian"]
    assert (
        hessian["lambda_max"]["value"] > 0
        and len(hessian["lambda_max"]["history"]) == hessian["lambda_max"]["iterations"]
    )
    assert len(hessian["top_k"]["values"]) == 2
    assert hessian["top_k"]["values"][0] == pytest.approx(hessian["lambda_max"]["value"], rel=0.2)
    assert hessian["trace"]["samples"] == 4
    assert [s["rho"] for s in record["sam_sharpness"]] == [0.01, 0.05]
    assert 0 <= record["sam_sharpness"][0]["value"] < record["sam_sharpness"][1]["value"]
    # The landscapes pass through the checkpoint: alpha 0 of the line and the plane's centre are its loss.
    assert record["line"]["loss"][2] == pytest.approx(record["loss"], rel=1e-6)
    assert record["plane"]["loss"][1][1] == pytest.approx(record["loss"], rel=1e-6)
    interp = record["interpolation"]
    assert interp["alphas"][0] == -0.25 and interp["alphas"][-1] == 1.25
    for name in ("landscape_line.png", "landscape_plane.png", "landscape_interpolation.png"):
        assert (tmp_path / "a" / name).stat().st_size > 10_000, name

    assert main(["landscape", str(run), "--out", str(tmp_path / "b"), *LANDSCAPE, "--to", str(step3)]) == 0
    again = json.loads((tmp_path / "b" / "landscape.json").read_text())
    assert _numbers(again) == _numbers(record)  # the same seed: every number again, bit for bit
    assert main(["landscape", str(run), "--out", str(tmp_path / "c"), *LANDSCAPE, "--seed", "1"]) == 0
    other = json.loads((tmp_path / "c" / "landscape.json").read_text())
    assert other["line"]["loss"] != record["line"]["loss"]  # another seed: other documents and directions


def test_interpolation_ends_at_both_checkpoints(run: Path, tmp_path: Path) -> None:
    step3 = run / "checkpoints" / "step-3"
    args = ["--batches", "1", "--no-hessian", "--rho", "0.01", "--no-line", "--no-plane", "--points", "7"]
    assert main(["landscape", str(run), "--out", str(tmp_path / "w"), *args, "--to", str(step3)]) == 0
    assert main(["landscape", str(step3), "--out", str(tmp_path / "w3"), *args]) == 0
    forward = json.loads((tmp_path / "w" / "landscape.json").read_text())
    at_step3 = json.loads((tmp_path / "w3" / "landscape.json").read_text())
    alphas, losses = forward["interpolation"]["alphas"], forward["interpolation"]["loss"]
    assert losses[alphas.index(0.0)] == pytest.approx(forward["loss"], rel=1e-6)
    assert losses[alphas.index(1.0)] == pytest.approx(at_step3["loss"], rel=1e-6)
    assert at_step3["loss"] > forward["loss"]  # the earlier checkpoint is worse: the two ends differ


def test_eval_clean_loss_is_the_models_loss_on_the_chosen_documents(run: Path, tmp_path: Path) -> None:
    assert main(["eval", str(run), "--out", str(tmp_path), *EVAL]) == 0
    record = json.loads((tmp_path / "robustness.json").read_text())
    model, tok, cfg = load_checkpoint_model(find_checkpoint(run))
    docs = choose_documents(validation_documents(cfg, data_seed(cfg)), tok, 2 * 4 * 32 + 1, seed=0)
    batches = document_batches(docs, tok, cfg.data.seq_len, 4)
    assert record["clean"]["loss"] == pytest.approx(evaluate_loss(model, batches), rel=1e-6)
    assert record["clean"]["tokens"] == sum(len(ids) + 1 for ids in tok.encode(docs)) - 1  # every token once
    assert record["clean"]["ppl"] == pytest.approx(math.exp(record["clean"]["loss"]))
    by_name = {r["name"]: r for r in record["corruptions"]}
    assert by_name["typo:0"]["gap"] == 0.0  # rate 0: the same text, the same windows
    assert by_name["typo:0.2"]["gap"] > 0 and by_name["drop_word:0.2"]["gap"] != 0
    assert record["corruption_gap_mean"] == pytest.approx(sum(r["gap"] for r in record["corruptions"]) / 3)
    noise = {r["sigma"]: r for r in record["weight_noise"]}
    assert noise[0.0]["gap"] == 0.0 and noise[0.0]["loss_std"] == 0.0  # sigma 0 leaves the weights as they are
    assert noise[0.05]["loss_std"] > 0 and noise[0.05]["draws"] == 2
    quant = {r["bits"]: r for r in record["quantize"]}
    assert 0 < quant[8]["rel_error"] < quant[4]["rel_error"]
    assert abs(quant[8]["gap"]) < abs(quant[4]["gap"])
    table = (tmp_path / "robustness.md").read_text()
    assert "corrupt typo:0.2" in table and "int4 per-channel RTN" in table
    # Evaluating left the weights alone (noise and quantisation restore them).
    after, _, _ = load_checkpoint_model(find_checkpoint(run))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), after.state_dict().values(), strict=True))


def test_eval_on_files_and_on_another_runs_split(run: Path, tmp_path: Path, corpus: Path) -> None:
    assert (
        main(["eval", str(run), "--out", str(tmp_path / "f"), "--batches", "1", "--data", f"{corpus}/doc00*.txt"]) == 0
    )
    assert json.loads((tmp_path / "f" / "robustness.json").read_text())["documents"] >= 1
    assert main(["eval", str(run), "--out", str(tmp_path / "v"), "--batches", "1", "--val-of", str(run)]) == 0
    assert main(["eval", str(run), "--out", str(tmp_path / "s"), "--batches", "1"]) == 0
    same = [json.loads((tmp_path / d / "robustness.json").read_text())["clean"] for d in ("v", "s")]
    assert same[0] == same[1]  # --val-of the run itself is its own validation split


def test_bad_input_is_one_error(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run), "--corrupt", "typos:0.1"]) == 2
    assert "typos" in capsys.readouterr().err
    assert main(["landscape", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (run / "analysis" / "robustness.json").exists()  # nothing half-written for a refused command


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flatlm"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env())


def _close(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=RTOL, abs=ATOL)
    else:
        assert a == b


@pytest.mark.timeout(600)
def test_two_processes_measure_the_one_process_numbers(run: Path, tmp_path: Path) -> None:
    landscape = [*LANDSCAPE, "--batches", "2", "--no-plane"]
    assert main(["landscape", str(run), "--out", str(tmp_path / "one"), *landscape]) == 0
    assert main(["eval", str(run), "--out", str(tmp_path / "one"), *EVAL]) == 0
    for command, args in (("landscape", landscape), ("eval", EVAL)):
        done = _torchrun([command, str(run), "--out", str(tmp_path / "two"), *args])
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("landscape.json", "robustness.json"):
        one = json.loads((tmp_path / "one" / name).read_text())
        two = json.loads((tmp_path / "two" / name).read_text())
        assert two["processes"] == 2 and one["processes"] == 1
        _close(_numbers(one), _numbers(two))


def test_val_of_measures_another_model_on_the_same_windows(run: Path, tmp_path: Path, corpus: Path) -> None:
    """Forgetting: a model fine-tuned from ``run`` (other seq_len and batch size) is measured on ``run``'s windows."""
    extra = {"model.init_from": str(run), "data.tokenizer": str(run), "data.seq_len": 16, "train.max_steps": 2}
    tuned = tmp_path / "tuned"
    train(load_config(None, tiny_overrides(tuned, corpus, **{**extra, "train.micro_batch_size": 2})))
    args = ["--batches", "2", "--val-of", str(run)]
    assert main(["eval", str(run), "--out", str(tmp_path / "before"), *args]) == 0
    assert main(["eval", str(tuned), "--out", str(tmp_path / "after"), *args]) == 0
    before, after = (json.loads((tmp_path / d / "robustness.json").read_text()) for d in ("before", "after"))
    assert (after["seq_len"], after["batch_size"]) == (32, 4)  # run's windows, not the tuned run's 16 x 2
    assert after["clean"]["tokens"] == before["clean"]["tokens"] and after["documents"] == before["documents"]
    assert after["clean"]["loss"] != before["clean"]["loss"]  # another model on the same text
