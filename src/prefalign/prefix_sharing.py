"""Prefix sharing: one packed row per pair, prompt + chosen + rejected, instead of two rows that each carry the prompt.

A 4-D attention mask lets the chosen and rejected tokens see the prompt but not each other (causal within
each), and the position ids restart after the prompt for the rejected part. Every token therefore sees the
context, at the positions, it would see in its own unshared row, so the per-sequence log-probs equal those of
`logps.sequence_logps` on the `PairCollator` layout (up to float rounding) while the model runs on B rows of
P+C+R tokens instead of 2B rows of P+max(C,R): the prompt is encoded once per pair.

    collator = PrefixSharedCollator(pad_token_id=tok.pad_token_id)  # the PairCollator keys plus packed_* keys
    batch = collator(rows)
    lp = prefix_shared_logps(model, *packed_inputs(batch))  # SequenceLogps [2B]: chosen rows, then rejected

The log-probs come from the same completion-only, chunked output head as `logps.sequence_logps` (which is
called on the packed forward's hidden states, rearranged into the 2B unshared rows).

Extra completions of the same prompt (SPO's degraded responses, row key `extra_completion_ids`) are packed
after the rejected one as further segments 3, 4, …, each seeing only the prompt and itself; they are not
scored, only their mean final hidden state is returned (after the 2B pair rows) when asked for.

Attention: transformers passes a 4-D mask to the attention function unchanged. For `sdpa` it is a bool mask
(True = attend); for `eager` an additive float mask (0 or the dtype's minimum), since eager adds the mask to
the scores. Other implementations (flash, flex) are refused. Every query sees at least itself, so no softmax
row is empty and padding stays finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from .data.collate import PairCollator
from .logps import CHUNK_TOKENS, SequenceLogps, output_head, sequence_logps

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids; extra completions take 3, 4, ...
FIRST_EXTRA = 3
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_segment_ids")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class PrefixSharedCollator:
    """Batch tokenized pairs as B right-padded rows prompt + chosen + rejected.

    Adds `packed_input_ids`, `packed_position_ids` (0.. over prompt+chosen, restarting at len(prompt) for the
    rejected part) and `packed_segment_ids` (PROMPT, CHOSEN, REJECTED, PAD) to the `PairCollator` batch, so the
    reference cache, evaluation and SPO keep working on the unshared keys. With `keep_unshared=False` only the
    packed keys, `prompt_lengths`, `completion_lengths` and `row_index` are returned.
    """

    def __init__(self, pad_token_id: int, *, keep_unshared: bool = True):
        self.pairs = PairCollator(pad_token_id)  # validates the pad id
        self.pad_token_id = pad_token_id
        self.keep_unshared = keep_unshared

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        parts = [
            (
                list(r["prompt_input_ids"]),
                [list(r["chosen_input_ids"]), list(r["rejected_input_ids"])]
                + [list(c) for c in r.get("extra_completion_ids") or []],
            )
            for r in rows
        ]
        width = max(len(p) + sum(len(c) for c in completions) for p, completions in parts)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        seg = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, (p, completions) in enumerate(parts):
            n_p = len(p)
            ids[i, :n_p] = torch.tensor(p, dtype=torch.long)
            pos[i, :n_p] = torch.arange(n_p)
            seg[i, :n_p] = PROMPT
            at = n_p
            for segment, c in enumerate(completions, start=CHOSEN):
                ids[i, at : at + len(c)] = torch.tensor(c, dtype=torch.long)
                pos[i, at : at + len(c)] = torch.arange(n_p, n_p + len(c))  # as if right after the prompt
                seg[i, at : at + len(c)] = segment
                at += len(c)
        if self.keep_unshared:
            batch = self.pairs([{k: v for k, v in r.items() if k != "extra_completion_ids"} for r in rows])
        else:
            prompts = [len(p) for p, _ in parts]
            batch = {
                "completion_lengths": torch.tensor([len(c[0]) for _, c in parts] + [len(c[1]) for _, c in parts]),
                "prompt_lengths": torch.tensor(prompts + prompts),
                "row_index": torch.tensor([row["row_index"] for row in rows], dtype=torch.long),
            }
        batch.update(packed_input_ids=ids, packed_position_ids=pos, packed_segment_ids=seg)
        return batch


def packed_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed_input_ids, packed_position_ids, packed_segment_ids) of a `PrefixSharedCollator` batch."""
    return tuple(batch[k] for k in PACKED_KEYS)


def attention_implementation(model: torch.nn.Module) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"prefix sharing passes a 4-D attention mask, which needs attn_implementation 'sdpa' or 'eager'; "
            f"this model uses {impl!r}"
        )
    return impl


