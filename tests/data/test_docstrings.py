"""The stdlib_docs chat set: parsed (never imported), deterministic, a few thousand sensible rows, fast."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from flatlm.data import docstrings
from flatlm.data.docstrings import MAX_CHARS, MIN_WORDS, docstring_rows, first_paragraph, module_name


@pytest.fixture(scope="module")
def built() -> tuple[list[dict[str, str]], float]:
    """The set, and the CPU seconds it took to build (module scope: built once for these tests). CPU time, not wall
    time: the test machine's cores are shared, and a busy neighbour must not fail the speed check."""
    assert "antigravity" not in sys.modules  # importing it opens a web browser
    start = time.process_time()
    rows = list(docstring_rows())
    return rows, time.process_time() - start


@pytest.fixture
def rows(built: tuple[list[dict[str, str]], float]) -> list[dict[str, str]]:
    return built[0]


@pytest.mark.timeout(60)
def test_a_few_thousand_rows_deterministic_and_fast(
    built: tuple[list[dict[str, str]], float], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, seconds = built
    assert 1000 <= len(first) <= 20000
    assert seconds < 10, f"building stdlib_docs took {seconds:.1f} s of CPU"
    # rebuilt from every fifth file (a fifth of the cost): exactly the full set's rows of those modules, in order
    files = docstrings.stdlib_files()
    sample = files[::5]
    monkeypatch.setattr(docstrings, "stdlib_files", lambda: sample)
    again = list(docstring_rows())
    root = Path(docstrings.sysconfig.get_paths()["stdlib"])
    every = {m for p in files if (m := module_name(p, root))}
    sampled = {m for p in sample if (m := module_name(p, root))}

    def module_of(row: dict[str, str]) -> str:  # the longest module name the question's name starts with
        name = row["prompt"][len("What does `") : -len("` do?")]
        return max((m for m in every if name.startswith(m + ".")), key=len)

    assert again and again == [r for r in first if module_of(r) in sampled]


def test_rows_are_questions_and_first_paragraphs(rows: list[dict[str, str]]) -> None:
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    assert all(p.startswith("What does `") and p.endswith("` do?") for p in prompts)
    assert all(len(r["response"].split()) >= MIN_WORDS and len(r["response"]) <= MAX_CHARS for r in rows)
    assert all("\n" not in r["response"] for r in rows)
    names = [p[len("What does `") : -len("` do?")] for p in prompts]
    assert not any(part.startswith("_") for n in names for part in n.split("."))
    assert not any(n.startswith(("test.", "idlelib.", "lib2to3.")) for n in names)
    # a known public function and a method, answered by their own docstrings
    by_name = dict(zip(names, (r["response"] for r in rows), strict=True))
    import json

    assert by_name["json.dumps"] == " ".join(json.dumps.__doc__.strip().split("\n\n")[0].split())
    assert any(n.startswith("json.decoder.JSONDecoder.") for n in names)


def test_no_module_is_imported(rows: list[dict[str, str]]) -> None:
    """Parsing only: modules that were not loaded stay unloaded (importing would run their side effects)."""
    assert any(r["prompt"].startswith("What does `antigravity.") for r in rows)
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_first_paragraph_and_module_names() -> None:
    assert first_paragraph("Return the sum\n    of two numbers.\n\nMore detail.") == "Return the sum of two numbers."
    assert first_paragraph("Deprecated.") is None  # trivial
    assert first_paragraph(("word " * 200).strip()) is None  # too long
    root = Path("/lib")
    assert module_name(root / "json" / "decoder.py", root) == "json.decoder"
    assert module_name(root / "json" / "__init__.py", root) == "json"
    assert module_name(root / "_pydecimal.py", root) is None
    assert module_name(root / "test" / "test_json.py", root) is None
    assert module_name(root / "concurrent" / "futures" / "_base.py", root) is None


def test_a_file_that_does_not_parse_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "good.py").write_text('def shout(x):\n    """Return x in capitals, loudly and clearly."""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    monkeypatch.setattr(docstrings, "stdlib_files", lambda: sorted(tmp_path.glob("*.py")))
    monkeypatch.setattr(docstrings.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert list(docstring_rows()) == [
        {"prompt": "What does `good.shout` do?", "response": "Return x in capitals, loudly and clearly."}
    ]
