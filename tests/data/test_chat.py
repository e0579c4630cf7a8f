"""Chat rows -> conversations -> segments -> tokens: the loss mask is exactly the assistant's tokens (+ EOS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flatlm.config import DataConfig
from flatlm.data import sft
from flatlm.data.chat import (
    BUILTIN_TEMPLATE,
    Renderer,
    Segment,
    encode_segments,
    renderer_for,
    resolved_template,
    to_conversation,
)
from flatlm.data.sft import Examples, PackedExamples, PaddedExamples, tokenize_examples
from flatlm.data.tokenizer import Tokenizer, train_tokenizer
from flatlm.errors import FlatlmError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""A ChatML-style template as Hugging Face tokenizers ship them: the assistant's turn ends with <|im_end|>\\n."""

ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."},
            {"role": "user", "content": "And a tuple?"},
            {"role": "assistant", "content": "An immutable one."},
        ]
    },
    "prompt_response": {"prompt": "Name a prime.", "response": "Seven is prime."},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
}
ANSWERS = {
    "messages": ["A mutable sequence.", "An immutable one."],
    "prompt_response": ["Seven is prime."],
    "alpaca": ["The sum is 5."],
}
LINES = [
    "What is a list? A mutable sequence. And a tuple? An immutable one. You answer briefly.",
    "Name a prime. Seven is prime. Add the numbers. 2 and 3. The sum is 5.",
    "<|user|> <|assistant|> <|system|> <|im_start|> <|im_end|> user assistant system",
    "the model learns to predict the next token from the previous ones and the optimizer moves the weights",
]


def tiny_tokenizer() -> Tokenizer:
    """A small sentencepiece tokenizer (trained in well under a second) that spells every test text."""
    return Tokenizer(train_tokenizer(LINES * 20, 400))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def template_of(name: str) -> str:
    return BUILTIN_TEMPLATE if name == "builtin" else CHATML


def counted_runs(ids: np.ndarray, trainable: np.ndarray) -> list[list[int]]:
    """The counted targets of one example (through sft.example_arrays, as the batches see them), as runs of
    consecutive positions."""
    _, targets, mask = sft.example_arrays(ids, trainable)
    runs: list[list[int]] = []
    for t, (target, counted) in enumerate(zip(targets.tolist(), mask.tolist(), strict=True)):
        if counted:
            if not runs or not mask[t - 1]:
                runs.append([])
            runs[-1].append(target)
    return runs


def expected_runs_ok(runs: list[list[int]], answers: list[str], template: str, tok: Tokenizer) -> bool:
    if len(runs) != len(answers):
        return False
    for run, answer in zip(runs, answers, strict=True):
        if template == "builtin":  # content, then EOS (the id itself)
            if run[-1] != tok.eos_id or tok.decode(run[:-1]) != answer:
                return False
        elif tok.decode(run) != answer + "<|im_end|>\n":
            return False
    return True


@pytest.mark.parametrize("template", ["builtin", "chatml"])
@pytest.mark.parametrize("shape", list(ROWS))
def test_counted_targets_are_the_answers_and_eos(shape: str, template: str, tok: Tokenizer) -> None:
    renderer = renderer_for(template_of(template), tok)
    examples = tokenize_examples([("row 1", ROWS[shape])], "auto", renderer, tok, seq_len=512)
    ids, trainable = examples.ids[0], examples.trainable[0]
    runs = counted_runs(ids, trainable)
    assert expected_runs_ok(runs, ANSWERS[shape], template, tok), [tok.decode(r) for r in runs]
    # the whole example decodes to the rendered text: segment boundaries add no spaces
    rendered = renderer.render(to_conversation(ROWS[shape], "auto", "row 1"))
    assert tok.decode(ids) == rendered.replace("</s>", "")


