"""Text corruptions (flatlm/data/corrupt.py): identity at rate 0, seeded determinism across processes, the
measured rate of each kind within a binomial tolerance, and the invariants (keyboard neighbours, case, layout)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest

import flatlm.data.corrupt as corrupt_module
from flatlm.data.corrupt import (
    DEFAULT_SUITE,
    KEYBOARD_NEIGHBOURS,
    KINDS,
    Corruption,
    corrupt,
    corrupt_texts,
    parse_spec,
)
from flatlm.errors import FlatlmError

SAMPLE = (
    "def forward(self, x: Tensor) -> Tensor:\n"
    '    """Apply the MLP: W2 GELU(W1 x)."""\n'
    "\th = self.up(x)  # (B, T, 4C)\n\n"
    "    return self.down(F.gelu(h))\r\n"
    "Ünïcode straße ÉTÉ 123 done"
)


def _random_text(n_chars: int, seed: int = 0, *, no_repeats: bool = False) -> str:
    """~n_chars of words of mixed-case letters, digits and symbols, with spaces, tabs and newlines between them."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:()[]#=+-"
    parts: list[str] = []
    size = 0
    while size < n_chars:
        word: list[str] = []
        for _ in range(rng.randint(1, 9)):
            ch = rng.choice(alphabet)
            while no_repeats and word and ch == word[-1]:
                ch = rng.choice(alphabet)
            word.append(ch)
        sep = rng.choice([" ", " ", " ", "  ", "\n", "\n    ", "\t"])
        parts += ["".join(word), sep]
        size += len(word) + len(sep)
    return "".join(parts)


TEXT = _random_text(50_000)


def _within_binomial(changed: int, trials: int, rate: float, sigmas: float = 5.0) -> bool:
    return abs(changed - rate * trials) <= sigmas * math.sqrt(trials * rate * (1 - rate)) + 1


def _whitespace(text: str) -> list[str]:
    return [ch for ch in text if ch.isspace()]


@pytest.mark.parametrize("kind", KINDS)
def test_rate_zero_is_identity_and_seeds_are_deterministic(kind: str) -> None:
    assert corrupt(SAMPLE, Corruption(kind, 0.0), seed=3) == SAMPLE
    c = Corruption(kind, 0.3)
    a, b = corrupt(TEXT[:4000], c, seed=3), corrupt(TEXT[:4000], c, seed=3)
    assert a == b != TEXT[:4000]
    assert corrupt(TEXT[:4000], c, seed=4) != a
    # documents are independent: a document's corruption does not depend on the others or their order
    docs = [TEXT[:500], TEXT[500:1000], TEXT[1000:1500]]
    out = corrupt_texts(docs, c, seed=3)
    assert out[2] == corrupt(docs[2], c, seed=3, index=2) == corrupt_texts([*docs[:2], docs[2]], c, seed=3)[2]
    assert corrupt_texts(["", *docs[1:]], c, seed=3)[1:] == out[1:]
    assert out[0] != corrupt(docs[0], c, seed=3, index=1)  # each index has its own generator


