"""Adds SPO samples to a batch of pairs: for each response with degraded versions, `spo_samples` degrees
drawn at random. Degree 0 is the response itself, so its sample reuses the pair's own row (no extra compute);
other degrees become extra rows prompt + degraded completion, or, with prefix sharing, extra completions
packed after the pair's rejected one (see `prefix_sharing`).

Sampling is a pure function of (seed, epoch, row index, side, sample number) — `draw_degree` — and the
collator holds no counter. So a run resumed from a checkpoint draws exactly what the uninterrupted run would
have (given the epoch), each DataLoader worker's copy of the collator draws what the main process would, and
the draws do not depend on which rows were drawn before or in which order. Within an epoch a row revisited
(e.g. a repeated index) gets the same degrees; each epoch draws afresh. The trainer sets the epoch with
`set_epoch` at each epoch start; with persistent DataLoader workers the workers keep the copy they were made
with, so set it before their iterator is created (transformers' default, non-persistent workers, re-copy it
every epoch).

Evaluation draws from its own stream (`evaluation=True`, or `for_evaluation()` for an evaluation DataLoader):
independent of the training draws, unable to change them (nothing is stored), and blind to the epoch, so
every evaluation of a run scores the same samples and evaluations stay comparable. (Without the flag an
evaluation still leaves training draws alone; it only shares their stream.)
"""

from __future__ import annotations

import copy
import random

import torch

from ..modeling.layout import Layout
from ..modeling.rows import extra_rows, pad_sequences


def draw_degree(
    seed: int, epoch: int, row_index: int, side: str, sample: int, degrees: int, *, evaluation: bool = False
) -> int:
    """The degree of one SPO sample, uniform over 0…degrees−1, from its coordinates only.

    A string seed goes through SHA-512 in `random.Random`, so the draw is the same in every process and
    Python version that keeps that seeding (not affected by PYTHONHASHSEED). Evaluation uses its own stream
    and no epoch."""
    where = f"eval:{seed}" if evaluation else f"train:{seed}:{epoch}"
    return random.Random(f"spo:{where}:{row_index}:{side}:{sample}").randrange(degrees)


class SPOCollator:
    def __init__(self, pad_token_id: int, *, degrees: int, samples: int = 1, seed: int = 0, evaluation: bool = False):
        self.pad_token_id = pad_token_id
        self.degrees = degrees
        self.samples = samples
        self.seed = seed
        self.evaluation = evaluation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the training samples of `epoch` from now on (the trainer calls this at each epoch start)."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a whole number >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def for_evaluation(self) -> SPOCollator:
        """A copy drawing from the evaluation stream, for evaluation DataLoaders."""
        other = copy.copy(self)
        other.evaluation = True
        return other

    def degrees_for(self, row_index: int, side: str) -> list[int]:
        """The `samples` degrees drawn for one response in the current epoch (or evaluation stream)."""
        return [
            draw_degree(self.seed, self.epoch, row_index, side, j, self.degrees, evaluation=self.evaluation)
            for j in range(self.samples)
        ]

    def draw(self, rows: list[dict]) -> tuple[list[list[list[int]]], torch.Tensor, torch.Tensor]:
        """Draw this batch's SPO samples. Returns each row's degraded completions to run (degree > 0), and for
        every sample its source row — chosen i, rejected B+i, or 2B+j for the j-th degraded completion in row
        order — and its degree."""
        b = len(rows)
        extras: list[list[list[int]]] = [[] for _ in rows]
        n_extra = 0
        source, degree = [], []
        for i, row in enumerate(rows):
            for side_offset, side in ((0, "chosen"), (b, "rejected")):
                versions = row.get(f"spo_{side}_ids") or []
                if not versions:
                    continue
                for d in self.degrees_for(int(row["row_index"]), side):
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
        batch.update(extra_rows(rows, extras, self.pad_token_id), spo_source=source, spo_degrees=degree)
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


def all_degree_collate(layout: Layout, pad_token_id: int, degrees: int):
    """The collate function of `layout`'s degree batches (`all_degree_packed` when the prefix is shared, one
    pair per row; else `all_degree_rows`); `modeling.layout.completion_hidden_means` scores them."""
    if layout.shares_prefix:
        collator = Layout.PREFIX_SHARED.collator(pad_token_id, keep_unshared=False)
        return lambda rows: all_degree_packed(rows, degrees, collator)
    return lambda rows: all_degree_rows(rows, degrees, pad_token_id)