def test_a_mask_shifted_by_one_fails_the_check(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> None:
    """Planted bug: loss mask = trainable[:-1] (aligned with the inputs, not the targets)."""
    monkeypatch.setattr(sft, "example_arrays", lambda ids, tr: (ids[:-1], ids[1:], tr[:-1]))
    for template in ("builtin", "chatml"):
        renderer = renderer_for(template_of(template), tok)
        ex = tokenize_examples([("row 1", ROWS["prompt_response"])], "auto", renderer, tok, seq_len=512)
        runs = counted_runs(ex.ids[0], ex.trainable[0])
        assert not expected_runs_ok(runs, ANSWERS["prompt_response"], template, tok)


def test_batches_count_exactly_the_answers(tok: Tokenizer) -> None:
    """Through both views' batches: decoding the counted targets of each row gives the answers."""
    renderer = renderer_for(BUILTIN_TEMPLATE, tok)
    rows = [(f"row {i}", ROWS[s]) for i, s in enumerate(ROWS)]
    examples = tokenize_examples(rows, "auto", renderer, tok, seq_len=128)
    expected = [a for s in ROWS for a in ANSWERS[s]]
    for view in (PackedExamples(examples, 128, tok.eos_id), PaddedExamples(examples, 128, tok.eos_id)):
        batch = view.batch(range(len(view)))
        got = []
        for b in range(batch.size):
            targets, mask = batch.targets[b].tolist(), batch.loss_mask[b].tolist()
            run: list[int] = []
            for t, counted in zip(targets, mask, strict=True):
                if counted:
                    run.append(t)
                    if t == tok.eos_id:
                        got.append(tok.decode(run[:-1]))
                        run = []
        assert got == expected, type(view).__name__


def test_alpaca_without_input_and_auto_detection() -> None:
    conv = to_conversation({"instruction": "Say hi.", "output": "Hi."}, "auto", "f:1")
    assert conv == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    conv = to_conversation({"instruction": "Say hi.", "input": "", "output": "Hi."}, "alpaca", "f:1")
    assert conv[0]["content"] == "Say hi."
    conv = to_conversation(ROWS["alpaca"], "auto", "f:1")
    assert conv[0]["content"] == "Add the numbers.\n\n2 and 3"


@pytest.mark.parametrize(
    ("row", "chat_format", "match"),
    [
        ({"text": "x"}, "auto", r"data/chat\.jsonl:7 is not a chat row \(its keys: text\).*messages.*prompt/response"),
        ({"prompt": "x", "response": "y"}, "alpaca", r"f:1 is not a chat row.*chat_format=alpaca"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "auto", r"role 'bot'; roles are system, user, assistant"),
        ({"messages": [{"role": "user", "content": "x"}]}, "auto", r"no assistant message"),
        ({"prompt": 3, "response": "y"}, "auto", r"'prompt' is a int, not a string"),
    ],
)
def test_bad_rows_are_named(row: dict, chat_format: str, match: str) -> None:
    where = "data/chat.jsonl:7" if "text" in row else "f:1"
    with pytest.raises(FlatlmError, match=match):
        to_conversation(row, chat_format, where)


def test_resolved_template_order(tmp_path: Path, tok: Tokenizer) -> None:
    assert resolved_template(DataConfig(), tok) == BUILTIN_TEMPLATE  # a sentencepiece model has no template
    tok.chat_template = CHATML  # type: ignore[attr-defined]  # what an HF tokenizer carries
    try:
        assert resolved_template(DataConfig(), tok) == CHATML
        assert resolved_template(DataConfig(chat_template="builtin"), tok) == BUILTIN_TEMPLATE
        (tmp_path / "t.jinja").write_text("{{ messages }}")
        assert resolved_template(DataConfig(chat_template=str(tmp_path / "t.jinja")), tok) == "{{ messages }}"
    finally:
        del tok.chat_template  # type: ignore[attr-defined]
    with pytest.raises(FlatlmError, match="chat template file .* does not exist"):
        resolved_template(DataConfig(chat_template=str(tmp_path / "missing.jinja")), tok)


def test_a_template_that_is_not_a_growing_prefix_is_refused(tok: Tokenizer) -> None:
    # renders the last message differently from the same message followed by more
    odd = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    conv = to_conversation(ROWS["messages"], "auto", "r")
    with pytest.raises(FlatlmError, match="growing prefix"):
        Renderer(odd, "</s>").segments(conv)


def test_truncated_and_answerless_examples_are_counted(tok: Tokenizer) -> None:
    renderer = renderer_for(BUILTIN_TEMPLATE, tok)
    long_prompt = {"prompt": "What is a list? " * 40, "response": "A mutable sequence."}
    ex = tokenize_examples([("a", long_prompt), ("b", ROWS["prompt_response"])], "auto", renderer, tok, seq_len=24)
    assert (len(ex), ex.truncated, ex.dropped) == (1, 1, 1)  # the long one is cut to its prompt: left out
    assert all(len(ids) <= 25 for ids in ex.ids)
    warnings: list[str] = []
    sft.report(ex, 24, warnings.append)
    assert len(warnings) == 2 and "raise data.seq_len" in warnings[0]


def test_special_token_strings_become_ids(tok: Tokenizer) -> None:
    ids, mask = encode_segments(
        renderer_for(BUILTIN_TEMPLATE, tok).segments(to_conversation(ROWS["alpaca"], "auto", "r")), tok
    )
    assert ids.count(tok.eos_id) == 1 and mask[ids.index(tok.eos_id)]
    assert isinstance(Examples(), Examples)


ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""A Zephyr-style template: every message ends with the tokenizer's own EOS string and a newline."""


def test_an_hf_tokenizer_with_its_own_template(tmp_path: Path) -> None:
    """The tokenizer's template is the one used; its EOS string becomes the EOS id inside the answer's span."""
    from flatlm.data.tokenizer import load_tokenizer
    from tests.data.test_hf_tokenizer import make_hf_tokenizer

    hf_tok = load_tokenizer(make_hf_tokenizer(tmp_path / "hf", template=ZEPHYR))
    template = resolved_template(DataConfig(), hf_tok)
    assert template == ZEPHYR
    renderer = renderer_for(template, hf_tok)
    ex = tokenize_examples([("r", ROWS["messages"])], "auto", renderer, hf_tok, seq_len=512)
    runs = counted_runs(ex.ids[0], ex.trainable[0])
    assert [hf_tok.decode(r) for r in runs] == [a + "</s>\n" for a in ANSWERS["messages"]]
    assert all(hf_tok.eos_id in r for r in runs)
    assert hf_tok.decode(ex.ids[0]) == renderer.render(to_conversation(ROWS["messages"], "auto", "r"))


QWEN_LIKE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou answer briefly.<|im_end|>\\n' }}{% endif %}"
    + CHATML
)
"""ChatML with a default system prompt read off ``messages[0]`` (as Qwen's template does): it cannot render []."""


