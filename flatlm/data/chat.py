"""Chat rows for supervised fine-tuning: conversations, their rendering by a chat template, and the loss mask.

A row is one of three shapes (``data.chat_format``; ``auto`` decides per row from its keys):

    messages          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt_response   {"prompt": str, "response": str}
    alpaca            {"instruction": str, "input": str (optional, may be empty), "output": str}

Each becomes a conversation (a list of ``{"role", "content"}``). A conversation is rendered by a Jinja chat
template with Hugging Face's ``apply_chat_template`` conventions (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``; ``trim_blocks`` and ``lstrip_blocks``), the template being ``data.chat_template``
(a .jinja file, or ``builtin``), else the tokenizer's own, else the built-in one::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}EOS<|user|>\\n...

The rendering is cut into SEGMENTS ``(text, trainable)``: the text each assistant message adds, minus the generation
prompt (``<|assistant|>\\n`` above), is trainable; everything else is not. The spans are found by rendering prefixes
of the conversation (``render(messages[:i], add_generation_prompt=True)`` ends where assistant message ``i``'s
trainable text starts; ``render(messages[:i+1])`` ends where it stops; an assistant message that opens the
conversation starts where two one-message renderings with different contents part, since a template may not render
``[]``, e.g. one that reads ``messages[0]`` to add a default system prompt), so any template that renders a conversation
as a growing prefix works, and one that does not is refused. With the built-in template the trainable text of an
assistant turn is its content and the EOS after it.

Tokenization: each segment is encoded separately and the ids concatenated, so segment boundaries are token
boundaries and the mask is exact per token. Within a segment the special-token strings (EOS, BOS) become their ids
(a sentencepiece tokenizer would spell ``</s>`` as four pieces); a segment after the first is encoded as a
continuation (no second dummy-prefix space of sentencepiece), so decoding an example gives back its text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flatlm.config import DataConfig
from flatlm.errors import FlatlmError

ROLES = ("system", "user", "assistant")
SHAPES = "messages (a list of {role, content}), prompt/response, or instruction/input/output (Alpaca; input optional)"
BUILTIN_TEMPLATE = """\
{%- for message in messages %}
{{- '<|' + message['role'] + '|>\\n' + message['content'] }}
{%- if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}
"""
"""flatlm's chat template: ``<|role|>\\n`` before each message, a newline after each non-assistant message, EOS after
each assistant message (what the model learns to end its answer with)."""
CONTINUATION_ANCHOR = "\n"
"""Encoded before a segment that continues an example and then cut off: no dummy-prefix space in the middle."""

Conversation = list[dict[str, str]]
SENTINELS = ("\ue000flatlm-a", "\ue001flatlm-b")
"""Two assistant contents that differ from their first character (private-use code points no text has): where
their renderings part is where a first assistant message's content starts."""


