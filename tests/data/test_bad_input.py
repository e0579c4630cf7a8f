"""Bad data input as a new user meets it: one clear error (or one loud warning), nothing half-built."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flatlm.config import DataConfig, load_config
from flatlm.data import iter_documents, load_or_build
from flatlm.data.sources import MAX_BINARY_FRACTION
from flatlm.errors import FlatlmError
from tests.conftest import make_documents

ROOT = Path(__file__).resolve().parents[2]


def _files(paths: list[Path], cache: Path | None = None, **extra: object) -> DataConfig:
    cache_dir = {"cache_dir": str(cache)} if cache else {}
    return DataConfig(source="files", paths=[str(p) for p in paths], **cache_dir, **extra)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---- malformed JSON lines -----------------------------------------------------------------
def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"text": d}) for d in make_documents(5)]
    rows[3] = '{"text": "a line with a trailing comma",}'
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(FlatlmError) as exc:
        list(iter_documents(_files([path])))
    message = _one_line(exc)
    assert message.startswith(f"{path}:4: not valid JSON (")
    assert "fix or remove line 4 " in message


def test_jsonl_line_that_is_not_an_object_or_lacks_the_field(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n\n[1, 2]\n')
    with pytest.raises(FlatlmError) as exc:
        list(iter_documents(_files([path])))
    assert _one_line(exc).startswith(f"{path}:3: a JSON list, not an object with a 'text' field; fix or remove line 3")
    path.write_text('{"text": "fine"}\n{"body": "x"}\n')
    expected = f"{path}:2 has no column 'text' (columns: body); set data.text_field"
    with pytest.raises(FlatlmError, match=re.escape(expected)):
        list(iter_documents(_files([path])))


def test_jsonl_reads_as_before(tmp_path: Path) -> None:
    """The stdlib reader gives what datasets' json builder gave: the field of each row, str() of non-strings."""
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": 5}\n{"text": null}\n{"text": "b\\nc", "id": 3}\n')
    assert list(iter_documents(_files([path]))) == ["a", "5", "b\nc"]


def test_malformed_json_and_parquet_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "corpus.json"
    for broken in ('[{"text": "a"}, {"text": ]', '{"text": "a"}\n{"text": \n'):  # a JSON document, JSON lines
        path.write_text(broken)
        with pytest.raises(FlatlmError) as exc:
            list(iter_documents(_files([path])))
        assert _one_line(exc).startswith(f"{path} is not valid JSON (a list of objects, or one object per line) (")
    path.write_text('[{"text": "a"}, {"text": "b"}]')
    assert list(iter_documents(_files([path]))) == ["a", "b"]
    parquet = tmp_path / "corpus.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(FlatlmError) as exc:
        list(iter_documents(_files([parquet])))
    assert _one_line(exc).startswith(f"{parquet} is not valid parquet (")


# ---- data.source=hf without network -------------------------------------------------------
def test_hf_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Offline mode stands in for no network (both fail as the Hub being unreachable; offline fails at once)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FlatlmError) as exc:
        list(iter_documents(DataConfig(source="hf", name="flatlm-tests/no-such-dataset")))
    message = _one_line(exc)
    assert message.startswith("could not reach dataset 'flatlm-tests/no-such-dataset' on the Hugging Face Hub (")
    assert "set data.name to a local dataset directory" in message and "HF_DATASETS_OFFLINE=1" in message
    assert not [r for r in caplog.records if r.name.startswith(("datasets", "huggingface_hub"))]


