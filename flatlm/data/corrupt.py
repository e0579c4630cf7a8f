"""Seeded text corruptions: the language counterpart of ImageNet-C (Hendrycks & Dietterich, 2019).

A :class:`Corruption` is a kind and a rate; the rate is the probability with which each *eligible unit* of a
document is corrupted, independently of the others. The kinds and their eligible units:

- ``typo``: each ASCII letter is, with probability ``rate``, replaced by one of its neighbours on a QWERTY
  keyboard (drawn uniformly from :data:`KEYBOARD_NEIGHBOURS`); an upper-case letter stays upper-case.
  Digits, punctuation and non-ASCII letters are never changed.
- ``delete``: each non-whitespace character is deleted with probability ``rate``.
- ``insert``: after each non-whitespace character, with probability ``rate``, a lowercase ASCII letter drawn
  uniformly from a-z is inserted (uniform, not a keyboard neighbour: the inserted letter need not be near the
  character before it, which may be a digit or a symbol).
- ``swap``: within a word (a maximal run of non-whitespace characters), positions are visited left to right;
  each position that has a right neighbour in the word and is not already part of a swapped pair swaps with
  that neighbour with probability ``rate``. After a swap at ``j`` the walk resumes at ``j + 2``, so a swapped
  pair is never swapped again. Swapping two equal characters (``ll``) leaves the text unchanged.
- ``case``: each cased letter (one whose ``str.swapcase`` is a single different character) has its case
  flipped with probability ``rate``.
- ``drop_word``: each whitespace-separated word is dropped with probability ``rate``. The text is processed
  line by line so the layout survives: every line ending is kept, a line's leading indentation is kept,
  a dropped word takes the whitespace before it with it (the first word of a line takes the whitespace after
  it instead, so the next word moves up to the indentation), and a line whose words are all dropped becomes
  an empty line.

Whitespace is never eligible: the character kinds never add, remove or change a whitespace character, so
the sequence of whitespace (and with it the line structure) of every document survives; ``drop_word`` keeps
every line ending.

Determinism: document ``i`` of :func:`corrupt_texts` is corrupted by a ``random.Random`` seeded with the
SHA-256 of the string ``"{seed}|{kind}|{rate}|{i}"`` (never Python's per-process salted ``hash``), so a seed
gives the same text in every process and on every rank, and each document's corruption is independent of the
others and of the order in which they are corrupted. :func:`corrupt` corrupts one text as document ``index``.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flatlm.errors import FlatlmError, did_you_mean

KINDS = ("typo", "delete", "insert", "swap", "case", "drop_word")

_SPEC_FORM = "write KIND:RATE items separated by commas (e.g. 'typo:0.05,drop_word:0.1'), or 'default'"

# QWERTY letter rows; each row is shifted right of the one above it (by about a quarter and a half key), so
# the key at column c touches columns c and c+1 of the row above and c-1 and c of the row below.
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Map each letter a-z to the letters on the keys that touch it (same row, and the rows above and below)."""
    table: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, key in enumerate(row):
            near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
            if r > 0:
                near += [_ROWS[r - 1][j] for j in (c, c + 1) if j < len(_ROWS[r - 1])]
            if r + 1 < len(_ROWS):
                near += [_ROWS[r + 1][j] for j in (c - 1, c) if 0 <= j < len(_ROWS[r + 1])]
            table[key] = "".join(sorted(near))
    return table


KEYBOARD_NEIGHBOURS: dict[str, str] = _keyboard_neighbours()
"""For each lowercase letter, the letters whose keys touch it on a QWERTY keyboard (e.g. ``s`` -> ``adewxz``)."""

_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _format_rate(rate: float) -> str:
    short = format(rate, "g")
    return short if float(short) == rate else repr(rate)


@dataclass(frozen=True)
class Corruption:
    """One corruption: a kind from :data:`KINDS` and the probability ``rate`` in [0, 1] per eligible unit."""

    kind: str
    rate: float

    def __post_init__(self) -> None:
        _check(self.kind, self.rate, f"{self.kind}:{self.rate}")
        object.__setattr__(self, "rate", float(self.rate))

    @property
    def name(self) -> str:
        """``kind:rate``, e.g. ``typo:0.05``; :func:`parse_spec` reads it back to the same corruption."""
        return f"{self.kind}:{_format_rate(self.rate)}"


