"""Shared fixtures: a private cache directory and small corpora made on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenizers and token caches go to a per-session directory, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLATLM_CACHE", str(tmp_path_factory.mktemp("flatlm-cache")))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    mp.undo()


WORDS = (
    "the model learns to predict the next token from the previous ones and the optimizer moves the weights "
    "towards flat regions of the loss where small perturbations change little def return class import for in"
).split()


def make_documents(n: int, seed: int = 0, min_words: int = 30, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        lines = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
        docs.append(f"# document {i}\n" + "\n".join(lines) + "\n")
    return docs


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A directory of 60 small .txt documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, doc in enumerate(make_documents(60)):
        (root / f"doc{i:03d}.txt").write_text(doc)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 small .txt documents shared by a test module, so its runs share one tokenizer and token cache."""
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_documents(60)):
        (root / f"doc{i:03d}.txt").write_text(doc)
    return root


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(make_documents(40, seed=1))))
    return path


def tiny_overrides(out: Path, corpus: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long run on ``corpus`` (a directory of .txt files)."""
    base = {
        "output_dir": str(out),
        "data.source": "files",
        "data.paths": f"[{corpus}/*.txt]",
        "data.vocab_size": 400,
        "data.seq_len": 32,
        "data.val_fraction": 0.1,
        "model.overrides.num_hidden_layers": 2,
        "model.overrides.hidden_size": 64,
        "model.overrides.intermediate_size": 128,
        "train.max_steps": 6,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "train.progress_bar": False,
        "train.tensorboard": False,
        "train.plot": False,
        "schedule.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def chat_overrides(out: Path, data: Path, **extra: object) -> list[str]:
    """A one-step chat run (tiny model) on the rows ``data``."""
    base: dict[str, object] = {
        "output_dir": str(out),
        "data.source": "files",
        "data.format": "chat",
        "data.paths": f"[{data}]",
        "data.vocab_size": 300,
        "data.seq_len": 64,
        "data.val_fraction": 0.2,
        "model.overrides.num_hidden_layers": 1,
        "model.overrides.hidden_size": 32,
        "model.overrides.intermediate_size": 64,
        "train.max_steps": 1,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.progress_bar": False,
        "train.tensorboard": False,
        "train.plot": False,
        "schedule.warmup_steps": 1,
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]
