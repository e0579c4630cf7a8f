"""The evaluation text: a seeded choice of documents cut to a token budget, and windows that count every token of
them exactly once, split over ranks without overlap."""

from __future__ import annotations

from pathlib import Path

import torch

from flatlm.data.eval_text import choose_documents, document_batches
from flatlm.data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import make_documents


def _tokenizer(docs: list[str]) -> Tokenizer:
    return Tokenizer(train_tokenizer([line for d in docs for line in d.splitlines()], vocab_size=400))


def test_documents_fill_the_budget_and_the_last_is_cut_at_a_line_end(tmp_path: Path) -> None:
    docs = make_documents(30)
    tok = _tokenizer(docs)
    chosen = choose_documents(docs, tok, 500, seed=3)
    sizes = [len(ids) + 1 for ids in tok.encode(chosen)]
    assert 400 < sum(sizes) <= 500  # at most the budget; a cut line costs less than a line's tokens
    assert all(text in docs for text in chosen[:-1])
    assert chosen[-1] not in docs and chosen[-1].endswith("\n") and any(d.startswith(chosen[-1]) for d in docs)
    assert choose_documents(docs, tok, 500, seed=3) == chosen  # seeded
    assert choose_documents(docs, tok, 500, seed=4) != chosen
    everything = choose_documents(docs, tok, 10**9, seed=3)
    assert sorted(everything) == sorted(docs) and everything[: len(chosen) - 1] == chosen[:-1]


def test_windows_count_every_token_once_and_ranks_split_them() -> None:
    docs = make_documents(5)
    tok = _tokenizer(docs)
    stream = [t for ids in tok.encode(docs) for t in [*ids, tok.eos_id]]
    batches = document_batches(docs, tok, seq_len=16, batch_size=3)
    targets = torch.cat([b.targets[b.loss_mask] for b in batches]).tolist()
    assert targets == stream[1:]  # each target is the next real token, in order, once
    inputs = torch.cat([b.inputs.flatten() for b in batches]).tolist()
    assert inputs[0] == stream[0] and len(inputs) % 16 == 0
    halves = [document_batches(docs, tok, 16, 3, rank=r, world=2) for r in (0, 1)]
    counted = [sum(int(b.loss_mask.sum()) for b in part) for part in halves]
    assert sum(counted) == len(stream) - 1 and min(counted) > 0
    rows = {tuple(row.tolist()) for part in halves for b in part for row in b.inputs}
    assert rows == {tuple(row.tolist()) for b in batches for row in b.inputs}  # the same windows, none twice
