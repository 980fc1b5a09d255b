"""The batch layout's one home: which layouts there are, the collator that builds each, and how a batch is
scored. The trainer, the reference pass, evaluation, bench, SPO and the self-check ask this module; none of
them looks at a batch's keys to learn its layout.

- `Layout.UNSHARED`: 2B right-padded rows, prompt+chosen of each pair, then prompt+rejected (`PairCollator`);
  extra completions of a pair's prompt (SPO's degraded responses) are further rows of the same forward.
- `Layout.PREFIX_SHARED`: one row per pair, prompt + chosen + rejected under a 4-D mask
  (`PrefixSharedCollator`); extra completions are further segments of the pair's row.
- `Layout.PACKED`: as many prefix-shared pairs per row as fit (padding-free, first-fit decreasing).
- `Layout.VARLEN`: for varlen kernels (flash attention), which cannot share a prompt: the 2B whole sequences
  end to end in one row, position ids restarting at 0 for each, no attention mask, cu_seqlens handed to the
  kernel (`PairCollator(padding_free=True)`, which keeps the unshared rows too); extra completions are
  further sequences of the row.

Its parts: `rows.py` builds the rows from tokenized pairs; `packing.py` gives the attention inputs for each
backend (bool mask for sdpa, additive for eager, a `BlockMask` for flex_attention, position ids and
cu_seqlens for a varlen kernel; which models accept them) and maps the per-token log-probs of prefix-shared
and varlen rows back to per-pair and per-completion sums; `logps.py` scores unshared rows. `pair_logps` is
the one entry point: [2B] log-probs, chosen then rejected, in pair order, whatever the layout.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from .logps import SequenceLogps, sequence_logps
from .packing import (
    PrefixSharingRefused,
    packed_inputs,
    packing_plan,
    prefix_shared_logps,
    varlen_logps,
    varlen_plan,
)
from .rows import IGNORE_INDEX, PAD, VARLEN_KEYS, PairCollator, PrefixSharedCollator, extra_rows, varlen_row


class Layout(enum.Enum):
    UNSHARED = "unshared"
    PREFIX_SHARED = "prefix-shared"
    PACKED = "packed"
    VARLEN = "varlen"

    @classmethod
    def of(cls, prefix_sharing: bool, padding_free: bool = False) -> Layout:
        """The layout of the (resolved, `packing.resolve_layout`) `prefix_sharing` and `padding_free` settings:
        padding-free without prefix sharing is the varlen layout, which only a varlen kernel is given."""
        if not prefix_sharing:
            return cls.VARLEN if padding_free else cls.UNSHARED
        return cls.PACKED if padding_free else cls.PREFIX_SHARED

    @classmethod
    def of_collator(cls, collator) -> Layout | None:
        """The layout prefalign's own collator builds; None for any other collator (a subclass included)."""
        if type(collator) is PairCollator:
            return cls.VARLEN if collator.padding_free else cls.UNSHARED
        if type(collator) is PrefixSharedCollator:
            return cls.PACKED if collator.padding_free else cls.PREFIX_SHARED
        return None

    @property
    def shares_prefix(self) -> bool:
        return self in (Layout.PREFIX_SHARED, Layout.PACKED)

    def accepts(self, model: torch.nn.Module) -> bool:
        """Whether `model` scores batches of this layout exactly (`packing.packing_plan` / `varlen_plan`; the
        unshared layout: every model). A model that does not scores a batch's unshared rows."""
        try:
            if self.shares_prefix:
                packing_plan(model)
            elif self is Layout.VARLEN:
                varlen_plan(model)
        except PrefixSharingRefused:
            return False
        return True

    def collator(self, pad_token_id: int, *, keep_unshared: bool = True, row_length: int | None = None):
        """The collator that builds this layout. A prefix-shared batch also carries the unshared rows unless
        `keep_unshared` is False (they let a reference model that refuses prefix sharing score it); a varlen
        batch always does (its labels)."""
        if self is Layout.UNSHARED:
            return PairCollator(pad_token_id)
        if self is Layout.VARLEN:
            return PairCollator(pad_token_id, padding_free=True)
        return PrefixSharedCollator(pad_token_id, keep_unshared=keep_unshared, padding_free=self is Layout.PACKED,
                                    row_length=row_length)

    def pair_tokens(self, n_prompt: int, n_chosen: int, n_rejected: int) -> int:
        """The columns a pair takes in a row: prompt + chosen + rejected when the prefix is shared, prompt + the
        longer completion when not (both of its rows are padded to it), both sequences whole in the varlen row."""
        if self.shares_prefix:
            return n_prompt + n_chosen + n_rejected
        if self is Layout.VARLEN:
            return 2 * n_prompt + n_chosen + n_rejected
        return n_prompt + max(n_chosen, n_rejected)


def batch_layout(batch: dict) -> Layout:
    """The layout a collated batch carries (PACKED: its rows have a pair map, one pair per row being the special
    case). The only place that reads a batch's keys to tell."""
    if "packed_input_ids" not in batch:
        return Layout.VARLEN if VARLEN_KEYS[0] in batch else Layout.UNSHARED
    return Layout.PACKED if "packed_pair_ids" in batch else Layout.PREFIX_SHARED


