"""SFT batches through the real step: packed examples never see each other, padding never changes a loss, and a
short chat run trains, evaluates on answer tokens and writes its template."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flatlm.train.step as step
from flatlm.data.batch import Batch
from flatlm.data.chat import BUILTIN_TEMPLATE
from flatlm.data.sft import Examples, PackedExamples, PaddedExamples, pack_rows
from tests.conftest import chat_overrides
from tests.data.test_chat import CHATML

VOCAB = 64
EOS = 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def example(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids ending in EOS; the second half trainable (the "answer")."""
    rng = np.random.default_rng(seed)
    ids = np.r_[rng.integers(3, VOCAB, n - 1), EOS].astype(np.int64)
    trainable = np.arange(n) >= n // 2
    return ids, trainable


def examples(*pairs: tuple[np.ndarray, np.ndarray]) -> Examples:
    return Examples([p[0] for p in pairs], [p[1] for p in pairs])


def logits_and_losses(model: LlamaForCausalLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits the step's forward saw [B, L, V] and its per-sequence loss sums [B] (step.token_losses)."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.detach()))
    try:
        with torch.no_grad():
            sums = step.token_losses(model, batch, bf16=False).sums
    finally:
        hook.remove()
    return seen[0], sums


def per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy of one sequence: logits [L, V], targets [L] -> [L]."""
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def packed_abc(b_seed: int) -> tuple[PackedExamples, list[slice]]:
    """A, B, C packed into one row of 48 (with padding); the slice of each example in the row."""
    a, b, c = example(1, 12), example(b_seed, 14), example(3, 10)
    view = PackedExamples(examples(a, b, c), seq_len=48, pad_id=EOS)
    assert len(view) == 1
    return view, [slice(0, 11), slice(11, 24), slice(24, 33)]


def leak(model: LlamaForCausalLM) -> tuple[float, float, float]:
    """Max |change| of A's, B's and C's logits when only B's tokens change."""
    (view1, spans), (view2, _) = packed_abc(2), packed_abc(22)
    l1, _ = logits_and_losses(model, view1.batch([0]))
    l2, _ = logits_and_losses(model, view2.batch([0]))
    return tuple(float((l1[0, s] - l2[0, s]).abs().max()) for s in spans)  # type: ignore[return-value]


@pytest.mark.timeout(60)
def test_packed_examples_do_not_see_each_other() -> None:
    model = tiny_llama()
    a, b, c = leak(model)
    assert a < 1e-6 and c < 1e-6, (a, c)
    assert b > 1e-3
    # the per-token losses of A and C too
    (view1, spans), (view2, _) = packed_abc(2), packed_abc(22)
    b1, b2 = view1.batch([0]), view2.batch([0])
    t1 = per_token(logits_and_losses(model, b1)[0][0], b1.targets[0])
    t2 = per_token(logits_and_losses(model, b2)[0][0], b2.targets[0])
    for s in (spans[0], spans[2]):
        assert torch.allclose(t1[s], t2[s], atol=1e-6, rtol=0)


@pytest.mark.timeout(60)
def test_without_the_mask_packing_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: position ids only, no attention mask (plain causal attention across the row)."""
    monkeypatch.setattr(step, "packed_attention_mask", lambda position_ids: None)
    _, _, c = leak(tiny_llama())
    assert c > 1e-3, "C must see B's tokens when nothing confines attention"


@pytest.mark.timeout(60)
def test_a_packed_example_equals_the_example_alone() -> None:
    model = tiny_llama()
    view, spans = packed_abc(2)
    packed, _ = logits_and_losses(model, view.batch([0]))
    for k, s in enumerate(spans):
        ids, trainable = view.examples.ids[k], view.examples.trainable[k]
        alone = Batch(
            torch.from_numpy(ids[None, :-1]), torch.from_numpy(ids[None, 1:]), torch.from_numpy(trainable[None, 1:])
        )
        logits, _ = logits_and_losses(model, alone)
        assert torch.allclose(packed[0, s], logits[0], atol=1e-5, rtol=0), k
    batch = view.batch([0])
    assert batch.position_ids[0, 33:].tolist() == list(range(15))  # the padding: its own segment from 0
    assert not batch.loss_mask[0, 33:].any() and (batch.inputs[0, 33:] == EOS).all()


@pytest.mark.timeout(60)
def test_padded_rows_lose_what_each_example_loses_alone() -> None:
    model = tiny_llama()
    view = PaddedExamples(examples(example(1, 12), example(2, 30), example(3, 7)), seq_len=48, pad_id=EOS)
    batch = view.batch([0, 1, 2])
    assert batch.position_ids is None and batch.inputs.shape == (3, 29)
    _, sums = logits_and_losses(model, batch)
    for k in range(3):
        ids, trainable = view.examples.ids[k], view.examples.trainable[k]
        alone = Batch(
            torch.from_numpy(ids[None, :-1]), torch.from_numpy(ids[None, 1:]), torch.from_numpy(trainable[None, 1:])
        )
        _, alone_sum = logits_and_losses(model, alone)
        assert torch.allclose(sums[k], alone_sum[0], atol=1e-5, rtol=0), k
    assert batch.counted().tolist() == [int(view.examples.trainable[k][1:].sum()) for k in range(3)]


def test_pack_rows_is_greedy_in_order() -> None:
    assert pack_rows([5, 4, 3, 8, 1], seq_len=10) == [[0, 1], [2], [3, 4]]
    assert pack_rows([10, 10], seq_len=10) == [[0], [1]]
    view = PackedExamples(examples(example(1, 6), example(2, 5), example(3, 11)), seq_len=10, pad_id=EOS)
    assert len(view) == 2 and view.num_tokens == 5 + 4 + 10
    assert view.padding_fraction == pytest.approx(1 - 19 / 20)
    batch = view.batch([0, 1])
    assert batch.inputs.shape == (2, 10)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]


