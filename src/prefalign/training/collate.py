"""The training batch: the pair collator's batch plus, with SPO, the degraded responses."""

from __future__ import annotations

import torch

from ..data.collate import PairCollator
from ..errors import PrefalignError
from ..modeling.packing import PrefixSharedCollator


class TrainingCollator:
    """Wraps the pair collator: with SPO the batch gains its degraded-response rows (packed into the pair's
    row with prefix sharing, as extra rows without)."""

    def __init__(self, collator, spo=None):
        self.collator = collator
        self.spo = spo
        self.draw_spo = True  # off while scoring pairs: ranking accuracy needs no SPO samples

    def __call__(self, rows: list[dict]) -> dict:
        extra = {}
        pair_rows = [{k: v for k, v in r.items() if not k.startswith("spo_")} for r in rows]
        spo = self.spo is not None and self.draw_spo and "spo_chosen_ids" in rows[0]
        if spo and isinstance(self.collator, PrefixSharedCollator):
            # The degraded completions share their pair's packed row (and prompt encoding).
            completions, source, degree = self.spo.draw(rows)
            pair_rows = [{**r, "extra_completion_ids": c} for r, c in zip(pair_rows, completions)]
            extra.update(spo_source=source, spo_degrees=degree)
            spo = False
        batch = self.collator(pair_rows)
        batch.update(extra)
        if spo:
            batch = self.spo.add(batch, rows)
        return batch


def pad_cat(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(a), pad(b)])


def collator_settings(data_collator, prefix_sharing: bool | None,
                      padding_free: bool | None = None) -> tuple[bool | None, bool | None, int]:
    """(prefix_sharing, padding_free, pad id) that a `data_collator` given to the trainer stands for.

    The trainer batches tokenized pairs itself (SPO samples, the reference pass, evaluation and the self-check
    read its batches' keys), so it takes prefalign's own collators for their layout and pad id: `PairCollator`
    is the unshared layout, `PrefixSharedCollator` the packed one (one pair per row, or several with its
    `padding_free`). Any other collator (transformers' DataCollatorWithPadding, TRL's
    DataCollatorForPreference, a subclass of ours) is refused: it would be dropped or fail mid-run."""
    kind = type(data_collator)
    if kind not in (PairCollator, PrefixSharedCollator):
        raise PrefalignError(f"data_collator: {kind.__name__} is not supported; prefalign batches the tokenized pairs "
                             "itself: omit data_collator (pad_token sets the padding token) or pass "
                             "prefalign.data.PairCollator / prefalign.modeling.PrefixSharedCollator")
    packed = kind is PrefixSharedCollator
    if prefix_sharing is not None and prefix_sharing != packed:
        raise PrefalignError(f"data_collator: {kind.__name__} is the {'packed' if packed else 'unshared'} layout, and "
                             f"prefix_sharing is {str(prefix_sharing).lower()}; pass the other collator or leave "
                             "prefix_sharing unset")
    free = packed and data_collator.padding_free
    if padding_free is not None and padding_free != free:
        layout = "several pairs per row" if free else "one pair per row" if packed else "unshared rows"
        raise PrefalignError(f"data_collator: {kind.__name__} makes {layout}, and padding_free is "
                             f"{str(padding_free).lower()}; pass a collator that does what padding_free says, or leave "
                             "padding_free unset")
    return packed, free, data_collator.pad_token_id