def collate_pairs(collator, rows: Sequence[dict], extra_completions: Sequence[Sequence[list[int]]] | None = None) -> dict:
    """A batch of tokenized pairs in `collator`'s layout. `extra_completions[i]` (SPO's degraded responses of
    pair i) ride in the same forward: further segments of pair i's row when the prefix is shared, else rows
    prompt + completion after the pair rows (`spo_input_ids`, `spo_attention_mask`, `spo_labels`), which the
    varlen row then carries after the pairs' sequences."""
    if extra_completions is None:
        return collator(rows)
    layout = Layout.of_collator(collator)
    if layout.shares_prefix:
        return collator([{**r, "extra_completion_ids": c} for r, c in zip(rows, extra_completions)])
    batch = collator(rows)
    batch.update(extra_rows(rows, extra_completions, collator.pad_token_id))
    if layout is Layout.VARLEN:
        batch.update(varlen_row(pad_cat(batch["input_ids"], batch["spo_input_ids"], collator.pad_token_id),
                                pad_cat(batch["attention_mask"], batch["spo_attention_mask"], 0), batch["row_index"]))
    return batch


def pad_cat(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """`a` over `b`, the narrower right-padded with `value` to the wider's columns."""
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(a), pad(b)])


def pair_logps(model: torch.nn.Module, batch: dict, *, layout: Layout | None = None, with_hidden_mean: bool = False,
               with_sum_sq: bool = False) -> SequenceLogps:
    """[2B] completion log-probs of a batch of pairs (chosen of pairs 0..B-1, then rejected), from one forward
    in the layout the batch carries, or in `layout` (Layout.UNSHARED scores a prefix-shared batch's unshared
    rows, which its collator keeps unless keep_unshared=False: for a reference model that refuses prefix
    sharing).

    `with_hidden_mean` adds each completion's mean final hidden state (SPO), the extra completions' after the
    2B pair rows: packed, by pair then segment; unshared, the extra rows run in the same forward, in row order
    (only the pair rows go through the output head); varlen, they are further sequences of the row, which
    always carries them."""
    layout = batch_layout(batch) if layout is None else layout
    if layout.shares_prefix:
        return prefix_shared_logps(model, *packed_inputs(batch), with_hidden_mean=with_hidden_mean,
                                   with_sum_sq=with_sum_sq)
    if layout is Layout.VARLEN:
        labels = batch["labels"]
        n_scored = labels.shape[0]
        if "spo_labels" in batch:  # `collate_pairs` laid the extra completions in the row after the pairs
            labels = pad_cat(labels, batch["spo_labels"], IGNORE_INDEX)
        return varlen_logps(model, *(batch[k] for k in VARLEN_KEYS), labels, n_scored=n_scored,
                            with_hidden_mean=with_hidden_mean, with_sum_sq=with_sum_sq)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_scored = None
    if with_hidden_mean and "spo_input_ids" in batch:
        n_scored = ids.shape[0]
        ids = pad_cat(ids, batch["spo_input_ids"], 0)
        mask = pad_cat(mask, batch["spo_attention_mask"], 0)
        labels = pad_cat(labels, batch["spo_labels"], IGNORE_INDEX)
    return sequence_logps(model, ids, mask, labels, with_hidden_mean=with_hidden_mean, with_sum_sq=with_sum_sq,
                          n_scored=n_scored)


def completion_hidden_means(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[N, H] mean final hidden state of each completion of a batch of SPO degree rows (`spo.all_degree_collate`),
    in the order of its `degrees`; no log-probs are computed."""
    if batch_layout(batch).shares_prefix:
        return prefix_shared_logps(model, *packed_inputs(batch), with_hidden_mean=True).hidden_mean[batch["sources"]]
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], with_hidden_mean=True,
                          n_scored=0).hidden_mean


def forward_tokens(batch: dict) -> tuple[int, int | torch.Tensor]:
    """(tokens, padding) of the tensor a training micro-batch's forward is given: rows × columns, padding
    included, and how many of them are padding (an int, or a 0-d tensor on the batch's device)."""
    layout = batch_layout(batch)
    if layout is Layout.VARLEN:  # one row, no padding; SPO's degraded completions are sequences in it
        return batch[VARLEN_KEYS[0]].numel(), 0
    if layout.shares_prefix:  # SPO's degraded completions are segments in the packed rows
        ids = batch["packed_input_ids"]
        return ids.numel(), (batch["packed_segment_ids"] == PAD).sum()
    rows, width = batch["input_ids"].shape
    real = batch["attention_mask"].sum()
    spo = batch.get("spo_input_ids")
    if spo is not None and spo.shape[0] > 0:  # one forward with the pair rows, padded to the wider (pad_cat)
        rows, width = rows + spo.shape[0], max(width, spo.shape[1])
        real = real + batch["spo_attention_mask"].sum()
    return rows * width, rows * width - real
