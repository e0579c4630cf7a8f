from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlm.config import DataConfig
from flatlm.data import SourceStats, iter_documents, load_or_build
from flatlm.data.sources import decode_utf8, iter_rows, source_fingerprint, stdlib_files
from flatlm.errors import FlatlmError
from tests.conftest import make_documents


def test_decode_counts_and_skips_bad_bytes() -> None:
    assert decode_utf8("héllo".encode()) == ("héllo", 0)
    text, bad = decode_utf8(b"ab\xff\xfecd\xc3\xa9\x80")
    assert text == "abcdé" and bad == 3


def test_text_files_with_undecodable_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"good text\n")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xff bytes \xc0 here\n")
    stats = SourceStats()
    docs = list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "*.txt")]), stats))
    assert docs == ["good text\n", "bad  bytes  here\n"]
    assert stats.undecodable_bytes == 3 and stats.files_with_undecodable == 1


def test_jsonl_parquet_and_directory(tmp_path: Path, jsonl_corpus: Path, text_corpus: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1 text", "p2 text"]}), tmp_path / "t.parquet")
    docs = list(iter_documents(DataConfig(source="files", paths=[str(jsonl_corpus)])))
    assert docs == make_documents(40, seed=1)
    assert list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "t.parquet")], text_field="body"))) == [
        "p1 text",
        "p2 text",
    ]
    assert len(list(iter_documents(DataConfig(source="files", paths=[str(text_corpus)])))) == 60


def test_missing_text_field(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(FlatlmError, match="no column 'text'.*data.text_field"):
        list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "x.jsonl")])))


def test_hf_local_dataset_dir_and_streaming(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(12)))
    for streaming in (False, True):
        cfg = DataConfig(source="hf", name=str(d), split="train", streaming=streaming, max_documents=5)
        assert list(iter_documents(cfg)) == make_documents(12)[:5]


def test_filters(tmp_path: Path) -> None:
    for i, text in enumerate(["x", "long enough", "", "also long enough"]):
        (tmp_path / f"{i}.txt").write_text(text)
    stats = SourceStats()
    cfg = DataConfig(source="files", paths=[str(tmp_path)], min_chars=5)
    assert list(iter_documents(cfg, stats)) == ["long enough", "also long enough"]
    assert stats.dropped_short == 2


def test_missing_path_error(tmp_path: Path) -> None:
    with pytest.raises(FlatlmError, match=r"data path .*nope.*does not exist.*data.paths"):
        list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "nope" / "*.txt")])))
    with pytest.raises(FlatlmError, match="needs data.paths"):
        list(iter_documents(DataConfig(source="files")))


def test_empty_corpus_error_builds_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("tiny")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], min_chars=10, cache_dir=str(tmp_path / "c"))
    with pytest.raises(FlatlmError, match="corpus is empty after filtering.*2 dropped.*data.min_chars=10"):
        load_or_build(cfg)
    left = [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no half-built cache or tokenizer left behind (only the builders' lock files)


def test_stdlib_corpus_found() -> None:
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_cache_built_once_and_reused(text_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="files", paths=[str(text_corpus)], vocab_size=400, cache_dir=str(tmp_path / "c"))
    logs: list[str] = []
    a = load_or_build(cfg, log=logs.append)
    b = load_or_build(cfg, log=logs.append)
    assert a.path == b.path and len(logs) == 2  # train + tokenize, logged once
    assert a.num_documents == 60
    assert a.tokens[a.offsets[1] - 1] == a.tokenizer.eos_id
    doc0 = a.tokenizer.decode(a.tokens[a.offsets[0] : a.offsets[1] - 1])
    assert doc0 == make_documents(60)[0]
    # A changed vocabulary is a different cache.
    c = load_or_build(cfg.model_copy(update={"vocab_size": 450}), log=logs.append)
    assert c.path != a.path


# -- chat rows (data.format=chat) ----------------------------------------------------------------------------------


def chat_config(*paths: Path, **extra: object) -> DataConfig:
    return DataConfig(source="files", format="chat", paths=[str(p) for p in paths], **extra)


def test_chat_rows_from_jsonl_json_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "response": "r1"}, {"instruction": "i2", "output": "o2"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "p3", "response": "r3"}]))
    pq.write_table(pa.table({"prompt": ["p4"], "response": ["r4"]}), tmp_path / "c.parquet")
    got = list(iter_rows(chat_config(tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.parquet")))
    assert [w for w, _ in got] == [
        f"{tmp_path / 'a.jsonl'}:1",
        f"{tmp_path / 'a.jsonl'}:2",
        f"{tmp_path / 'b.json'} row 1",
        f"{tmp_path / 'c.parquet'} row 1",
    ]
    assert [r for _, r in got][:2] == rows and got[2][1]["response"] == "r3" and got[3][1]["prompt"] == "p4"
    assert len(list(iter_rows(chat_config(tmp_path / "a.jsonl", max_documents=1)))) == 1
    # the tokenizer of a chat set is trained on its strings, one document per row
    assert list(iter_documents(chat_config(tmp_path / "a.jsonl"))) == ["p1\nr1", "i2\no2"]


def test_chat_rows_errors_name_the_line_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
    with pytest.raises(FlatlmError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_rows(chat_config(bad)))
    bad.write_text('["not", "an", "object"]\n')
    with pytest.raises(FlatlmError, match=r"bad\.jsonl:1: a JSON list, not an object with chat fields"):
        list(iter_rows(chat_config(bad)))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FlatlmError, match=r"notes\.txt is not a table of chat rows.*\.jsonl, \.json or \.parquet"):
        list(iter_rows(chat_config(tmp_path / "notes.txt")))


def test_chat_rows_from_a_local_hf_dataset(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ["ax", "by"]))
    cfg = DataConfig(source="hf", format="chat", name=str(d), split="train")
    got = list(iter_rows(cfg))
    assert [r["response"] for _, r in got] == ["x", "y"] and got[0][0].endswith("row 1")


def test_chat_fingerprint_apart_from_text(jsonl_corpus: Path) -> None:
    """The chat keys enter the source fingerprint only for chat data: text caches keep their keys."""
    text = DataConfig(source="files", paths=[str(jsonl_corpus)])
    assert source_fingerprint(text) == source_fingerprint(text.model_copy(update={"chat_format": "alpaca"}))
    chat = text.model_copy(update={"format": "chat"})
    assert source_fingerprint(chat) != source_fingerprint(text)
    assert source_fingerprint(chat) != source_fingerprint(chat.model_copy(update={"chat_format": "alpaca"}))
