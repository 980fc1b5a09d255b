"""The three row formats, turned into one: string columns prompt, chosen, rejected (completions only).

explicit        prompt, chosen, rejected are strings.
implicit        chosen and rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic
                HH-RLHF); the prompt is the shared dialogue up to the last assistant marker they share.
conversational  chosen and rejected (and maybe prompt) are lists of {role, content} messages, rendered with
                the tokenizer's chat template.
judged          two responses and a verdict (columns response_a, response_b, winner; `judged.py`).
"""

from __future__ import annotations

import difflib
import os

from datasets import Dataset

from ..errors import ConfigError, DataError
from .chat import ChatRenderer, split_conversation
from .judged import JUDGE_ROLES, judged_pair, parse_winner_values
from .sources import SourcePart, locate

FORMATS = ("explicit", "implicit", "conversational", "judged")
ROLES = ("prompt", "chosen", "rejected")
SCORE_ROLES = ("score_chosen", "score_rejected")  # per-response scores (UltraFeedback's columns), for ODPO
ASSISTANT_MARKER = "\n\nAssistant:"


def parse_columns(columns: dict[str, str] | str | None) -> dict[str, str]:
    """Role -> source column, from a dict or "prompt=question,chosen=good,rejected=bad"; unnamed roles keep their name."""
    if isinstance(columns, str):
        pairs = [item.split("=", 1) for item in columns.split(",") if item.strip()]
        if any(len(pair) != 2 or not pair[1].strip() for pair in pairs):
            raise ConfigError(f"columns {columns!r}: expected ROLE=COLUMN pairs, e.g. prompt=question,chosen=good")
        columns = {role.strip(): column.strip() for role, column in pairs}
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(ROLES) - set(JUDGE_ROLES) - set(SCORE_ROLES))
    if unknown:
        raise ConfigError(f"columns: unknown role {unknown[0]!r} (roles are prompt, chosen, rejected, score_chosen, "
                          "score_rejected, or response_a, response_b, winner for judged data)")
    scores = {role: columns.get(role, role) for role in SCORE_ROLES}
    judged = [r for r in JUDGE_ROLES if r in columns]
    if judged:
        if len(judged) < len(JUDGE_ROLES):
            missing = ", ".join(r for r in JUDGE_ROLES if r not in columns)
            raise ConfigError(f"columns: judged data needs response_a, response_b and winner (missing {missing})")
        if "chosen" in columns or "rejected" in columns:
            raise ConfigError("columns: give chosen/rejected, or response_a/response_b/winner, not both")
        return {"prompt": columns.get("prompt", "prompt"), **{r: columns[r] for r in JUDGE_ROLES}, **scores}
    return {**{role: columns.get(role, role) for role in ROLES}, **scores}


def is_judged(columns: dict[str, str]) -> bool:
    return "winner" in columns


def select_pair_columns(dataset: Dataset, name: str, columns: dict[str, str], data_format: str | None,
                        scores: bool = False) -> Dataset:
    """Keep only the mapped columns (data_format None: not forced); a missing one stops with the nearest name as a
    hint. `scores`: the per-response score columns are required too (a loss reads them)."""
    prompt_required = data_format == "explicit" or columns["prompt"] != "prompt"  # forced, or mapped by the user
    answers = list(JUDGE_ROLES) if is_judged(columns) else ["chosen", "rejected"]
    if scores and is_judged(columns):
        raise ConfigError("judged data has a verdict, not per-response scores (score_chosen, score_rejected), "
                          "which the chosen loss needs")
    answers += list(SCORE_ROLES) if scores else []
    required = answers + (["prompt"] if prompt_required else [])
    for role in required:
        if columns[role] not in dataset.column_names:
            raise DataError(f"{name}: row 1: {_missing_column(role, columns[role], dataset.column_names)}")
    keep = [columns[role] for role in ("prompt", *answers) if columns[role] in dataset.column_names]
    if data_format == "implicit" and columns["prompt"] in keep:
        keep.remove(columns["prompt"])  # the transcripts carry the prompt
    return dataset.select_columns(list(dict.fromkeys(keep)))