def test_a_conversation_starting_with_the_assistant_trains_on_its_answers_only(tok: Tokenizer) -> None:
    """Catches: the head of a first assistant message taken as "" when the template cannot render [] (the default
    system prompt and the assistant header trained on)."""
    row = {
        "messages": [
            {"role": "assistant", "content": "A mutable sequence."},
            {"role": "user", "content": "And a tuple?"},
            {"role": "assistant", "content": "An immutable one."},
        ]
    }
    renderer = renderer_for(QWEN_LIKE, tok)
    segments = renderer.segments(to_conversation(row, "messages", "row"))
    assert segments[0] == Segment("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>assistant\n", False)
    ids, mask = encode_segments(segments, tok)
    runs = counted_runs(np.asarray(ids), np.asarray(mask))
    assert expected_runs_ok(runs, ["A mutable sequence.", "An immutable one."], "chatml", tok), [
        tok.decode(r) for r in runs
    ]
    # the built-in template renders [] fine: its head is the generation prompt, as before
    builtin = renderer_for(BUILTIN_TEMPLATE, tok).segments(to_conversation(row, "messages", "row"))
    assert builtin[0] == Segment("<|assistant|>\n", False)


def test_a_template_that_changes_a_first_assistant_content_is_refused(tok: Tokenizer) -> None:
    """The content must appear as it is after the head; a template that rewrites it gets one clear error."""
    upper = CHATML.replace("message['content']", "(message['content'] | upper)")
    row = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}
    with pytest.raises(FlatlmError, match="starts with one"):
        renderer_for(upper, tok).segments(to_conversation(row, "messages", "row"))
