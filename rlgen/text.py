"""Rendering prompts and conversations as the model sees them (the chat template), TRL's way.

Prompts are plain texts or lists of messages (TRL's conversational format); a plain prompt becomes one user
turn of the tokenizer's chat template, or `prompt + "\\n"` for a tokenizer without one.
"""

from __future__ import annotations

from rlgen.errors import UserError


def is_conversation(value) -> bool:
    """True for a list of chat messages (`[{"role": ..., "content": ...}]`, TRL's conversational format)."""
    if not (isinstance(value, list) and value):  # plain text: TRL (~115 MB, seconds to import) stays unloaded
        return False
    from trl.data_utils import is_conversational

    return is_conversational({"prompt": value})


def prompt_of(row: dict):
    """A row's prompt: its messages when conversational, else its text."""
    return row["prompt"] if is_conversation(row["prompt"]) else str(row["prompt"])


def _chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"conversational data (lists of messages) needs a tokenizer with a chat template; "
                        f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} has none")
    return tokenizer


def render_prompt(tokenizer, text) -> str:
    """The string the model sees before its reply: the chat template when the tokenizer has one. A conversational
    prompt (a list of messages) is rendered as TRL renders it (`maybe_apply_chat_template`)."""
    if is_conversation(text):
        from trl.data_utils import maybe_apply_chat_template

        return maybe_apply_chat_template({"prompt": text}, _chat_template(tokenizer))["prompt"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


def as_messages(value, role: str) -> list[dict]:
    """`value` if it is a list of messages, else one `role` message with its text."""
    return value if is_conversation(value) else [{"role": role, "content": str(value)}]


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """A whole conversation as text, as TRL renders a `messages` row."""
    from trl.data_utils import apply_chat_template

    return apply_chat_template({"messages": messages}, _chat_template(tokenizer))["text"]


def render_prompt_completion(tokenizer, prompt, completion) -> dict[str, str]:
    """`{"prompt", "completion"}` texts: the prompt as `render_prompt` renders it, or, when either side is a list
    of messages (a text side becomes a user or assistant message), the pair as TRL renders it."""
    if not (is_conversation(prompt) or is_conversation(completion)):
        return {"prompt": render_prompt(tokenizer, str(prompt)), "completion": str(completion)}
    from trl.data_utils import maybe_apply_chat_template

    example = {"prompt": as_messages(prompt, "user"), "completion": as_messages(completion, "assistant")}
    return maybe_apply_chat_template(example, _chat_template(tokenizer))
