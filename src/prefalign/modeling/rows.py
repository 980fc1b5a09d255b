"""How rows are built from tokenized pairs, in each layout (`layout.py` says which a batch has).

- unshared (`PairCollator`): 2B right-padded rows, prompt+chosen for each pair, then prompt+rejected, with
  `labels` -100 off the completion;
- prefix-shared (`PrefixSharedCollator`): one row per pair, prompt + chosen + rejected, with segment and
  position ids that let `packing.py` mask each completion off the other;
- packed (`PrefixSharedCollator(padding_free=True)`): as many prefix-shared pairs per row as fit
  (`first_fit_decreasing`), with a per-column pair map;
- varlen (`PairCollator(padding_free=True)`): the unshared rows, and the same 2B sequences laid end to end in
  one row without padding, position ids restarting at 0 for each, with their cu_seqlens (`varlen_row`): what
  a varlen kernel (flash attention) takes, which cannot share a prompt.

Extra completions of a pair's prompt (SPO's degraded responses) are extra unshared rows (`extra_rows`; in the
varlen row, further sequences after the pairs') or further segments of the pair's packed row (row key
`extra_completion_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, PrefalignError

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids; extra completions take 3, 4, ...
FIRST_EXTRA = 3
IGNORE_INDEX = -100  # the label of positions that carry no loss (prompt and padding)


class PairCollator:
    """The unshared layout: 2B right-padded rows, prompt+chosen of each pair, then prompt+rejected. With
    `padding_free` (the varlen layout, for flash attention) the batch also lays the same 2B sequences end to
    end in one row (`varlen_row`), which is what the model runs on; the padded rows stay for the labels, the
    reference cache and a reference model of another kernel."""

    def __init__(self, pad_token_id: int, *, padding_free: bool = False):
        if not isinstance(pad_token_id, int):
            raise ConfigError(
                f"pad_token_id {pad_token_id!r}: expected an int; a tokenizer without a pad token can pad with "
                "its EOS or UNK id (padding is masked out)"
            )
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        completions = [list(row["chosen_input_ids"]) for row in rows] + [list(row["rejected_input_ids"]) for row in rows]
        prompts = prompts + prompts
        batch = {
            **pad_sequences(list(zip(prompts, completions)), self.pad_token_id),
            "completion_lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
            "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "row_index": torch.tensor([row["row_index"] for row in rows], dtype=torch.long),
            **score_inputs(rows),
        }
        if self.padding_free:
            batch.update(varlen_row(batch["input_ids"], batch["attention_mask"], batch["row_index"]))
        return batch


VARLEN_KEYS = ("varlen_input_ids", "varlen_position_ids", "varlen_cu_seqlens")


def varlen_row(input_ids: torch.Tensor, attention_mask: torch.Tensor,
               row_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows [S, W] laid end to end in one row without their padding: `varlen_input_ids` and
    `varlen_position_ids` [1, N] (0, 1, … for each sequence) and `varlen_cu_seqlens` int32 [S+1] (where each
    sequence starts, then N), flash attention's cu_seqlens. Batch dimension 1: transformers recognises packed
    sequences from position ids only there (`_is_packed_sequence`)."""
    lengths = attention_mask.sum(1)
    if bool((lengths == 0).any()):  # it would take no column, and nothing could say where it is
        empty = int((lengths == 0).nonzero()[0])
        pair = ""
        if row_index is not None and empty < 2 * len(row_index):  # chosen of pair i, then rejected of pair i
            pair = f" (dataset row {int(row_index[empty % len(row_index)])})"
        raise PrefalignError(f"sequence {empty} of the batch{pair} has no tokens (empty prompt and completion); "
                             "padding-free packing needs at least one")
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return {
        "varlen_input_ids": input_ids[attention_mask.bool()][None],
        "varlen_position_ids": (torch.arange(int(cu_seqlens[-1])) - starts)[None],
        "varlen_cu_seqlens": cu_seqlens,
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


def extra_rows(rows: Sequence[dict], completions: Sequence[Sequence[list[int]]], pad_token_id: int) -> dict:
    """The unshared layout's extra completions: row i's prompt + each of `completions[i]`, right-padded, in row
    order (SPO's degraded responses, hence the keys `spo_input_ids`, `spo_attention_mask`, `spo_labels`)."""
    padded = pad_sequences([(list(r["prompt_input_ids"]), c) for r, cs in zip(rows, completions) for c in cs],
                           pad_token_id)
    return {f"spo_{k}": v for k, v in padded.items()}


def first_fit_decreasing(sizes: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """Indices of `sizes` grouped into rows of at most `capacity` (default: the largest size), first-fit
    decreasing: largest first, each into the first row with room. A size above `capacity` gets a row of its
    own. Ties keep the input order, so the same sizes always give the same rows."""
    capacity = max(sizes, default=0) if capacity is None else capacity
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for r, free in enumerate(room):
            if sizes[i] <= free:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(capacity - sizes[i])
    return rows


class PrefixSharedCollator:
    """Batch tokenized pairs as right-padded rows of prompt + chosen + rejected: one pair per row, or with
    `padding_free` as many pairs per row as fit (`first_fit_decreasing` by packed length; a row at most
    `row_length` tokens, default the batch's longest pair, so no row is wider than one pair per row makes it).

    Adds `packed_input_ids`, `packed_position_ids` (0.. over prompt+chosen, restarting at len(prompt) for the
    rejected part, and at 0 for each pair), `packed_segment_ids` (PROMPT, CHOSEN, REJECTED, PAD) and
    `packed_pair_ids` (the index of each column's pair in `rows`; padding takes its row's last pair) to the
    `PairCollator` batch, so the reference cache, evaluation and SPO keep working on the unshared keys, which
    stay in pair order. With `keep_unshared=False` only the packed keys, `prompt_lengths`,
    `completion_lengths` and `row_index` are returned.
    """

    def __init__(self, pad_token_id: int, *, keep_unshared: bool = True, padding_free: bool = False,
                 row_length: int | None = None):
        self.pairs = PairCollator(pad_token_id)  # validates the pad id
        if row_length is not None and (isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1):
            raise ValueError(f"row_length {row_length!r}: expected a whole number of tokens >= 1, or None")
        self.pad_token_id = pad_token_id
        self.keep_unshared = keep_unshared
        self.padding_free = padding_free
        self.row_length = row_length

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        parts = [
            (
                list(r["prompt_input_ids"]),
                [list(r["chosen_input_ids"]), list(r["rejected_input_ids"])]
                + [list(c) for c in r.get("extra_completion_ids") or []],
            )
            for r in rows
        ]
        sizes = [len(p) + sum(len(c) for c in completions) for p, completions in parts]
        if self.padding_free:
            # A pair without tokens would occupy no column, so nothing could say where its log-probs are
            # (tokenization drops empty completions; only hand-made rows get here).
            empty = [r.get("row_index", i) for i, (r, n) in enumerate(zip(rows, sizes)) if n == 0]
            if empty:
                raise PrefalignError(f"pair of dataset row {empty[0]} has no tokens (empty prompt and completions); "
                                     "padding-free packing needs at least one")
            groups = first_fit_decreasing(sizes, self.row_length)
        else:
            groups = [[i] for i in range(len(rows))]
        width = max(sum(sizes[i] for i in group) for group in groups)
        ids = torch.full((len(groups), width), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((len(groups), width), dtype=torch.long)
        seg = torch.full((len(groups), width), PAD, dtype=torch.long)
        pair = torch.empty((len(groups), width), dtype=torch.long)
        for r, group in enumerate(groups):
            at = 0
            for i in group:
                p, completions = parts[i]
                n_p = len(p)
                pair[r, at:] = i  # to the row's end: the padding after the last pair belongs to it
                ids[r, at : at + n_p] = torch.tensor(p, dtype=torch.long)
                pos[r, at : at + n_p] = torch.arange(n_p)
                seg[r, at : at + n_p] = PROMPT
                at += n_p
                for segment, c in enumerate(completions, start=CHOSEN):
                    ids[r, at : at + len(c)] = torch.tensor(c, dtype=torch.long)
                    pos[r, at : at + len(c)] = torch.arange(n_p, n_p + len(c))  # as if right after the prompt
                    seg[r, at : at + len(c)] = segment
                    at += len(c)
        if self.keep_unshared:
            batch = self.pairs([{k: v for k, v in r.items() if k != "extra_completion_ids"} for r in rows])
        else:
            prompts = [len(p) for p, _ in parts]
            batch = {
                "completion_lengths": torch.tensor([len(c[0]) for _, c in parts] + [len(c[1]) for _, c in parts]),
                "prompt_lengths": torch.tensor(prompts + prompts),
                "row_index": torch.tensor([row["row_index"] for row in rows], dtype=torch.long),
                **score_inputs(rows),
            }
        batch.update(packed_input_ids=ids, packed_position_ids=pos, packed_segment_ids=seg, packed_pair_ids=pair)
        return batch
