"""Parameter shapes shared by the optimizer benchmark cases."""

from __future__ import annotations


def llama_shapes(hidden: int = 512, layers: int = 8, vocab: int = 4096) -> list[tuple[int, ...]]:
    """The parameter shapes of a Llama (untied embeddings, MLP width ~ 8/3 hidden)."""
    mlp = 256 * ((8 * hidden // 3 + 255) // 256)
    block = [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]
    return [(vocab, hidden), *block * layers, (hidden,), (vocab, hidden)]