def _check(kind: str, rate: float, item: str) -> None:
    if kind not in KINDS:
        raise FlatlmError(
            f"unknown corruption {kind!r}{did_you_mean(kind, KINDS)} in {item!r}; "
            f"valid kinds: {', '.join(KINDS)}; {_SPEC_FORM}"
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 <= rate <= 1:
        raise FlatlmError(f"corruption rate in {item!r} must be a number in [0, 1]; {_SPEC_FORM}")


DEFAULT_SUITE: list[Corruption] = [
    Corruption(kind, rate) for kind in KINDS for rate in ((0.05, 0.2) if kind == "drop_word" else (0.02, 0.1))
]
"""Every kind at a mild and a strong rate: 0.02 and 0.1 per character, 0.05 and 0.2 per word for drop_word."""


def parse_spec(spec: str) -> list[Corruption]:
    """Read ``"typo:0.05,delete:0.05,drop_word:0.1"`` into corruptions, in order.

    ``default`` (alone or as one item) stands for :data:`DEFAULT_SUITE`. A kind may repeat with different
    rates; the same kind and rate twice, a kind without a rate, an unknown kind, a rate outside [0, 1] and
    an empty spec or item are errors that name the item, the valid kinds and the form.
    """
    if not spec.strip():
        raise FlatlmError(f"the corruption spec is empty; {_SPEC_FORM}")
    out: list[Corruption] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise FlatlmError(f"empty item in corruption spec {spec!r}; {_SPEC_FORM}")
        if item == "default":
            found = list(DEFAULT_SUITE)
        else:
            kind, sep, rate_text = (part.strip() for part in item.partition(":"))
            if not sep or not rate_text:
                hint = f"; valid kinds: {', '.join(KINDS)}" if kind not in KINDS else ""
                raise FlatlmError(f"corruption {item!r} has no rate{hint}; {_SPEC_FORM}")
            try:
                rate = float(rate_text)
            except ValueError:
                raise FlatlmError(f"corruption rate in {item!r} is not a number; {_SPEC_FORM}") from None
            _check(kind, rate, item)
            found = [Corruption(kind, rate)]
        for corruption in found:
            if corruption in out:
                raise FlatlmError(f"corruption {corruption.name!r} appears twice in {spec!r}; list it once")
            out.append(corruption)
    return out


def _rng(seed: int, corruption: Corruption, index: int) -> random.Random:
    """The generator of document ``index``: a function of (seed, kind, rate, index) only, in every process."""
    key = f"{seed}|{corruption.kind}|{corruption.name}|{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _typo(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for ch in text:
        low = ch.lower()
        if ch.isascii() and low in KEYBOARD_NEIGHBOURS and rng.random() < rate:
            new = rng.choice(KEYBOARD_NEIGHBOURS[low])
            ch = new.upper() if ch.isupper() else new
        out.append(ch)
    return "".join(out)


def _delete(text: str, rate: float, rng: random.Random) -> str:
    return "".join(ch for ch in text if ch.isspace() or rng.random() >= rate)


def _insert(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for ch in text:
        out.append(ch)
        if not ch.isspace() and rng.random() < rate:
            out.append(rng.choice(_LOWER))
    return "".join(out)


def _swap(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    j = 0
    while j + 1 < len(chars):
        if chars[j].isspace() or chars[j + 1].isspace():  # no right neighbour in this word
            j += 1
        elif rng.random() < rate:
            chars[j], chars[j + 1] = chars[j + 1], chars[j]
            j += 2
        else:
            j += 1
    return "".join(chars)


def _case(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for ch in text:
        flipped = ch.swapcase()
        if len(flipped) == 1 and flipped != ch and rng.random() < rate:
            ch = flipped
        out.append(ch)
    return "".join(out)


_WORD = re.compile(r"\S+")


def _drop_word(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        ending = line[len(body) :]
        words = list(_WORD.finditer(body))
        if not words:
            out.append(line)
            continue
        kept = [m for m in words if rng.random() >= rate]
        if not kept:
            out.append(ending)
            continue
        # the indentation, then each kept word after the whitespace that preceded it (the first after none)
        pieces = [body[: words[0].start()], kept[0].group()]
        for m in kept[1:]:
            before = body[: m.start()]
            pieces += [before[len(before.rstrip()) :], m.group()]
        pieces.append(body[words[-1].end() :])
        out.append("".join(pieces) + ending)
    return "".join(out)


_APPLY: dict[str, Callable[[str, float, random.Random], str]] = {
    "typo": _typo,
    "delete": _delete,
    "insert": _insert,
    "swap": _swap,
    "case": _case,
    "drop_word": _drop_word,
}


def corrupt(text: str, corruption: Corruption, seed: int, *, index: int = 0) -> str:
    """Corrupt ``text`` as document ``index`` of a corpus (what :func:`corrupt_texts` gives it at that index)."""
    if corruption.rate == 0:
        return text
    return _APPLY[corruption.kind](text, corruption.rate, _rng(seed, corruption, index))


def corrupt_texts(texts: Sequence[str], corruption: Corruption, seed: int) -> list[str]:
    """Corrupt every document; document ``i`` uses its own generator seeded from (seed, kind, rate, i)."""
    return [corrupt(text, corruption, seed, index=i) for i, text in enumerate(texts)]