class ChatTokenizer(Protocol):
    """What chat rendering needs of the run's tokenizer (flatlm.data.tokenizer.Tokenizer, or an HF one)."""

    eos_id: int
    bos_id: int

    def encode(self, texts: list[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


# -- rows -> conversations -----------------------------------------------------------------------------------------


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise FlatlmError(f"{where}: {key!r} is a {type(value).__name__}, not a string; fix the row")
    return value


def _messages(row: dict[str, Any], where: str) -> Conversation:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise FlatlmError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects; fix the row")
    out: Conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FlatlmError(f"{where}: message {i} is not a {{role, content}} object; fix the row")
        if m["role"] not in ROLES:
            raise FlatlmError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m["content"], f"messages[{i}].content", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise FlatlmError(f"{where}: the conversation has no assistant message (nothing to train on); fix the row")
    return out


def detect_format(row: dict[str, Any]) -> str | None:
    """The shape of ``row`` from its keys (messages first), None when it has none of them."""
    if "messages" in row:
        return "messages"
    if "prompt" in row and "response" in row:
        return "prompt_response"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def to_conversation(row: dict[str, Any], chat_format: str, where: str) -> Conversation:
    """The conversation of one row of shape ``chat_format`` (``auto``: detected from its keys). ``where`` names the
    row in errors (``file:line``)."""
    shape = detect_format(row) if chat_format == "auto" else chat_format
    needs = {"messages": ("messages",), "prompt_response": ("prompt", "response"), "alpaca": ("instruction", "output")}
    if shape is None or any(k not in row for k in needs[shape]):
        keys = ", ".join(map(str, row)) or "none"
        expected = SHAPES if shape is None else f"data.chat_format={shape}: " + ", ".join(needs[shape])
        raise FlatlmError(
            f"{where} is not a chat row (its keys: {keys}); a row holds {expected}; fix the data or data.chat_format"
        )
    if shape == "messages":
        return _messages(row, where)
    if shape == "prompt_response":
        prompt, response = _text(row["prompt"], "prompt", where), _text(row["response"], "response", where)
    else:
        prompt = _text(row["instruction"], "instruction", where)
        extra = row.get("input") or ""
        if _text(extra, "input", where).strip():
            prompt = f"{prompt}\n\n{extra}"
        response = _text(row["output"], "output", where)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# -- templates -----------------------------------------------------------------------------------------------------


def resolved_template(cfg: DataConfig, tokenizer: object) -> str:
    """The template text actually used: ``data.chat_template`` (a file, or ``builtin``), else the tokenizer's own
    (``tokenizer.chat_template``), else flatlm's built-in one."""
    choice = cfg.chat_template
    if choice == "builtin":
        return BUILTIN_TEMPLATE
    if choice:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FlatlmError(f"chat template file {choice!r} does not exist; fix data.chat_template (or 'builtin')")
        return path.read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own.strip() else BUILTIN_TEMPLATE


def _raise(message: str) -> None:
    raise FlatlmError(f"the chat template raised: {message}")


class Renderer:
    """A compiled chat template: ``render(messages, add_generation_prompt)`` and ``segments(messages)``."""

    def __init__(self, template: str, eos_token: str, bos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        loops = ["jinja2.ext.loopcontrols"]  # HF templates may use {% break %}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=loops)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise FlatlmError(f"the chat template does not parse ({exc}); fix data.chat_template") from None
        self.eos_token, self.bos_token = eos_token, bos_token

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token,
                bos_token=self.bos_token,
            )
        except jinja2.TemplateError as exc:
            why = f"the chat template failed to render a conversation ({exc})"
            raise FlatlmError(f"{why}; fix data.chat_template") from None

    def _head(self, messages: Conversation, i: int) -> str:
        """The rendering up to where assistant message ``i``'s trainable text starts (with the generation prompt)."""
        if i:
            return self.render(messages[:i], add_generation_prompt=True)
        return self._first_assistant_head()

    def _first_assistant_head(self) -> str:
        """What comes before the content of a conversation's first message when it is the assistant's.

        A template may not render an empty conversation (it reads ``messages[0]``, e.g. to insert a default system
        prompt), and one that does may render it without that prompt. So the head is read off two one-message
        conversations that differ only in their content: their common prefix, which must end right where the
        content starts."""
        renders = [self.render([{"role": "assistant", "content": s}]) for s in SENTINELS]
        a, b = renders
        common = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        if not all(r[common:].startswith(s) for r, s in zip(renders, SENTINELS, strict=True)):
            raise FlatlmError(
                "the chat template does not render an assistant message's content as it is when the conversation "
                "starts with one, so the assistant's tokens cannot be found; start each conversation with a user "
                "(or system) message, or use data.chat_template=builtin"
            )
        return renders[0][:common]

    def segments(self, messages: Conversation) -> list[Segment]:
        """The rendering of ``messages`` cut into (text, trainable) pieces: each assistant message's text minus the
        generation prompt is trainable."""
        full = self.render(messages)
        out: list[Segment] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self._head(messages, i)
            start, end_text = len(head), self.render(messages[: i + 1])
            if not (full.startswith(end_text) and end_text.startswith(head) and start >= pos):
                raise FlatlmError(
                    "the chat template does not render a conversation as a growing prefix (message "
                    f"{i} changes what comes before it), so the assistant's tokens cannot be found; use "
                    "data.chat_template=builtin or a template that appends each message"
                )
            if start > pos:
                out.append(Segment(full[pos:start], False))
            if len(end_text) > start:
                out.append(Segment(full[start : len(end_text)], True))
            pos = len(end_text)
        if pos < len(full):
            out.append(Segment(full[pos:], False))
        return out


# -- segments -> tokens --------------------------------------------------------------------------------------------


def special_tokens(tokenizer: ChatTokenizer) -> dict[str, int]:
    """The strings the template writes for EOS and BOS, and their ids."""
    out = {}
    for name in ("eos", "bos"):
        token_id = getattr(tokenizer, f"{name}_id", None)
        text = token_string(tokenizer, name)
        if text and token_id is not None and token_id >= 0:
            out[text] = int(token_id)
    return out


def token_string(tokenizer: object, name: str) -> str:
    """How a template spells the tokenizer's ``name`` (eos/bos) token: an HF tokenizer's own string, a sentencepiece
    model's piece (``</s>``), else ``<eos>``/``<bos>``."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, f"{name}_token", None):
        return str(getattr(hf, f"{name}_token"))
    sp = getattr(tokenizer, "sp", None)
    token_id = getattr(tokenizer, f"{name}_id", -1)
    if sp is not None and token_id is not None and token_id >= 0:
        return str(sp.id_to_piece(token_id))
    return f"<{name}>"


def _encode_text(tokenizer: ChatTokenizer, text: str, continuation: bool) -> list[int]:
    if not text:
        return []
    if not continuation:
        return tokenizer.encode([text])[0]
    anchor = tokenizer.encode([CONTINUATION_ANCHOR])[0]
    ids = tokenizer.encode([CONTINUATION_ANCHOR + text])[0]
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor) :]
    return tokenizer.encode([text])[0]  # the anchor merged with the text: encode it on its own


def encode_segments(segments: Iterable[Segment], tokenizer: ChatTokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of ``segments`` and whether each is trainable; special-token strings become their ids."""
    specials = special_tokens(tokenizer)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
    ids: list[int] = []
    mask: list[bool] = []
    for seg in segments:
        pieces = pattern.split(seg.text) if pattern else [seg.text]
        found = pattern.findall(seg.text) if pattern else []
        for k, piece in enumerate(pieces):
            new = _encode_text(tokenizer, piece, continuation=bool(ids))
            if k < len(found):
                new = [*new, specials[found[k]]]
            ids.extend(new)
            mask.extend([seg.trainable] * len(new))
    return ids, mask


def renderer_for(template: str, tokenizer: object) -> Renderer:
    """``template`` compiled with the tokenizer's EOS and BOS strings."""
    return Renderer(template, token_string(tokenizer, "eos"), token_string(tokenizer, "bos"))