def test_same_seed_same_text_in_another_process() -> None:
    """A salted ``hash()`` (or an unseeded generator) in the seeding would break this under another hash seed.

    The child loads the module from its file, not through ``flatlm.data`` (whose imports pull in torch), and
    reads stdin as bytes (text mode would turn the sample's ``\\r\\n`` into ``\\n``)."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('corrupt', sys.argv[1])\n"
        "mod = sys.modules['corrupt'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "docs = sys.stdin.buffer.read().decode().split('\\x00')\n"
        "print(repr([mod.corrupt_texts(docs, c, seed=11) for c in mod.DEFAULT_SUITE]))\n"
    )
    docs = [SAMPLE, TEXT[:2000], TEXT[2000:3000]]
    here = repr([corrupt_texts(docs, c, seed=11) for c in DEFAULT_SUITE])
    hash_seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    result = subprocess.run(
        [sys.executable, "-c", code, corrupt_module.__file__],
        input="\x00".join(docs),
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == here


def _count_swaps(original: str, out: str) -> tuple[int, int]:
    """(swaps, positions visited) of a swap corruption of a text without repeated neighbours in a word."""
    assert len(out) == len(original)
    swaps = visited = 0
    for a, b in zip(original.split(), out.split(), strict=True):
        j = 0
        while j + 1 < len(a):
            visited += 1
            if a[j] != b[j]:
                assert (a[j], a[j + 1]) == (b[j + 1], b[j])
                swaps += 1
                j += 2
            else:
                j += 1
    return swaps, visited


@pytest.mark.parametrize("rate", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("kind", KINDS)
def test_measured_rate_is_binomial(kind: str, rate: float) -> None:
    text = _random_text(50_000, seed=1, no_repeats=True) if kind == "swap" else TEXT
    out = corrupt(text, Corruption(kind, rate), seed=7)
    non_space = sum(not ch.isspace() for ch in text)
    if kind == "typo":
        assert len(out) == len(text)
        trials = sum(ch.isascii() and ch.isalpha() for ch in text)
        changed = sum(a != b for a, b in zip(text, out, strict=True))
    elif kind == "case":
        assert len(out) == len(text)
        trials = sum(ch.isalpha() for ch in text)
        changed = sum(a != b for a, b in zip(text, out, strict=True))
    elif kind == "delete":
        trials, changed = non_space, len(text) - len(out)
    elif kind == "insert":
        trials, changed = non_space, len(out) - len(text)
    elif kind == "swap":
        changed, trials = _count_swaps(text, out)
    else:
        trials = len(text.split())
        changed = trials - len(out.split())
    assert _within_binomial(changed, trials, rate), (changed, trials, rate)


def test_the_binomial_check_catches_a_wrong_rate() -> None:
    """Planted bug: corrupting at twice the rate (or swapping every position at r/(1+r)) falls outside 5 sigma."""
    out = corrupt(TEXT, Corruption("delete", 0.2), seed=7)
    trials = sum(not ch.isspace() for ch in TEXT)
    assert _within_binomial(len(TEXT) - len(out), trials, 0.2)
    assert not _within_binomial(len(TEXT) - len(out), trials, 0.1)
    assert not _within_binomial(len(TEXT) - len(out), trials, 0.2 / 1.2)


@pytest.mark.parametrize("kind", ["typo", "delete", "insert", "swap", "case"])
def test_character_kinds_never_touch_whitespace(kind: str) -> None:
    for text in (SAMPLE, TEXT):
        out = corrupt(text, Corruption(kind, 0.5), seed=2)
        assert _whitespace(out) == _whitespace(text)
        assert out.count("\n") == text.count("\n")


def test_typo_uses_keyboard_neighbours_and_keeps_case() -> None:
    assert set(KEYBOARD_NEIGHBOURS) == set("abcdefghijklmnopqrstuvwxyz")
    assert KEYBOARD_NEIGHBOURS["s"] == "adewxz" and KEYBOARD_NEIGHBOURS["q"] == "aw"
    assert KEYBOARD_NEIGHBOURS["g"] == "bfhtvy" and KEYBOARD_NEIGHBOURS["m"] == "jkn"
    for key, near in KEYBOARD_NEIGHBOURS.items():  # touching is symmetric
        assert all(key in KEYBOARD_NEIGHBOURS[n] for n in near)
    out = corrupt(TEXT + SAMPLE, Corruption("typo", 1.0), seed=5)
    for a, b in zip(TEXT + SAMPLE, out, strict=True):
        if a.isascii() and a.isalpha():
            assert b.lower() in KEYBOARD_NEIGHBOURS[a.lower()] and b.isupper() == a.isupper()
        else:
            assert a == b  # digits, symbols, non-ASCII letters and whitespace stay


def test_case_flips_only_case() -> None:
    out = corrupt(SAMPLE + TEXT, Corruption("case", 1.0), seed=5)
    assert out.lower() == (SAMPLE + TEXT).lower()
    assert out[: len(SAMPLE)].endswith("üNÏCODE STRAßE été 123 DONE")  # ß has no one-letter upper case


def test_insert_adds_lowercase_letters_after_non_whitespace() -> None:
    out = corrupt(TEXT, Corruption("insert", 0.3), seed=9)
    i = 0
    for ch in out:  # walk the original through the output: every extra character is a lowercase letter
        if i < len(TEXT) and ch == TEXT[i]:
            i += 1
        else:
            assert ch in "abcdefghijklmnopqrstuvwxyz" and not TEXT[i - 1].isspace()
    assert i == len(TEXT)


def test_drop_word_keeps_lines_and_indentation() -> None:
    text = "def f(x):\n    y = x + 1\n\n\treturn  y\r\n        \nlast line here\n"
    out = corrupt(text, Corruption("drop_word", 1.0), seed=0)
    assert out == "\n\n\n\r\n        \n\n"  # every line ending kept; a whitespace-only line untouched
    for seed in range(30):
        out = corrupt(text, Corruption("drop_word", 0.4), seed=seed)
        assert out.splitlines(keepends=True)[1].startswith("    ") or out.splitlines()[1] == ""
        assert [line[-1:] for line in out.splitlines(keepends=True)] == ["\n"] * 6
        for line_in, line_out in zip(text.splitlines(), out.splitlines(), strict=True):
            words_in, words_out = line_in.split(), line_out.split()
            it = iter(words_in)
            assert all(w in it for w in words_out)  # the kept words, in order
            assert (
                line_out == ""
                or line_out[: len(line_out) - len(line_out.lstrip())]
                == (line_in[: len(line_in) - len(line_in.lstrip())])
            )
    outcomes = {"a b\tc", "a b", "a\tc", "b\tc", "a", "b", "c", ""}  # a dropped word takes the space before it
    assert {corrupt("a b\tc", Corruption("drop_word", 0.5), seed=s) for s in range(200)} == outcomes


def test_names_and_specs() -> None:
    assert Corruption("typo", 0.05).name == "typo:0.05" and Corruption("case", 1).name == "case:1"
    assert parse_spec("typo:0.05, delete:0.05,drop_word:0.1") == [
        Corruption("typo", 0.05),
        Corruption("delete", 0.05),
        Corruption("drop_word", 0.1),
    ]
    assert parse_spec("default") == DEFAULT_SUITE
    assert {c.kind for c in DEFAULT_SUITE} == set(KINDS) and len(DEFAULT_SUITE) == 2 * len(KINDS)
    assert parse_spec(",".join(c.name for c in DEFAULT_SUITE)) == DEFAULT_SUITE  # names read back
    assert [c.name for c in parse_spec("typo:0.02,typo:0.1")] == ["typo:0.02", "typo:0.1"]
    assert parse_spec("default,typo:0.3")[-1] == Corruption("typo", 0.3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("typos:0.1", "unknown corruption 'typos' (did you mean 'typo'?)"),
        ("typo", "has no rate"),
        ("delete:", "has no rate"),
        ("typo:1.5", "must be a number in [0, 1]"),
        ("typo:-0.1", "must be a number in [0, 1]"),
        ("typo:nan", "must be a number in [0, 1]"),
        ("typo:lots", "is not a number"),
        ("", "spec is empty"),
        ("  ", "spec is empty"),
        ("typo:0.1,,case:0.1", "empty item"),
        ("typo:0.1,typo:0.1", "appears twice"),
    ],
)
def test_spec_errors_name_the_item_and_the_form(spec: str, message: str) -> None:
    with pytest.raises(FlatlmError) as err:
        parse_spec(spec)
    text = str(err.value)
    assert message in text and "\n" not in text
    if message != "appears twice":
        assert "KIND:RATE" in text
    if spec.startswith("typos"):
        assert "valid kinds: typo, delete, insert, swap, case, drop_word" in text


def test_corruption_validates_itself() -> None:
    with pytest.raises(FlatlmError, match="unknown corruption 'drop'"):
        Corruption("drop", 0.1)
    with pytest.raises(FlatlmError, match=r"in \[0, 1\]"):
        Corruption("case", 2.0)
