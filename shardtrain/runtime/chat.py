"""Chat records -> (input_ids, labels) with the loss on assistant turns only.

The conversation is rendered once with the tokenizer's chat template (transformers
`apply_chat_template(tokenize=False)`); each assistant turn's character span is found by rendering
the conversation up to that turn with `add_generation_prompt=True` (the text before the reply) and
through it (the text after): templates render prefixes as prefixes, which we verify. The full text
is tokenized once with offsets, and a token is a label iff it starts inside an assistant span; every
other token (system/user text, role headers, the generation prompt) gets -100.
"""
from __future__ import annotations

from pathlib import Path

IGNORE = -100
#: The template shipped with shardtrain, used only when `data.chat_template: default` is set: role
#: headers on their own line, the assistant's reply closed by the EOS token so the model learns to stop.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
KEY = "data.chat_template"
FIX = (f"set {KEY}: default (shardtrain's simple template), a Jinja template string, or a .jinja file; "
       "or use a tokenizer (model.tokenizer) that ships a chat template")


class ChatTemplateError(ValueError):
    pass


def resolve_template(value: str | None) -> str | None:
    """`data.chat_template` -> Jinja text (None: use the tokenizer's own)."""
    if value is None:
        return None
    if value == "default":
        return DEFAULT_TEMPLATE
    if value.endswith((".jinja", ".j2", ".txt")) or ("{" not in value and Path(value).is_file()):
        p = Path(value)
        if not p.is_file():
            raise ChatTemplateError(f"{KEY}: {value!r} does not exist; {FIX}")
        return p.read_text()
    return value


def apply_template(tok, chat_template: str | None) -> None:
    """Install `data.chat_template` on the tokenizer, or check it has one of its own."""
    t = resolve_template(chat_template)
    if t is not None:
        tok.chat_template = t
    elif not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"the data has chat 'messages' but the tokenizer has no chat template; {FIX}")


def tokenize_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else \
            tok.apply_chat_template([], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(f"{KEY}: the chat template does not render a conversation's prefix as a "
                                    "prefix, so assistant turns cannot be located; use a template without "
                                    "look-ahead (e.g. data.chat_template: default)")
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, offsets)]
    return list(ids), labels