def test_input_tokens_count_the_examples_not_the_padding() -> None:
    """Catches: tokens (and tokens_per_s) counted as rows x seq_len (or a padded batch's width) for chat data."""
    ex = examples(example(1, 12), example(2, 30), example(3, 7), example(4, 20))  # inputs: 11, 29, 6, 19
    packed = PackedExamples(ex, seq_len=32, pad_id=EOS)
    assert packed.rows == [[0], [1], [2, 3]]
    assert packed.input_tokens([0, 2]) == 11 + 6 + 19 and packed.input_tokens(range(3)) == packed.num_tokens == 65
    assert packed.input_tokens(np.array([2, 2])) == 50  # a row drawn twice (a second epoch) counts twice
    padded = PaddedExamples(ex, seq_len=32, pad_id=EOS)
    batch = padded.batch([0, 1, 2])
    assert batch.inputs.numel() == 3 * 29 and padded.input_tokens([0, 1, 2]) == 11 + 29 + 6
    for view in (packed, padded):  # what each batch holds besides padding: its examples' inputs
        for rows in ([0], [1, 2], [0, 1, 2]):
            counted = sum(len(ex.ids[i]) - 1 for r in rows for i in (packed.rows[r] if view is packed else [r]))
            assert view.input_tokens(rows) == counted


# -- a short chat run through the CLI's train ----------------------------------------------------------------------


