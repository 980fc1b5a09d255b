"""Prefix sharing: one packed row per pair, prompt + chosen + rejected, instead of two rows that each carry the prompt.

A 4-D attention mask lets the chosen and rejected tokens see the prompt but not each other (causal within
each), and the position ids restart after the prompt for the rejected part. Every token therefore sees the
context, at the positions, it would see in its own unshared row — including a sliding window, which is
measured in position ids, not in packed columns — so the per-sequence log-probs equal those of
`sequence_logps` on the `PairCollator` layout (up to float rounding) while the model runs on B rows of
P+C+R tokens instead of 2B rows of P+max(C,R): the prompt is encoded once per pair.

    collator = PrefixSharedCollator(pad_token_id=tok.pad_token_id)  # the PairCollator keys plus packed_* keys
    batch = collator(rows)
    lp = prefix_shared_logps(model, *packed_inputs(batch))  # SequenceLogps [2B]: chosen rows, then rejected

Which models it accepts (`packing_plan`), read from the model and its transformers source:
- positions must be rotary (absolute or ALiBi positions would see the packed columns, not the restart);
- attention must take a 4-D mask: `sdpa` (bool mask), `eager` (additive float) or `flex_attention` (a
  `BlockMask`, no dense [B,1,T,T] tensor); flash attention packs only whole sequences and is refused;
- layers may be full or sliding-window attention; a model mixing both must accept one mask per layer type
  (transformers' `causal_mask_mapping` dict); any other layer type (linear attention, state-space, chunked)
  is refused. Each refusal is one line saying why.

Extra completions of the same prompt (SPO's degraded responses, row key `extra_completion_ids`) are packed
after the rejected one as further segments 3, 4, …, each seeing only the prompt and itself; they are not
scored, only their mean final hidden state is returned (after the 2B pair rows) when asked for.
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.collate import PairCollator, score_inputs
from ..errors import PrefalignError
from .head import model_class, unwrap
from .logps import CHUNK_TOKENS, SequenceLogps, final_hidden_states, score_hidden, sequence_logps

log = logging.getLogger(__name__)

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids; extra completions take 3, 4, ...
FIRST_EXTRA = 3
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_segment_ids")
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


class PrefixSharingRefused(PrefalignError):
    """The model cannot be scored packed without changing its log-probs; the message says why."""


@dataclass(frozen=True)
class PackingPlan:
    implementation: str  # sdpa, eager or flex_attention
    windows: dict[str, int | None]  # layer type -> sliding window (None = full causal); one entry = one mask
    per_layer_type: bool  # pass {layer_type: mask} (transformers' causal_mask_mapping) instead of one mask


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def packing_plan(model: torch.nn.Module) -> PackingPlan:
    """How to mask `model` for prefix sharing, or PrefixSharingRefused (one line) when it cannot be exact."""
    inner = unwrap(model)
    config = inner.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if inner in _PLANS and _PLANS[inner].implementation == impl:  # set_attn_implementation invalidates it
        return _PLANS[inner]
    name = model_class(inner).__name__
    if impl not in MASK_IMPLEMENTATIONS:
        raise PrefixSharingRefused(
            f"{name}: prefix sharing needs a 4-D attention mask (attn_implementation sdpa, eager or flex_attention); "
            f"{impl} packs only whole sequences"
        )
    decoder = inner.get_decoder()
    modules = [type(m).__name__ for m in decoder.modules()]
    absolute = [n for n, m in decoder.named_modules() if re.search(r"(^|\.)(wpe|embed_positions|position_embeddings)$", n)]
    if not any("Rotary" in m for m in modules) or absolute or getattr(config, "alibi", False):
        kind = "absolute" if absolute else "ALiBi" if ("alibi" in _source(model_class(decoder)) or getattr(config, "alibi", False)) else "non-rotary"
        raise PrefixSharingRefused(
            f"{name}: prefix sharing restarts the rejected completion's position ids, which only rotary position "
            f"embeddings follow; this model has {kind} positions"
        )
    source = _source(model_class(decoder))
    if "position_ids" not in inspect.signature(model_class(decoder).forward).parameters:
        raise PrefixSharingRefused(f"{name}: its decoder takes no position_ids, so prefix sharing cannot restart them")
    makers = set(re.findall(r"create_(\w+?)_mask\(", source)) - {"causal", "sliding_window_causal"}
    if makers:
        raise PrefixSharingRefused(f"{name}: builds {', '.join(sorted(makers))} masks, which prefix sharing does not reproduce")
    window = getattr(config, "sliding_window", None) if "create_sliding_window_causal_mask" in source else None
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise PrefixSharingRefused(f"{name}: has {', '.join(unknown)} layers; prefix sharing handles only attention layers")
    if len(set(layer_types)) > 1:
        if not re.search(r"isinstance\((causal_mask_mapping := )?attention_mask, dict\)", source):
            raise PrefixSharingRefused(f"{name}: mixes full and sliding attention but takes no per-layer-type masks")
        plan = PackingPlan(impl, {t: window if t == "sliding_attention" else None for t in sorted(set(layer_types))}, True)
    else:
        sliding = not layer_types or layer_types[0] == "sliding_attention"
        plan = PackingPlan(impl, {layer_types[0] if layer_types else "all": window if sliding else None}, False)
    _PLANS[inner] = plan
    return plan


def resolve_prefix_sharing(setting: bool | None, model: torch.nn.Module) -> bool:
    """The `prefix_sharing` setting made definite for `model`: None (the default) means on wherever
    `packing_plan` accepts the model and off, with the reason logged once, where it refuses; True means
    required (a refusal is raised); False means off."""
    if setting is False:
        return False
    try:
        packing_plan(model)
    except PrefixSharingRefused as refusal:
        if setting:
            raise
        log.warning("prefix sharing off: %s", refusal)
        return False
    return True


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
                **score_inputs(rows),
            }
        batch.update(packed_input_ids=ids, packed_position_ids=pos, packed_segment_ids=seg)
        return batch


def packed_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed_input_ids, packed_position_ids, packed_segment_ids) of a `PrefixSharedCollator` batch."""
    return tuple(batch[k] for k in PACKED_KEYS)


