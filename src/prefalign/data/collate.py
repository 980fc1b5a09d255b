"""Batch tokenized pairs as 2B right-padded sequences: prompt+chosen for each pair, then prompt+rejected.

Tokenized rows keep prompt and completions apart, so another layout (one prompt followed by both completions,
with a mask that hides chosen from rejected) is a second collator over the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError

IGNORE_INDEX = -100  # the label of positions that carry no loss (prompt and padding)


class PairCollator:
    def __init__(self, pad_token_id: int):
        if not isinstance(pad_token_id, int):
            raise ConfigError(
                f"pad_token_id {pad_token_id!r}: expected an int; a tokenizer without a pad token can pad with "
                "its EOS or UNK id (padding is masked out)"
            )
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        completions = [list(row["chosen_input_ids"]) for row in rows] + [list(row["rejected_input_ids"]) for row in rows]
        prompts = prompts + prompts
        return {
            **pad_sequences(list(zip(prompts, completions)), self.pad_token_id),
            "completion_lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
            "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "row_index": torch.tensor([row["row_index"] for row in rows], dtype=torch.long),
            **score_inputs(rows),
        }


def score_inputs(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """chosen_scores / rejected_scores [B] when the rows carry per-response scores (ODPO), else nothing."""
    if "score_chosen" not in rows[0]:
        return {}
    return {f"{side}_scores": torch.tensor([float(r[f"score_{side}"]) for r in rows], dtype=torch.float32)
            for side in ("chosen", "rejected")}


def pad_sequences(sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt, completion) id lists as right-padded input_ids, attention_mask and labels (-100 off the completion)."""
    width = max((len(p) + len(c) for p, c in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