def chat_jsonl(path: Path, n: int = 40) -> Path:
    """``n`` tiny conversations in all three shapes."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    lines = []
    for i in range(n):
        w, v = words[i % len(words)], words[(3 * i + 1) % len(words)]
        if i % 3 == 0:
            row = {"prompt": f"Say {w} twice.", "response": f"{w} {w}"}
        elif i % 3 == 1:
            row = {"instruction": f"Join {w} and {v}.", "input": "", "output": f"{w}-{v}"}
        else:
            row = {
                "messages": [{"role": "user", "content": f"Spell {v}."}, {"role": "assistant", "content": " ".join(v)}]
            }
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packing", [True, False])
def test_chat_run_writes_template_and_answer_loss(
    tmp_path: Path, packing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from flatlm.config import load_config
    from flatlm.data.splits import load_data
    from flatlm.data.tokenizer import run_tokenizer_path
    from flatlm.train.loop import train
    from flatlm.train.metrics import read_jsonl

    rows = chat_jsonl(tmp_path / "chat.jsonl")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    out = tmp_path / "run"
    extra = {
        "data.chat_template": str(template) if packing else "builtin",
        "data.packing": packing,
        "train.max_steps": 3,
        "train.eval_every": 3,
        "train.eval_batches": 2,
    }
    cfg = load_config(None, chat_overrides(out, rows, **extra))
    with caplog.at_level(logging.WARNING, logger="flatlm"):
        train(cfg)
    assert any("training a tokenizer on the chat text" in r.getMessage() for r in caplog.records)
    written = (out / "chat_template.jinja").read_text()
    assert written == (CHATML if packing else BUILTIN_TEMPLATE)
    evals = read_jsonl(out / "eval.jsonl")
    assert evals and all(np.isfinite(e["val_loss"]) and e["val_loss"] > 0 for e in evals)
    steps = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3]
    # tokens: the real input tokens of each step's global batch, not global_batch x seq_len with the padding
    from flatlm.data import GlobalBatchSampler
    from flatlm.data.splits import data_seed

    trained = load_data(cfg, run_tokenizer_path(out)).train
    sampler = GlobalBatchSampler(len(trained), 4, data_seed(cfg))
    seen = np.cumsum([trained.input_tokens(sampler.global_batch(s)) for s in range(3)]).tolist()
    assert [r["tokens"] for r in steps] == seen and seen[-1] <= 3 * 4 * 64
    assert packing or seen[-1] < 3 * 4 * 64  # one example per row: padded to the batch's longest, never counted
    # what val_loss averages: the answers' tokens (and their EOS) of the validation examples, nothing else
    data = load_data(cfg, run_tokenizer_path(out))
    batch = data.val.batch(range(len(data.val)))
    answers = sum(int(t[1:].sum()) for t in data.val.examples.trainable)
    assert int(batch.counted().sum()) == answers < int((batch.inputs != -1).sum()) // 2
    if packing:  # fine-tune that run as configs/sft-tiny.yaml does: its weights and its tokenizer, by directory
        caplog.clear()
        more = {**extra, "model.init_from": str(out), "data.tokenizer": str(out), "train.max_steps": 1}
        with caplog.at_level(logging.WARNING, logger="flatlm"):
            train(load_config(None, chat_overrides(tmp_path / "sft", rows, **more)))
        assert not any("training a tokenizer" in r.getMessage() for r in caplog.records)
        assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()


def test_examples_are_cached_checked_and_rebuilt(tmp_path: Path) -> None:
    from flatlm.config import DataConfig
    from flatlm.data.sft import cached_examples, examples_key

    cfg = DataConfig(
        source="files", format="chat", paths=[str(chat_jsonl(tmp_path / "c.jsonl"))], cache_dir=str(tmp_path / "cache")
    )
    built: list[int] = []

    def build() -> Examples:
        built.append(1)
        ex = examples(example(1, 12), example(2, 30))
        ex.truncated = 1
        return ex

    key = examples_key(cfg, "sha", "template")
    assert (
        key
        != examples_key(cfg, "sha", "other template")
        != examples_key(cfg.model_copy(update={"seq_len": 7}), "sha", "template")
    )
    first = cached_examples(cfg, key, build, print, print)
    again = cached_examples(cfg, key, build, print, print)
    assert len(built) == 1 and again.truncated == 1
    assert all(
        np.array_equal(a, b) for a, b in zip(first.ids + first.trainable, again.ids + again.trainable, strict=True)
    )
    assert again.trainable[0].dtype == bool
    ids = tmp_path / "cache" / key / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-8] + b"\x07" * 8)  # a flipped token
    warnings: list[str] = []
    cached_examples(cfg, key, build, print, warnings.append)
    assert len(built) == 2 and "ids.npy does not match its digest" in warnings[0]