def allowed_attention(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] bool, True = attend: a query sees earlier keys of the prompt and of its own segment (pads:
    other pads, so no softmax row is empty), and with a sliding `window` only keys whose position id is
    less than `window` behind its own — the window of the unshared row."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    keys, queries = segment_ids[:, None, :], segment_ids[:, :, None]
    allowed = causal & ((keys == PROMPT) | (keys == queries))
    if window is not None:
        allowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    return allowed[:, None]


def prefix_sharing_mask(segment_ids: torch.Tensor, implementation: str = "sdpa", dtype=torch.float32,
                        position_ids: torch.Tensor | None = None, window: int | None = None):
    """The mask in the form the attention implementation takes: sdpa a bool tensor, eager an additive float
    tensor of `dtype` (0 or finfo.min), flex_attention a `BlockMask`."""
    if implementation == "flex_attention":
        return _block_mask(segment_ids, position_ids, window)
    allowed = allowed_attention(segment_ids, position_ids, window)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"no prefix-sharing mask for attn_implementation {implementation!r}")


def _block_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, pos = segment_ids, position_ids

    def mask_mod(b, h, q, k):
        ok = (k <= q) & ((seg[b, k] == PROMPT) | (seg[b, k] == seg[b, q]))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < window)
        return ok

    b, t = segment_ids.shape
    return create_block_mask(mask_mod, b, None, t, t, device=segment_ids.device)


def packed_attention_mask(model: torch.nn.Module, segment_ids: torch.Tensor, position_ids: torch.Tensor):
    """What to pass as `attention_mask` for a packed batch: one mask, or {layer_type: mask}."""
    plan = packing_plan(model)
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    masks = {t: prefix_sharing_mask(segment_ids, plan.implementation, dtype, position_ids, w) for t, w in plan.windows.items()}
    return masks if plan.per_layer_type else next(iter(masks.values()))


def _unshared_rows(packed_ids: torch.Tensor, segment_ids: torch.Tensor):
    """Where, in the packed rows, each of the 2B unshared rows' scored positions lie.

    Row r (r < B: chosen of pair r; r >= B: rejected of pair r-B) gets positions k = 0..n: k = 0 is the last
    prompt token (it predicts the first completion token), k >= 1 is completion token k-1. Returns the packed
    row of each unshared row [2B], the packed position of each k [2B, W] and labels [2B, W] holding
    completion token k-1 at k >= 1 (-100 elsewhere): the shape `score_hidden` expects (position k predicts
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


def prefix_shared_logps(
    model: torch.nn.Module,
    packed_input_ids: torch.Tensor,
    packed_position_ids: torch.Tensor,
    packed_segment_ids: torch.Tensor,
    *,
    with_hidden_mean: bool = False,
    with_sum_sq: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Per-sequence completion log-probs of every pair's chosen and rejected completion, [2B] (chosen first),
    from one forward of the B packed rows; as `sequence_logps` on the unshared rows would give them.

    `with_hidden_mean` adds each completion's mean final hidden state over its tokens (SPO), except that for
    a pair without prompt tokens it leaves out the first completion token (which then has no log-prob); the
    means of the extra completions follow the 2B pair rows, ordered by pair, then by segment."""
    mask = packed_attention_mask(model, packed_segment_ids, packed_position_ids)
    hidden = final_hidden_states(model, input_ids=packed_input_ids, attention_mask=mask, position_ids=packed_position_ids)
    rows, index, labels = _unshared_rows(packed_input_ids, packed_segment_ids)
    lp = score_hidden(model, hidden[rows[:, None], index], labels, with_hidden_mean=with_hidden_mean,
                      with_sum_sq=with_sum_sq, chunk_tokens=chunk_tokens)
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


def pair_logps(model: torch.nn.Module, batch: dict, *, with_hidden_mean: bool = False,
               with_sum_sq: bool = False) -> SequenceLogps:
    """[2B] completion log-probs of a batch of pairs (chosen, then rejected), in the layout it carries:
    packed when the collator packed it, else the 2B unshared rows."""
    if "packed_input_ids" in batch:
        return prefix_shared_logps(model, *packed_inputs(batch), with_hidden_mean=with_hidden_mean,
                                   with_sum_sq=with_sum_sq)
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                          with_hidden_mean=with_hidden_mean, with_sum_sq=with_sum_sq)
