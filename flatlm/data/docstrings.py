"""The ``stdlib_docs`` chat set: "What does `module.name` do?" answered by the first paragraph of its docstring.

Built from this Python's standard-library sources by parsing them (``ast``; nothing is imported, so no module's
side effects run), for the public top-level functions and classes of public modules and the public methods
of those classes. Tests, demos and private
modules (a ``_`` anywhere in the dotted name) are left out, as are answers too short to teach anything
(fewer than ``MIN_WORDS`` words) or too long for a small model's sequence (more than ``MAX_CHARS`` characters).
Files are read in sorted order and each module's definitions in source order, so the set is the same on every
run of one Python (a few thousand rows, about 2 s).
"""

from __future__ import annotations

import ast
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from flatlm.data.sources import stdlib_files

SKIP_PARTS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "__phello__", "pydoc_data"}
"""Folders whose modules are tests, demos or tooling, not the library."""
MIN_WORDS = 4
MAX_CHARS = 400
STDLIB_DOCS_VERSION = 1
"""Bump when the rules above change: part of the key of cached stdlib_docs examples."""


def module_name(path: Path, root: Path) -> str | None:
    """``json/decoder.py`` -> ``json.decoder``; None for a private or skipped module."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or p in SKIP_PARTS or "-" in p for p in parts):
        return None
    return ".".join(parts)


def first_paragraph(doc: str) -> str | None:
    """The docstring's first paragraph on one line, None when it is trivial or too long."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    if len(text.split()) < MIN_WORDS or len(text) > MAX_CHARS:
        return None
    return text


def _documented(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """Public functions and classes of ``body`` with a usable docstring, and the public methods of those classes."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if doc and (answer := first_paragraph(doc)):
            yield prefix + node.name, answer
        if isinstance(node, ast.ClassDef) and not prefix:  # methods one level down, not classes nested in methods
            yield from _documented(node.body, f"{node.name}.")


def question(name: str) -> str:
    return f"What does `{name}` do?"


def docstring_rows() -> Iterator[dict[str, str]]:
    """The set's rows, ``{"prompt", "response"}``, in a deterministic order (files sorted, definitions in order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()  # a property's getter and setter share a name
    for path in stdlib_files():
        module = module_name(path, root)
        if module is None:
            continue
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():  # old modules' invalid escape sequences warn when parsed
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, OSError):  # e.g. the standard library's deliberately broken test inputs
            continue
        for name, answer in _documented(tree.body, ""):
            if f"{module}.{name}" in seen:
                continue
            seen.add(f"{module}.{name}")
            yield {"prompt": question(f"{module}.{name}"), "response": answer}
