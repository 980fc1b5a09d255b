"""Tokenize prompt and completions apart, so that prompt + completion is the tokenization of the whole text.

Prompt and completions stay separate in the tokenized rows: the collator decides how to lay them out.
"""

from __future__ import annotations

from datasets import Dataset

from ..errors import ConfigError, DataError
from .skips import SKIP_REASON, check_on_bad_row, drop_skipped

TRUNCATION_MODES = ("keep_end", "keep_start")
KEPT_COLUMNS = ("row_index", "score_chosen", "score_rejected")  # carried through to the batch


def tokenize_pairs(
    dataset: Dataset,
    tokenizer,
    max_length: int | None = 512,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    on_bad_row: str = "skip",
    num_proc: int | None = None,
    max_completion_length: int | None = None,
) -> tuple[Dataset, dict[str, int]]:
    """Token ids of prompt, chosen and rejected for each pair (completions end with EOS unless truncated).

    The prompt is cut to max_prompt_length first: keep_end drops its oldest tokens (keeping a leading BOS),
    keep_start its newest. Completions are then cut to max_completion_length and to fit max_length (their
    start is kept, as TRL). max_length None means no limit;
    max_prompt_length None derives the prompt's share per pair (`truncate_pair`). Returns the
    tokenized dataset (prompt_input_ids, chosen_input_ids, rejected_input_ids, row_index) and the skip counts.
    """
    check_on_bad_row(on_bad_row)
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode {truncation_mode!r}: expected keep_end or keep_start")
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name} has no EOS token, which ends every completion; set tokenizer.eos_token")
    if len(dataset) == 0:  # map() on an empty dataset would not create the new columns
        return dataset, {}
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        remove_columns=[c for c in dataset.column_names if c not in KEPT_COLUMNS],
        fn_kwargs={
            "tokenizer": tokenizer,
            "limits": (max_length, max_prompt_length, truncation_mode, max_completion_length),
        },
        desc="Tokenizing pairs",
        num_proc=num_proc,
    )
    return drop_skipped(tokenized, on_bad_row, lambda row_index: f"row_index {row_index}")


def _tokenize_batch(batch, *, tokenizer, limits):
    prompts = encode(tokenizer, batch["prompt"])
    completions = {
        side: [
            completion_ids(tokenizer, prompt_ids, full_ids, completion)
            for prompt_ids, full_ids, completion in zip(
                prompts, encode(tokenizer, [p + c for p, c in zip(batch["prompt"], batch[side])]), batch[side]
            )
        ]
        for side in ("chosen", "rejected")
    }
    out = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], SKIP_REASON: []}
    for prompt, chosen, rejected in zip(prompts, completions["chosen"], completions["rejected"]):
        prompt, chosen, rejected, reason = truncate_pair(prompt, chosen, rejected, *limits, bos=tokenizer.bos_token_id)
        if not reason and (chosen == [tokenizer.eos_token_id] or rejected == [tokenizer.eos_token_id]):
            reason = "empty_completion"
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(chosen)
        out["rejected_input_ids"].append(rejected)
        out[SKIP_REASON].append(reason)
    return out


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    # A chat template may write the BOS text itself, and the tokenizer add its own: keep one.
    bos = tokenizer.bos_token_id
    return [row[1:] if bos is not None and row[:2] == [bos, bos] else row for row in ids]


def completion_ids(tokenizer, prompt_ids: list[int], full_ids: list[int], completion: str) -> list[int]:
    if full_ids[: len(prompt_ids)] == prompt_ids:
        ids = full_ids[len(prompt_ids) :]
    else:  # the boundary merged into one token: tokenize the completion alone
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids if ids and ids[-1] == eos else ids + [eos]


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str,
    max_completion_length: int | None = None,
    bos: int | None = None,
) -> tuple[list[int], list[int], list[int], str]:
    """Cut the prompt to max_prompt_length, then the completions to max_completion_length and to fit
    max_length; plus a skip reason or "".

    With max_prompt_length None (TRL's configs have only max_length) it is derived per pair: nothing is cut
    when prompt + the longer completion (at most max_completion_length) fit in max_length; otherwise the
    prompt keeps at most max(max_length − longer completion, max_length // 2) tokens and the completions are
    cut to the rest."""
    longer = max(len(chosen), len(rejected))
    if max_completion_length is not None:
        longer = min(longer, max_completion_length)
    if max_prompt_length is None and max_length is not None:
        max_prompt_length = max(max_length - longer, max_length // 2)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos is not None and prompt[0] == bos and max_prompt_length > 1:  # the model always saw BOS first
            prompt = [bos] + prompt[len(prompt) - max_prompt_length + 1 :]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    if max_length is None:
        room = longer
    else:
        room = max_length - len(prompt)
        if room <= 0:
            return prompt, [], [], "truncated_to_nothing"
        room = min(room, longer)
    if chosen[:room] == rejected[:room]:
        reason = "identical" if chosen == rejected else "identical_after_truncation"
        return prompt, chosen[:room], rejected[:room], reason
    return prompt, chosen[:room], rejected[:room], ""
