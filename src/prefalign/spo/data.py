"""SPO columns for tokenized pairs: the token ids of each response's degraded versions (degrees 1…K−1).

Built once during preprocessing with `Dataset.map` (so `datasets` caches it); degree 0 is the pair's own
completion, already in the row.

Only message text is degraded: the completion's template markup (the tokenizer's special tokens and the
whitespace around them at either edge, e.g. SmolLM2's closing `<|im_end|>`) is put back verbatim around every
degraded version (see `degrade.py`). Degraded versions also end the way the intact completion ends as
tokenized: when max_length cut the intact one (so it has no end-of-turn markup and no EOS), its degraded
versions drop theirs too, or the end-of-turn token alone would tell a short degraded version from a cut intact
one.
"""

from __future__ import annotations

from datasets import Dataset

from ..data.tokenize import completion_ids, encode
from .degrade import graded_versions, markup_tokens, split_markup

SIDES = ("chosen", "rejected")
SPO_ON = ("both", "chosen", "rejected")


def _version_ids(tokenizer, prompt: str, versions: list[str], tail: str, *, whole: bool, room: int | None):
    """Completion ids of `versions` (degraded, each ending in the intact completion's `tail`) after `prompt`.
    `whole`: the intact completion kept its end (EOS); otherwise the versions lose their tail and EOS as it did."""
    if not whole:
        versions = [v[: len(v) - len(tail)] for v in versions]
    full_prompt = encode(tokenizer, [prompt])[0]
    full = encode(tokenizer, [prompt + v for v in versions])
    ids = [completion_ids(tokenizer, full_prompt, f, v) for f, v in zip(full, versions)]
    if not whole:
        ids = [x[:-1] if x and x[-1] == tokenizer.eos_token_id else x for x in ids]
    return [x[:room] for x in ids]


def _degrade_batch(batch, *, texts, tokenizer, degrees, sides, max_length, max_completion_length=None):
    out = {f"spo_{side}_ids": [] for side in SIDES}
    out["spo_status"] = []
    markup = markup_tokens(tokenizer)
    for i, (row_index, prompt_ids) in enumerate(zip(batch["row_index"], batch["prompt_input_ids"])):
        prompt, responses = texts[row_index][0], texts[row_index][1:]
        statuses = []
        for side, response in zip(SIDES, responses):
            versions = graded_versions(response, degrees, markup) if side in sides else None
            ids: list[list[int]] = []
            if versions is not None:
                room = None if max_length is None else max_length - len(prompt_ids)
                if max_completion_length is not None:  # cut as the intact completions were
                    room = max_completion_length if room is None else min(room, max_completion_length)
                intact = batch[f"{side}_input_ids"][i]
                whole = bool(intact) and intact[-1] == tokenizer.eos_token_id
                tail = split_markup(response, markup)[2]
                ids = _version_ids(tokenizer, prompt, versions[1:], tail, whole=whole, room=room)
                if any(len(x) == 0 for x in ids):
                    ids = []
            statuses.append("ok" if ids else ("not_graded" if side in sides else "off"))
            out[f"spo_{side}_ids"].append(ids)
        out["spo_status"].append(",".join(statuses))
    return out


def add_spo_columns(
    pairs: Dataset,
    tokenized: Dataset,
    tokenizer,
    *,
    degrees: int = 4,
    spo_on: str = "both",
    max_length: int | None = None,
    max_completion_length: int | None = None,
) -> tuple[Dataset, dict[str, int]]:
    """`tokenized` plus spo_chosen_ids / spo_rejected_ids (K−1 lists each, or [] for no SPO sample), and counts
    of responses with and without SPO samples. `pairs` is the string dataset the tokenized rows came from."""
    if spo_on not in SPO_ON:
        raise ValueError(f"spo_on must be one of {', '.join(SPO_ON)}, got {spo_on!r}")
    sides = SIDES if spo_on == "both" else (spo_on,)
    texts = {r: (p, c, j) for r, p, c, j in zip(pairs["row_index"], pairs["prompt"], pairs["chosen"], pairs["rejected"])}
    out = tokenized.map(
        _degrade_batch,
        batched=True,
        fn_kwargs={"texts": texts, "tokenizer": tokenizer, "degrees": degrees, "sides": sides, "max_length": max_length,
                   "max_completion_length": max_completion_length},
        desc="SPO: degrading key phrases",
    )
    counts = {"spo_responses": 0, "spo_no_sample": 0}
    for status in out["spo_status"]:
        for s in status.split(","):
            if s == "ok":
                counts["spo_responses"] += 1
            elif s == "not_graded":
                counts["spo_no_sample"] += 1
    return out.remove_columns("spo_status"), counts
