"""Adds SPO samples to a batch of pairs: for each response with degraded versions, `spo_samples` degrees
drawn at random. Degree 0 is the response itself, so its sample reuses the pair's own row (no extra compute);
other degrees become extra rows prompt + degraded completion, or, with prefix sharing, extra completions
packed after the pair's rejected one (see `prefix_sharing`)."""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from ..data.collate import pad_sequences


class SPOCollator:
    def __init__(self, pad_token_id: int, *, degrees: int, samples: int = 1, seed: int = 0):
        self.pad_token_id = pad_token_id
        self.degrees = degrees
        self.samples = samples
        self.seed = seed
        self._visits: dict[int, int] = defaultdict(int)

    def _rng(self, row_index: int) -> random.Random:
        # Deterministic per row and visit: the same run draws the same degrees.
        visit = self._visits[row_index]
        self._visits[row_index] += 1
        return random.Random(f"{self.seed}:{row_index}:{visit}")

    def draw(self, rows: list[dict]) -> tuple[list[list[list[int]]], torch.Tensor, torch.Tensor]:
        """Draw this batch's SPO samples. Returns each row's degraded completions to run (degree > 0), and for
        every sample its source row — chosen i, rejected B+i, or 2B+j for the j-th degraded completion in row
        order — and its degree."""
        b = len(rows)
        extras: list[list[list[int]]] = [[] for _ in rows]
        n_extra = 0
        source, degree = [], []
        for i, row in enumerate(rows):
            rng = self._rng(int(row["row_index"]))
            for side_offset, side in ((0, "chosen"), (b, "rejected")):
                versions = row.get(f"spo_{side}_ids") or []
                if not versions:
                    continue
                for _ in range(self.samples):
                    d = rng.randrange(self.degrees)
                    degree.append(d)
                    if d == 0:
                        source.append(side_offset + i)
                    else:
                        source.append(2 * b + n_extra)
                        extras[i].append(list(versions[d - 1]))
                        n_extra += 1
        return extras, torch.tensor(source, dtype=torch.long), torch.tensor(degree, dtype=torch.long)

    def add(self, batch: dict, rows: list[dict]) -> dict:
        """Unshared layout: the degraded completions as extra rows prompt + completion (`spo_input_ids`, …)."""
        extras, source, degree = self.draw(rows)
        new_rows = [(list(row["prompt_input_ids"]), c) for row, cs in zip(rows, extras) for c in cs]
        padded = pad_sequences(new_rows, self.pad_token_id)
        batch.update(
            spo_input_ids=padded["input_ids"],
            spo_attention_mask=padded["attention_mask"],
            spo_labels=padded["labels"],
            spo_source=source,
            spo_degrees=degree,
        )
        return batch


def all_degree_rows(rows: list[dict], degrees: int, pad_token_id: int) -> dict:
    """Every degree of every gradable response (for evaluation): degree 0 rows are the intact completions."""
    seqs, degree = [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            versions = row.get(f"spo_{side}_ids") or []
            if not versions:
                continue
            for d, completion in enumerate([row[f"{side}_input_ids"], *versions]):
                seqs.append((list(row["prompt_input_ids"]), list(completion)))
                degree.append(d)
    return {**pad_sequences(seqs, pad_token_id), "degrees": torch.tensor(degree, dtype=torch.long)}


def all_degree_packed(rows: list[dict], degrees: int, collator) -> dict:
    """`all_degree_rows` in the prefix-sharing layout: one packed row per pair holding the prompt, chosen,
    rejected and every degraded version (`collator` is a `PrefixSharedCollator`). `sources` index the hidden
    means `prefix_shared_logps(..., with_hidden_mean=True)` returns: chosen i, rejected B+i, extra 2B+j."""
    b = len(rows)
    packed_rows, sources, degree = [], [], []
    n_extra = 0
    for i, row in enumerate(rows):
        extras = []
        for offset, side in ((0, "chosen"), (b, "rejected")):
            versions = row.get(f"spo_{side}_ids") or []
            if not versions:
                continue
            sources.append(offset + i)
            degree.append(0)
            for d, completion in enumerate(versions, start=1):
                sources.append(2 * b + n_extra)
                degree.append(d)
                extras.append(list(completion))
                n_extra += 1
        packed_rows.append({
            "prompt_input_ids": row["prompt_input_ids"], "chosen_input_ids": row["chosen_input_ids"],
            "rejected_input_ids": row["rejected_input_ids"], "row_index": row["row_index"],
            "extra_completion_ids": extras,
        })
    batch = collator(packed_rows)
    batch.update(sources=torch.tensor(sources, dtype=torch.long), degrees=torch.tensor(degree, dtype=torch.long))
    return batch