def _missing_column(role: str, column: str, found: list[str]) -> str:
    close = difflib.get_close_matches(column, found, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? Map it with" if close else "map another column with"
    return (
        f"missing column {column!r} (found: {', '.join(found)}); "
        f"{hint} --columns {role}={close[0] if close else 'NAME'}"
    )


def detect_format(first_row: dict, columns: dict[str, str], where: str) -> str:
    if is_judged(columns):
        return "judged"
    chosen = first_row[columns["chosen"]]
    if isinstance(chosen, list) and all(isinstance(message, dict) for message in chosen):
        return "conversational"
    if isinstance(chosen, str):
        return "explicit" if columns["prompt"] in first_row else "implicit"
    raise DataError(
        f"{where}: column {columns['chosen']!r} is {_type_name(chosen)}, expected a string or a list of {{role, content}} messages"
    )


def normalize(
    dataset: Dataset,
    data_format: str,
    columns: dict[str, str],
    parts: list[SourcePart],
    renderer: ChatRenderer | None,
    winner_values=None,
    scores: bool = False,
) -> Dataset:
    """Map every row to prompt/chosen/rejected strings, row_index and skip_reason ("" to keep the pair);
    with `scores` also score_chosen and score_rejected (floats)."""
    winners = parse_winner_values(winner_values) if data_format == "judged" else None
    return dataset.map(
        _normalize_row,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"data_format": data_format, "columns": columns, "parts": parts, "renderer": renderer,
                   "winners": winners, "scores": scores},
        desc=f"Reading {data_format} pairs",
    )


def _normalize_row(row, index, *, data_format, columns, parts, renderer, winners=None, scores=False):
    pair = _pair_of_row(row, index, data_format, columns, parts, renderer, winners)
    if scores:
        where = locate(parts, index)
        pair["score_chosen"], pair["score_rejected"] = (_score(row, columns[r], where) for r in SCORE_ROLES)
        if not pair["skip_reason"] and not pair["score_chosen"] > pair["score_rejected"]:
            pair["skip_reason"] = "score_not_higher"
    return pair


def _score(row, column: str, where: str) -> float:
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise DataError(f"{where}: column {column!r} is {value!r}, expected a finite number (a response's score)")
    return float(value)


def _pair_of_row(row, index, data_format, columns, parts, renderer, winners):
    where = locate(parts, index)
    if data_format == "judged":
        prompt, chosen, rejected, reason = judged_pair(row, columns, winners)
        reason = reason or degenerate_reason(chosen, rejected)
    elif data_format == "conversational":
        prompt, chosen, rejected, reason = _conversational(row, columns, renderer, where)
    else:
        chosen, rejected = _text(row, columns["chosen"], where), _text(row, columns["rejected"], where)
        if data_format == "explicit":
            prompt = _text(row, columns["prompt"], where)
        else:
            prompt = implicit_prompt(chosen, rejected)
            if prompt is None:
                raise DataError(
                    f"{where}: chosen and rejected share no {ASSISTANT_MARKER.strip()!r} turn, so the prompt "
                    "cannot be found (implicit-prompt format); give a prompt column with --columns prompt=NAME"
                )
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        reason = degenerate_reason(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "row_index": index, "skip_reason": reason}


def implicit_prompt(chosen: str, rejected: str) -> str | None:
    """The shared start of two transcripts, cut back so it ends with the last assistant marker in it."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    return None if cut < 0 else shared[: cut + len(ASSISTANT_MARKER)]


def degenerate_reason(chosen: str, rejected: str) -> str:
    """Why a pair teaches nothing ("" when it is fine)."""
    if chosen == rejected:
        return "identical"
    if not chosen.strip() or not rejected.strip():
        return "empty_completion"
    return ""


def _conversational(row, columns, renderer, where):
    chosen = _messages(row, columns["chosen"], where)
    rejected = _messages(row, columns["rejected"], where)
    prompt = row.get(columns["prompt"])
    if prompt is not None and not isinstance(prompt, str):
        prompt = _messages(row, columns["prompt"], where)
    prompt, chosen, rejected = split_conversation(prompt, chosen, rejected)
    if not prompt or not chosen or not rejected:
        raise DataError(f"{where}: cannot tell the prompt turns from the answers (no prompt column, no shared turns)")
    reason = degenerate_reason(_contents(chosen), _contents(rejected))
    prompt_text = renderer.render(prompt, generation_prompt=True)
    completions = [renderer.completion(prompt_text, prompt, side) for side in (chosen, rejected)]
    if None in completions:
        raise DataError(
            f"{where}: the chat template renders the prompt differently on its own than inside the conversation, "
            "so prompt and completion cannot be split"
        )
    return prompt_text, completions[0], completions[1], reason


def _contents(messages: list[dict]) -> str:
    return "\n".join(message["content"] for message in messages)


def _text(row: dict, column: str, where: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} is {_type_name(value)}, expected a string")
    return value


def _messages(row: dict, column: str, where: str) -> list[dict]:
    value = row[column]
    if not isinstance(value, list):
        raise DataError(f"{where}: column {column!r} is {_type_name(value)}, expected a list of {{role, content}} messages")
    for number, message in enumerate(value, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: column {column!r}, message {number} is not a {{role, content}} pair of strings")
    return value


def _type_name(value: object) -> str:
    if value is None:
        return "missing or null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )


def check_format(data_format: str) -> None:
    if data_format not in ("auto", *FORMATS):
        raise ConfigError(f"data format {data_format!r}: expected auto, {', '.join(FORMATS)}")
