"""load_prompts: the prompts of a prompt file, or of a preference set (each distinct prompt once), as text a
model continues — rendered exactly as training renders the prompts of pairs.

A source with a `chosen` column (or the judged columns) is read as pairs (`load_preference_data`), so every
pair format works and its prompts are what training would see. Otherwise each row needs a `prompt` column
(or the column `columns` maps to prompt): a string is used as it is, a list of {role, content} messages is
rendered with the chat template and its generation prompt. A row whose prompt is not text is one error line
naming the file and row; an empty or repeated prompt is a counted skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import DataError
from .chat import ChatRenderer
from .formats import _messages, _type_name, parse_columns
from .sources import load_source, locate

logger = logging.getLogger(__name__)


@dataclass
class Prompts:
    texts: list[str]  # each distinct prompt once, in the source's order
    row_indices: list[int]  # the 0-based source row each came from
    source: str
    n_rows: int
    kind: str  # "prompts" or "pairs"
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def load_prompts(source: str, *, tokenizer=None, split: str | None = None, config_name: str | None = None,
                 columns: dict | str | None = None, data_format: str = "auto", chat_template: str | None = None,
                 on_bad_row: str = "skip") -> Prompts:
    mapped = parse_columns(columns)
    raw, parts = load_source(str(source), split=split, config_name=config_name)
    pair_columns = ("response_a", "winner") if "winner" in mapped else ("chosen",)
    if all(mapped.get(c, c) in raw.column_names for c in pair_columns):
        return _prompts_of_pairs(source, tokenizer, split, config_name, columns, data_format, chat_template,
                                 on_bad_row)
    column = mapped["prompt"]
    if column not in raw.column_names:
        raise DataError(f"{locate(parts, 0)}: no {column!r} column (found: {', '.join(raw.column_names)}): a prompt "
                        "file needs one (map another with --columns prompt=NAME), a pair file chosen and rejected")
    renderer = None
    texts, rows, skipped = [], [], {}
    seen = set()
    for index, value in enumerate(raw[column]):
        if isinstance(value, list):
            renderer = renderer or ChatRenderer(tokenizer, chat_template)
            text = renderer.render(_messages({column: value}, column, locate(parts, index)), generation_prompt=True)
        elif isinstance(value, str):
            text = value
        else:
            raise DataError(f"{locate(parts, index)}: column {column!r} is {_type_name(value)}, expected a string or "
                            "a list of {role, content} messages")
        reason = "empty_prompt" if not text.strip() else "repeated_prompt" if text in seen else None
        if reason:
            if on_bad_row == "error" and reason == "empty_prompt":
                raise DataError(f"{locate(parts, index)}: the prompt is empty (on_bad_row='error')")
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        seen.add(text)
        texts.append(text)
        rows.append(index)
    prompts = Prompts(texts, rows, str(source), len(raw), "prompts", skipped)
    _log(prompts)
    return prompts


def _prompts_of_pairs(source, tokenizer, split, config_name, columns, data_format, chat_template, on_bad_row):
    from .load import load_preference_data

    data = load_preference_data(source, tokenizer=tokenizer, split=split, config_name=config_name, columns=columns,
                                data_format=data_format, chat_template=chat_template, on_bad_row=on_bad_row)
    texts, rows, repeated = [], [], 0
    seen = set()
    for prompt, row_index in zip(data.dataset["prompt"], data.dataset["row_index"]):
        if prompt in seen:
            repeated += 1
            continue
        seen.add(prompt)
        texts.append(prompt)
        rows.append(row_index)
    skipped = {**data.skipped, **({"repeated_prompt": repeated} if repeated else {})}
    prompts = Prompts(texts, rows, str(source), data.n_rows, "pairs", skipped)
    _log(prompts)
    return prompts


def _log(prompts: Prompts) -> None:
    logger.info("%s: %d prompts from %d rows (%s); skipped: %s", prompts.source, len(prompts), prompts.n_rows,
                prompts.kind, ", ".join(f"{k} {v}" for k, v in prompts.skipped.items()) or "none")
