"""SPO columns for tokenized pairs: the token ids of each response's degraded versions (degrees 1…K−1).

Built once during preprocessing with `Dataset.map` (so `datasets` caches it); degree 0 is the pair's own
completion, already in the row.
"""

from __future__ import annotations

from datasets import Dataset

from ..data.tokenize import _completion_ids, _encode
from .degrade import graded_versions

SIDES = ("chosen", "rejected")
SPO_ON = ("both", "chosen", "rejected")


def _degrade_batch(batch, *, texts, tokenizer, degrees, sides, max_length):
    out = {f"spo_{side}_ids": [] for side in SIDES}
    out["spo_status"] = []
    for row_index, prompt_ids in zip(batch["row_index"], batch["prompt_input_ids"]):
        prompt, responses = texts[row_index][0], texts[row_index][1:]
        statuses = []
        for side, response in zip(SIDES, responses):
            versions = graded_versions(response, degrees) if side in sides else None
            ids: list[list[int]] = []
            if versions is not None:
                room = None if max_length is None else max_length - len(prompt_ids)
                full = _encode(tokenizer, [prompt + v for v in versions[1:]])
                full_prompt = _encode(tokenizer, [prompt])[0]
                ids = [_completion_ids(tokenizer, full_prompt, f, v)[:room] for f, v in zip(full, versions[1:])]
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
        fn_kwargs={"texts": texts, "tokenizer": tokenizer, "degrees": degrees, "sides": sides, "max_length": max_length},
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
