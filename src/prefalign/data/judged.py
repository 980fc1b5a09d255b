"""Judge-style data: two responses and a verdict naming the better one (LLMBar, Auto-J, Chatbot Arena,
PandaLM, …), read as preference pairs.

    --columns prompt=input,response_a=output_1,response_b=output_2,winner=label       # LLMBar: label 1 or 2
    --columns prompt=prompt,response_a="response 1",response_b="response 2",winner=label --winner_values a=0,b=1
                                                                                     # Auto-J: 0, 1, 2 = tie

The verdict's values are read with `winner_values` ("a=VALUE,b=VALUE"), or without it in one of the usual
encodings: 1/2, a/b, model_a/model_b, response_a/response_b (any case). Any other verdict — a tie, "both
bad", a missing one — is skipped and counted (`no_winner`); a response that is not text (PandaLM has JSON
booleans) is skipped and counted (`response_not_text`), or, with on_bad_row: error, stops naming file and row.
"""

from __future__ import annotations

from ..errors import ConfigError

JUDGE_ROLES = ("response_a", "response_b", "winner")
CONVENTIONS = {"a": ("1", "a", "model_a", "response_a"), "b": ("2", "b", "model_b", "response_b")}


def parse_winner_values(text: str | dict | None) -> dict[str, set[str]]:
    """{"a": {values}, "b": {values}} from "a=0,b=1" (several values: "a=0|A"), or the conventions."""
    if text is None:
        return {side: set(values) for side, values in CONVENTIONS.items()}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = [item.split("=", 1) for item in str(text).split(",") if item.strip()]
    if any(len(item) != 2 for item in items) or sorted(k.strip() for k, _ in items) != ["a", "b"]:
        raise ConfigError(f"winner_values {text!r}: expected a=VALUE,b=VALUE (the verdict's value for each response)")
    return {k.strip(): {v.strip().lower() for v in str(value).split("|")} for k, value in items}


def judged_pair(row: dict, columns: dict[str, str], winners: dict[str, set[str]]) -> tuple[str, str, str, str]:
    """(prompt, chosen, rejected, skip reason) of one judged row; the reason is "" for a usable pair."""
    verdict = row.get(columns["winner"])
    side = next((s for s, values in winners.items() if verdict is not None and str(verdict).strip().lower() in values), None)
    a, b = row.get(columns["response_a"]), row.get(columns["response_b"])
    prompt = row.get(columns["prompt"], "")
    if not isinstance(a, str) or not isinstance(b, str) or not isinstance(prompt, str):
        return "", "", "", "response_not_text"
    if side is None:
        return prompt, "", "", "no_winner"
    chosen, rejected = (a, b) if side == "a" else (b, a)
    return prompt, chosen, rejected, ""
