"""Degenerate pairs: counted by reason and dropped, or an error when the user asks for one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from datasets import Dataset

from ..errors import ConfigError, DataError

SKIP_REASON = "skip_reason"  # a temporary column: "" keeps the row, anything else is a key of REASONS
REASONS = {
    "identical": "chosen and rejected are identical",
    "empty_completion": "a completion is empty",
    "truncated_to_nothing": "the prompt fills max_length, leaving no room for the completions",
    "identical_after_truncation": "chosen and rejected are identical once truncated to max_length",
    "no_winner": "the verdict names neither response as better (a tie, both bad, or missing)",
    "response_not_text": "a response (or the prompt) is not text",
    "score_not_higher": "score_chosen is not above score_rejected (ODPO's offset is the log of their gap)",
}
ON_BAD_ROW = ("skip", "error")


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row {on_bad_row!r}: expected 'skip' or 'error'")


def drop_skipped(
    dataset: Dataset, on_bad_row: str, describe_row: Callable[[int], str]
) -> tuple[Dataset, dict[str, int]]:
    """Remove the rows marked in SKIP_REASON; return the rest and the counts by reason.

    `describe_row(row_index)` names a row in the error raised under on_bad_row="error".
    """
    reasons = list(dataset[SKIP_REASON])
    counts = Counter(reason for reason in reasons if reason)
    if counts and on_bad_row == "error":
        position = next(i for i, reason in enumerate(reasons) if reason)
        raise DataError(
            f"{describe_row(dataset[position]['row_index'])}: {REASONS[reasons[position]]} "
            "(on_bad_row='error'; 'skip' drops and counts such pairs)"
        )
    if counts:
        dataset = dataset.filter(lambda reason: not reason, input_columns=SKIP_REASON, desc="Dropping skipped pairs")
    return dataset.remove_columns(SKIP_REASON), dict(sorted(counts.items()))