def prefix_sharing_mask(segment_ids: torch.Tensor, implementation: str = "sdpa", dtype=torch.float32) -> torch.Tensor:
    """[B, 1, T, T] mask: a query sees earlier keys of the prompt and of its own segment (pads: other pads).

    sdpa: bool, True = attend. eager: additive float of `dtype`, 0 = attend, finfo(dtype).min = masked."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    keys, queries = segment_ids[:, None, :], segment_ids[:, :, None]
    allowed = (causal & ((keys == PROMPT) | (keys == queries)))[:, None]
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(f"no prefix-sharing mask for attn_implementation {implementation!r}")


def _unshared_rows(packed_ids: torch.Tensor, segment_ids: torch.Tensor):
    """Where, in the packed rows, each of the 2B unshared rows' scored positions lie.

    Row r (r < B: chosen of pair r; r >= B: rejected of pair r-B) gets positions k = 0..n: k = 0 is the last
    prompt token (it predicts the first completion token), k >= 1 is completion token k-1. Returns the packed
    row of each unshared row [2B], the packed position of each k [2B, W] and labels [2B, W] holding
    completion token k-1 at k >= 1 (-100 elsewhere): the shape `sequence_logps` expects (position k predicts
    label k+1)."""
    b = packed_ids.shape[0]
    n_prompt = (segment_ids == PROMPT).sum(1)
    n_chosen = (segment_ids == CHOSEN).sum(1)
    n_rejected = (segment_ids == REJECTED).sum(1)
    lengths = torch.cat([n_chosen, n_rejected])
    width = int(lengths.max()) + 1 if lengths.numel() else 1
    k = torch.arange(width, device=packed_ids.device)[None]
    prompt = torch.cat([n_prompt, n_prompt])[:, None]
    start = torch.cat([n_prompt, n_prompt + n_chosen])[:, None]  # first token of the completion
    index = torch.where(k == 0, prompt - 1, start + k - 1).clamp(0, packed_ids.shape[1] - 1)
    rows = torch.cat([torch.arange(b, device=packed_ids.device)] * 2)
    labels = packed_ids[rows[:, None], index]
    # Without a prompt the unshared row cannot score its first completion token either (nothing predicts it).
    scored = (k >= 1) & (k <= lengths[:, None]) & ((k >= 2) | (prompt > 0))
    return rows, index, labels.masked_fill(~scored, -100)


class _HiddenRows:
    """Stands in for the model inside `sequence_logps`: its forward returns the packed forward's final hidden
    states rearranged as unshared rows; its output head is the model's."""

    def __init__(self, model: torch.nn.Module, hidden: torch.Tensor):
        self._model = model
        self._hidden = hidden

    def __call__(self, **_):
        return SimpleNamespace(hidden_states=(self._hidden,))

    def get_output_embeddings(self):
        return output_head(self._model)


def prefix_shared_logps(
    model: torch.nn.Module,
    packed_input_ids: torch.Tensor,
    packed_position_ids: torch.Tensor,
    packed_segment_ids: torch.Tensor,
    *,
    with_hidden_mean: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Per-sequence completion log-probs of every pair's chosen and rejected completion, [2B] (chosen first),
    from one forward of the B packed rows; as `sequence_logps` on the unshared rows would give them.

    `with_hidden_mean` adds each completion's mean final hidden state over its tokens (SPO), except that for
    a pair without prompt tokens it leaves out the first completion token (which then has no log-prob); the
    means of the extra completions follow the 2B pair rows, ordered by pair, then by segment."""
    impl = attention_implementation(model)
    mask = prefix_sharing_mask(packed_segment_ids, impl, model.get_input_embeddings().weight.dtype)
    out = model(
        input_ids=packed_input_ids,
        attention_mask=mask,
        position_ids=packed_position_ids,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1]  # [B, T, H]
    rows, index, labels = _unshared_rows(packed_input_ids, packed_segment_ids)
    view = _HiddenRows(model, hidden[rows[:, None], index])  # [2B, W, H]
    # sequence_logps reads only the shape and device of input_ids when the "model" is a view.
    lp = sequence_logps(view, labels, None, labels, with_hidden_mean=with_hidden_mean, chunk_tokens=chunk_tokens)
    if with_hidden_mean and int(packed_segment_ids.max()) >= FIRST_EXTRA:
        lp.hidden_mean = torch.cat([lp.hidden_mean, extra_hidden_means(hidden, packed_segment_ids)])
    return lp


def extra_hidden_means(hidden: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[E, H] mean final hidden state of every extra completion (segments >= 3), ordered by row, then segment."""
    n_extra = int(segment_ids.max()) - FIRST_EXTRA + 1
    one_hot = (segment_ids[:, :, None] == torch.arange(FIRST_EXTRA, FIRST_EXTRA + n_extra, device=hidden.device))
    counts = one_hot.sum(1)  # [B, S]
    sums = torch.einsum("bts,bth->bsh", one_hot.float(), hidden.float())
    present = counts > 0
    return sums[present] / counts[present][:, None]
