"""The training batch: the pair collator's batch plus, with SPO, the degraded responses (laid out as
`modeling.layout.collate_pairs` says for the collator's layout)."""

from __future__ import annotations

from ..errors import PrefalignError
from ..modeling.layout import Layout, collate_pairs, pad_cat  # noqa: F401  (pad_cat: its old home was here)


class TrainingCollator:
    """Wraps the pair collator: with SPO the batch gains its degraded-response rows (packed into the pair's
    row with prefix sharing, as extra rows without)."""

    def __init__(self, collator, spo=None):
        self.collator = collator
        self.spo = spo
        self.draw_spo = True  # off while scoring pairs: ranking accuracy needs no SPO samples

    def __call__(self, rows: list[dict]) -> dict:
        pair_rows = [{k: v for k, v in r.items() if not k.startswith("spo_")} for r in rows]
        if not (self.spo is not None and self.draw_spo and "spo_chosen_ids" in rows[0]):
            return self.collator(pair_rows)
        completions, source, degree = self.spo.draw(rows)
        batch = collate_pairs(self.collator, pair_rows, completions)
        batch.update(spo_source=source, spo_degrees=degree)
        return batch


def collator_settings(data_collator, prefix_sharing: bool | None,
                      padding_free: bool | None = None) -> tuple[bool | None, bool | None, int]:
    """(prefix_sharing, padding_free, pad id) that a `data_collator` given to the trainer stands for.

    The trainer batches tokenized pairs itself (SPO samples, the reference pass, evaluation and the self-check
    read its batches' keys), so it takes prefalign's own collators for their layout and pad id: `PairCollator`
    is the unshared layout (with its `padding_free`, whole sequences in one row: for flash attention),
    `PrefixSharedCollator` the packed one (one pair per row, or several with its `padding_free`). Any other
    collator (transformers' DataCollatorWithPadding, TRL's DataCollatorForPreference, a subclass of ours) is
    refused: it would be dropped or fail mid-run."""
    kind = type(data_collator)
    layout = Layout.of_collator(data_collator)
    if layout is None:
        raise PrefalignError(f"data_collator: {kind.__name__} is not supported; prefalign batches the tokenized pairs "
                             "itself: omit data_collator (pad_token sets the padding token) or pass "
                             "prefalign.data.PairCollator / prefalign.modeling.PrefixSharedCollator")
    packed = layout.shares_prefix
    if prefix_sharing is not None and prefix_sharing != packed:
        raise PrefalignError(f"data_collator: {kind.__name__} is the {'packed' if packed else 'unshared'} layout, and "
                             f"prefix_sharing is {str(prefix_sharing).lower()}; pass the other collator or leave "
                             "prefix_sharing unset")
    free = layout in (Layout.PACKED, Layout.VARLEN)
    if padding_free is not None and padding_free != free:
        made = {Layout.PACKED: "several pairs per row", Layout.VARLEN: "whole sequences end to end in one row",
                Layout.PREFIX_SHARED: "one pair per row"}.get(layout, "unshared rows")
        raise PrefalignError(f"data_collator: {kind.__name__} makes {made}, and padding_free is "
                             f"{str(padding_free).lower()}; pass a collator that does what padding_free says, or leave "
                             "padding_free unset")
    return packed, free, data_collator.pad_token_id