def test_hf_dataset_the_hub_does_not_have_is_its_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, datasets raises DatasetNotFoundError for an unknown id: a FileNotFoundError subclass, so it must not
    read as a missing local path (no network here: load_dataset is made to raise what the Hub answers)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_found(*args: object, **kwargs: object) -> None:
        raise DatasetNotFoundError("Dataset 'flatlm-tests/no-such-dataset' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(FlatlmError) as exc:
        list(iter_documents(DataConfig(source="hf", name="flatlm-tests/no-such-dataset")))
    message = _one_line(exc)
    assert message.startswith("dataset 'flatlm-tests/no-such-dataset' is not on the Hugging Face Hub or is not public")
    assert "hf auth login" in message


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hf_unreachable_cli_prints_one_line(tmp_path: Path) -> None:
    """What the user sees: exit 2, one line on stderr, nothing written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    args = ["train", f"output_dir={out}", "data.source=hf", "data.name=flatlm-tests/no-such-dataset"]
    cmd = [sys.executable, "-m", "flatlm.train.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=100)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("flatlm train: error: could not reach dataset 'flatlm-tests/no-such-dataset'")
    assert not out.exists()


# ---- binary files -----------------------------------------------------------------------------
PNG_HEADER = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"  # binary formats hold NUL bytes in their headers


def _binary(path: Path, n: int, seed: int) -> Path:
    path.write_bytes(PNG_HEADER + random.Random(seed).randbytes(n - len(PNG_HEADER)))
    return path


def test_directory_of_binary_files_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _binary(data / "a.bin", 20_000, 0)
    _binary(data / "b.png", 5_000, 1)
    (data / "c.npy").write_bytes(b"\0" * 8_000)  # valid UTF-8, but NUL bytes are not text
    (data / "notes.txt").write_text(make_documents(1)[0])
    cache = tmp_path / "cache"
    with pytest.raises(FlatlmError) as exc:
        load_or_build(_files([data], cache))
    message = _one_line(exc)
    assert message.startswith("the data files are not text: ")
    assert re.search(r"\(\d+\.\d%, more than 1%\) are not UTF-8 text \(undecodable or NUL\)", message)
    worst = message.split("most in ")[1]
    for name in ("a.bin (", "b.png (", "c.npy (100%)"):
        assert name in worst
    assert "notes.txt" not in message and "point data.paths at text files" in message
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing trained or cached


def test_binary_file_in_a_text_corpus_is_a_loud_warning(text_corpus: Path, tmp_path: Path) -> None:
    corpus_bytes = sum(p.stat().st_size for p in text_corpus.iterdir())
    small = int(corpus_bytes * MAX_BINARY_FRACTION / 2)  # below the refusal threshold
    _binary(text_corpus / "logo.png", small, 2)
    warnings: list[str] = []
    cfg = _files([text_corpus], tmp_path / "c", vocab_size=400)
    load_or_build(cfg, log=lambda _: None, warn=warnings.append)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("1 data file(s) hold NUL bytes (binary, not text) and are trained on as text: ")
    assert str(text_corpus / "logo.png") in warnings[0]
    (text_corpus / "logo.png").unlink()  # the same corpus without it: silent
    load_or_build(cfg, log=lambda _: None, warn=warnings.append)
    assert len(warnings) == 1


def test_other_encodings(text_corpus: Path, tmp_path: Path) -> None:
    """Latin-1 text: a few such bytes are skipped and counted (no warning); a Latin-1 corpus is refused."""
    (text_corpus / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    warnings: list[str] = []
    cfg = _files([text_corpus], tmp_path / "c", vocab_size=400)
    cache = load_or_build(cfg, log=lambda _: None, warn=warnings.append)
    assert warnings == [] and cache.meta["stats"]["undecodable_bytes"] == 4
    latin = tmp_path / "latin"
    latin.mkdir()
    for i, doc in enumerate(make_documents(10)):
        (latin / f"{i}.txt").write_bytes(doc.replace("the", "thé").encode("latin-1"))
    with pytest.raises(FlatlmError) as exc:
        load_or_build(_files([latin], tmp_path / "c", vocab_size=400))
    message = _one_line(exc)
    assert message.startswith("the data files are not text: ") and message.endswith("or convert them to UTF-8")


# ---- a vocabulary the corpus cannot give ----------------------------------------------------
def test_vocab_size_above_what_the_corpus_supports(text_corpus: Path, tmp_path: Path) -> None:
    cfg = _files([text_corpus], tmp_path / "c", vocab_size=50_000)
    with pytest.raises(FlatlmError) as exc:
        load_or_build(cfg)
    message = _one_line(exc)
    found = re.fullmatch(
        r"data\.vocab_size=50000 is more than this corpus supports: sentencepiece finds at most (\d+) pieces in its "
        r"[\d,]+ sampled lines; set data\.vocab_size=(\d+) or less \(or add data\)",
        message,
    )
    assert found and found[1] == found[2], message
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
    largest = int(found[1])
    assert 300 < largest < 50_000
    cache = load_or_build(cfg.model_copy(update={"vocab_size": largest}))  # the size named is one that works
    assert cache.tokenizer.vocab_size == cache.meta["vocab_size"] == largest


# ---- data.paths without brackets ----------------------------------------------------------------
def test_one_path_without_brackets_is_a_list_of_one(jsonl_corpus: Path) -> None:
    cfg = load_config(None, ["data.source=files", f"data.paths={jsonl_corpus}"])
    assert cfg.data.paths == [str(jsonl_corpus)]
    assert list(iter_documents(cfg.data)) == make_documents(40, seed=1)
    assert load_config(None, [f"data.paths=[{jsonl_corpus}, b.txt]"]).data.paths == [str(jsonl_corpus), "b.txt"]
    with pytest.raises(FlatlmError, match="invalid value for 'data.paths'"):
        load_config(None, ["data.paths=3"])
