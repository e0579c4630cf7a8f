"""A Hugging Face tokenizer (any local ``AutoTokenizer`` directory) with the interface of flatlm's ``Tokenizer``.

Fine-tuning starts from a pretrained model and must encode with the tokenizer its embedding was trained with:
``model.init_from=DIR data.tokenizer=DIR``. This wrapper gives the token cache, the run directory and chat
rendering what they read of flatlm's sentencepiece ``Tokenizer`` (``sha256``, ``vocab_size``, ``eos_id``,
``bos_id``, ``encode``, ``decode``, ``save``, ``chat_template``, ``kind``), and the wrapped tokenizer as ``hf`` for
what only transformers does (``apply_chat_template``). Nothing is downloaded: ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flatlm.errors import FlatlmError

RUNTIME_KEYS = ("truncation", "padding")
"""Keys of ``tokenizer.json`` that are call-time settings (changed by a call with ``padding=True``), not identity."""


class HFTokenizer:
    """A ``transformers`` tokenizer seen as a flatlm tokenizer. Encoding never adds special tokens: flatlm
    appends EOS to every document itself, and chat templates write their own BOS/EOS strings."""

    kind = "hf"

    def __init__(self, hf: Any, source: str = "the tokenizer"):
        if hf.eos_token_id is None:
            raise FlatlmError(
                f"{source} has no eos token (flatlm ends every document and answer with it); use a tokenizer "
                "whose tokenizer_config.json sets eos_token"
            )
        self.hf = hf
        """The wrapped ``PreTrainedTokenizer(Fast)``."""
        self._identify()

    def _identify(self) -> None:
        self.sha256 = hashlib.sha256(canonical_serialization(self.hf).encode()).hexdigest()
        """The tokenizer's identity (its vocabulary, merges, normalizer, special tokens and chat template, not
        the file bytes): equal after save/load, part of every token cache's key."""
        self.encoding_sha256 = hashlib.sha256(
            canonical_serialization(self.hf, chat_template=False).encode()
        ).hexdigest()
        """The identity of its ids alone (no chat template): whether two tokenizers give text the same ids."""

    def set_chat_template(self, template: str) -> None:
        """Make ``template`` the tokenizer's own (what ``save`` writes and ``chat_template`` returns): a fine-tuning
        run's template (its ``chat_template.jinja``) over the one the tokenizer was given. The identity follows."""
        self.hf.chat_template = template
        self._identify()

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = Path(path).expanduser()
        if not path.is_dir():
            raise FlatlmError(f"tokenizer directory {str(path)!r} does not exist; fix data.tokenizer")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise FlatlmError(
                f"{str(path)!r} is not a loadable Hugging Face tokenizer ({type(exc).__name__}: {exc}); fix "
                "data.tokenizer"
            ) from None
        if isinstance(hf, bool) or not hasattr(hf, "eos_token_id"):  # AutoTokenizer can return a non-tokenizer
            raise FlatlmError(f"{str(path)!r} holds no Hugging Face tokenizer; fix data.tokenizer")
        return cls(hf, source=repr(str(path)))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer directory whole or not at all (``save_pretrained`` into a temporary directory,
        renamed into place). ``path`` must not exist yet."""
        path = Path(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            self.hf.save_pretrained(str(tmp))
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def vocab_size(self) -> int:
        """Ids the embedding must hold: the base vocabulary plus added tokens (``len``, not ``hf.vocab_size``)."""
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> int:
        """-1 when the tokenizer has no BOS token (as sentencepiece says of a model without one)."""
        return -1 if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (its default one when it names several), or None."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.hf(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.hf.decode([int(i) for i in ids])


def canonical_serialization(hf: Any, *, chat_template: bool = True) -> str:
    """What identifies ``hf``'s encoding, as one deterministic string: a fast tokenizer's full ``tokenizer.json``
    (without its call-time truncation/padding settings), else the sorted vocabulary and the class; plus the special
    tokens and (unless ``chat_template=False``) the chat template."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        model: Any = json.loads(backend.to_str())
        for key in RUNTIME_KEYS:
            model.pop(key, None)
    else:  # a slow (Python) tokenizer: its vocabulary is what it encodes to
        model = {"class": type(hf).__name__, "vocab": sorted(hf.get_vocab().items())}
    template = getattr(hf, "chat_template", None) if chat_template else None
    parts = {
        "tokenizer": model,
        "special_tokens": {k: str(v) for k, v in sorted(hf.special_tokens_map.items())},
        "chat_template": template,
    }
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)
