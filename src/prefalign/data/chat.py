"""Render conversational pairs (lists of {role, content} messages) to prompt and completion text."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

Messages = list[dict]


def load_chat_template(value: str) -> str:
    """`value` is jinja template text or the path of a file holding it."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"chat template {value!r}: no such file, and not jinja template text either")
    return path.read_text(encoding="utf-8")


class ChatRenderer:
    """Splits a conversation into the prompt (rendered with the generation prompt) and the completion."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        if tokenizer is None:
            raise DataError(
                "conversational data (lists of {role, content} messages) is rendered with a tokenizer's chat "
                "template: pass tokenizer= (on the command line, --tokenizer PATH)"
            )
        template = load_chat_template(chat_template) if chat_template else getattr(tokenizer, "chat_template", None)
        if not template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(
                f"tokenizer {name} has no chat template, which conversational data needs; give one with "
                "chat_template= (on the command line, --chat-template): a jinja file's path or the template text"
            )
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: Messages, *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def completion(self, prompt_text: str, prompt: Messages, completion: Messages) -> str | None:
        """The text the full conversation adds after the prompt; None if the template renders them inconsistently."""
        full = self.render(prompt + completion, generation_prompt=False)
        if not full.startswith(prompt_text):
            return None
        text = full[len(prompt_text) :]
        # Templates put a newline after each turn's end token; the model stops at EOS and never emits it, so the
        # completion ends at EOS (and tokenize_pairs does not append a second one).
        eos = self.tokenizer.eos_token
        if eos and text.rstrip().endswith(eos):
            text = text.rstrip()
        return text


def split_conversation(prompt, chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """(prompt messages, chosen completion, rejected completion).

    The prompt is the `prompt` column when it holds messages; otherwise the turns chosen and rejected share, up
    to the first assistant turn where they differ; otherwise the `prompt` string as one user turn.
    """
    if isinstance(prompt, list):
        n = len(prompt)
        return (
            prompt,
            chosen[n:] if chosen[:n] == prompt else chosen,
            rejected[n:] if rejected[:n] == prompt else rejected,
        )
    shared = 0
    limit = min(len(chosen), len(rejected)) - 1  # leave each side at least one message
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared].get("role") != "assistant":
        shared -= 1
    if shared == 0 and isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], chosen, rejected
    return chosen[:shared], chosen[shared:], rejected[shared:]
