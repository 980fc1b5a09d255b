"""Prefix sharing: each pair's prompt encoded once, chosen and rejected after it, and (padding-free) several
such pairs laid end to end in one row; for varlen kernels (flash attention), which cannot share a prompt,
whole sequences end to end in one row instead (the last section below).

A 4-D attention mask lets the chosen and rejected tokens see their prompt but not each other (causal within
each), and the position ids restart after the prompt for the rejected part. Every token therefore sees the
context, at the positions, it would see in its own unshared row — including a sliding window, which is
measured in position ids, not in packed columns — so the per-sequence log-probs equal those of
`sequence_logps` on the `PairCollator` layout (up to float rounding) while the model runs on rows of
P+C+R tokens per pair instead of 2 rows of P+max(C,R): the prompt is encoded once per pair.

Padding-free packing (`padding_free=True`, TRL's name) puts the pairs of a micro-batch end to end into as few
rows as fit, first-fit decreasing by packed length, a row no longer than the micro-batch's longest pair (or
`row_length`), so a dense mask is never wider than the one-pair-per-row layout's. `packed_pair_ids` gives
every column the index of its pair in the batch (padding belongs to the last pair of its row); the mask
also requires the same pair, position ids restart per pair, and the outputs come back in pair order —
chosen of pairs 0..B-1, then rejected — whatever row a pair went to. One pair per row is the special case,
so everything below reads the pair map and never asks which layout a batch has. The rows are built in
`rows.py`; callers score a batch through `layout.pair_logps`, which picks this path or the unshared one.

    collator = PrefixSharedCollator(pad_token_id=tok.pad_token_id, padding_free=True)
    batch = collator(rows)  # the PairCollator keys plus packed_* keys
    lp = prefix_shared_logps(model, *packed_inputs(batch))  # SequenceLogps [2B]: chosen rows, then rejected

Which models it accepts (`packing_plan`), read from the model and its transformers source:
- positions must be rotary (absolute or ALiBi positions would see the packed columns, not the restart);
- attention must take a 4-D mask: `sdpa` (bool mask), `eager` (additive float) or `flex_attention` (a
  `BlockMask`, no dense [B,1,T,T] tensor); flash attention (a varlen kernel: it attends within whole
  sequences, cut apart by cu_seqlens) cannot let chosen and rejected share a prompt and is refused, in one
  line where prefix sharing is asked for, and gets whole sequences packed instead (below) where it is not;
- layers may be full or sliding-window attention; a model mixing both must accept one mask per layer type
  (transformers' `causal_mask_mapping` dict); any other layer type (linear attention, state-space, chunked)
  is refused. Each refusal is one line saying why.
Packing several pairs per row needs nothing more: the same mask keeps pairs apart, so it is exact wherever
prefix sharing is.

Extra completions of the same prompt (SPO's degraded responses, row key `extra_completion_ids`) are packed
after the rejected one as further segments 3, 4, …, each seeing only its pair's prompt and itself; they are
not scored, only their mean final hidden state is returned (after the 2B pair rows, by pair then segment)
when asked for.

Whole sequences for varlen kernels (`Layout.VARLEN`, `varlen_plan`, `varlen_logps`): under flash attention
(flash_attention_2/3, a flash hub kernel) `resolve_layout` turns prefix sharing off with one logged line and
padding_free (default on there) lays the micro-batch's 2B sequences — prompt+chosen, prompt+rejected, then
SPO's extra completions — end to end in one row (`rows.varlen_row`): batch dimension 1, position ids 0, 1, …
restarting for each sequence, no attention mask, and flash's varlen kwargs `cu_seq_lens_q`/`_k` (int32) and
`max_length_q`/`_k` (an int: the padded rows' width, so nothing is read back from the device), which
transformers' models pass through to `_flash_attention_forward` and its `flash_attn_varlen_func` call. The
same cu_seqlens are what transformers would read from the position ids (`prepare_fa_kwargs_from_position_ids`)
for a model that dropped the kwargs. A sliding window is applied by the kernel within each sequence. The log-
probs map back through the padded rows' labels, which the batch keeps: column t of sequence s is column
cu_seqlens[s] + t of the row. Accepted where the kernel is a varlen one and the model passes the checks above
on positions and layers; else one line (padding_free true) or padded rows. Flash cannot run on a CPU: the
tests run the same inputs through sdpa (transformers builds its mask from the position ids,
`masking_utils.find_packed_sequence_indices`) and through transformers' flash path with a plain-torch kernel
(tests/test_varlen_packing.py).
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from dataclasses import dataclass

import torch

from ..errors import PrefalignError
from .head import model_class, unwrap
from .logps import CHUNK_TOKENS, SequenceLogps, final_hidden_states, score_hidden
from .rows import CHOSEN, FIRST_EXTRA, PAD, PROMPT, REJECTED, PrefixSharedCollator, first_fit_decreasing  # noqa: F401

# (PAD, the collator and first_fit_decreasing are re-exported: imported from here before rows.py held them)

log = logging.getLogger(__name__)
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_segment_ids", "packed_pair_ids")
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


class PrefixSharingRefused(PrefalignError):
    """The model cannot be scored packed without changing its log-probs; the message says why."""


def varlen_kernel(model_or_implementation: torch.nn.Module | str | None) -> bool:
    """Whether a model's attention implementation (or the name of one) is a varlen kernel: flash attention
    (flash_attention_2/3/4, a hub kernel such as kernels-community/flash-attn2), which transformers drives
    with cu_seqlens and recognises, as here, by "flash" in its name (`utils.generic.is_flash_attention_requested`)."""
    impl = model_or_implementation
    if isinstance(impl, torch.nn.Module):
        impl = getattr(unwrap(impl).config, "_attn_implementation", None)
    return isinstance(impl, str) and "flash" in impl


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
    if varlen_kernel(impl):
        raise PrefixSharingRefused(
            f"{name}: prefix sharing needs a 4-D attention mask (attn_implementation sdpa, eager or flex_attention); "
            f"{impl} attends within whole sequences only (cu_seqlens), so chosen and rejected cannot share one prompt"
        )
    if impl not in MASK_IMPLEMENTATIONS:
        raise PrefixSharingRefused(
            f"{name}: prefix sharing needs a 4-D attention mask (attn_implementation sdpa, eager or flex_attention); "
            f"{impl} takes none"
        )
    source, layer_types = _checked_decoder(inner, name, "prefix sharing", "the rejected completion's")
    window = getattr(config, "sliding_window", None) if "create_sliding_window_causal_mask" in source else None
    if len(set(layer_types)) > 1:
        if not re.search(r"isinstance\((causal_mask_mapping := )?attention_mask, dict\)", source):
            raise PrefixSharingRefused(f"{name}: mixes full and sliding attention but takes no per-layer-type masks")
        plan = PackingPlan(impl, {t: window if t == "sliding_attention" else None for t in sorted(set(layer_types))}, True)
    else:
        sliding = not layer_types or layer_types[0] == "sliding_attention"
        plan = PackingPlan(impl, {layer_types[0] if layer_types else "all": window if sliding else None}, False)
    _PLANS[inner] = plan
    return plan


def _checked_decoder(inner: torch.nn.Module, name: str, purpose: str, whose: str) -> tuple[str, list[str]]:
    """(decoder forward's source, layer types) of a model whose log-probs `purpose` (prefix sharing, or packing
    whole sequences) keeps: rotary positions from position ids, only causal and sliding-window masks, only
    attention layers; else PrefixSharingRefused (one line) naming what is in the way."""
    config = inner.config
    decoder = inner.get_decoder()
    modules = [type(m).__name__ for m in decoder.modules()]
    absolute = [n for n, m in decoder.named_modules() if re.search(r"(^|\.)(wpe|embed_positions|position_embeddings)$", n)]
    if not any("Rotary" in m for m in modules) or absolute or getattr(config, "alibi", False):
        kind = "absolute" if absolute else "ALiBi" if ("alibi" in _source(model_class(decoder)) or getattr(config, "alibi", False)) else "non-rotary"
        raise PrefixSharingRefused(
            f"{name}: {purpose} restarts {whose} position ids, which only rotary position "
            f"embeddings follow; this model has {kind} positions"
        )
    source = _source(model_class(decoder))
    if "position_ids" not in inspect.signature(model_class(decoder).forward).parameters:
        raise PrefixSharingRefused(f"{name}: its decoder takes no position_ids, so {purpose} cannot restart them")
    makers = set(re.findall(r"create_(\w+?)_mask\(", source)) - {"causal", "sliding_window_causal"}
    if makers:
        raise PrefixSharingRefused(f"{name}: builds {', '.join(sorted(makers))} masks, which {purpose} does not reproduce")
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise PrefixSharingRefused(f"{name}: has {', '.join(unknown)} layers; {purpose} handles only attention layers")
    return source, layer_types


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


def resolve_layout(prefix_sharing: bool | None, padding_free: bool | None, model: torch.nn.Module) -> tuple[bool, bool]:
    """(prefix_sharing, padding_free) made definite for `model`. Padding-free packing lays prefix-shared pairs
    end to end, so it is exact wherever prefix sharing is: None (the default) follows prefix sharing, True
    requires both (a refusal is raised, naming padding_free), False keeps one pair per row.

    A varlen kernel (flash attention) cannot let chosen and rejected see one prompt and not each other; there
    (False, True) — `Layout.VARLEN` — lays the micro-batch's 2B whole sequences end to end in one row instead:
    prefix_sharing None is off (one logged line), True is refused (one line), and padding_free None or True
    packs the whole sequences, False keeps the padded rows."""
    if varlen_kernel(model):
        return _resolve_varlen(prefix_sharing, padding_free, model)
    if padding_free and prefix_sharing is False:
        raise PrefixSharingRefused("padding_free: true packs prefix-shared pairs, and prefix_sharing is false; leave "
                                   "one of them unset (whole sequences are packed only under a varlen kernel: "
                                   "attn_implementation flash_attention_2 or 3)")
    try:
        shared = resolve_prefix_sharing(True if padding_free else prefix_sharing, model)
    except PrefixSharingRefused as refusal:
        if padding_free and prefix_sharing is None:
            raise PrefixSharingRefused(f"padding_free: true packs prefix-shared pairs; {refusal}") from None
        raise
    return shared, shared if padding_free is None else bool(padding_free)


def _resolve_varlen(prefix_sharing: bool | None, padding_free: bool | None, model: torch.nn.Module) -> tuple[bool, bool]:
    """`resolve_layout` under a varlen kernel: whole sequences packed where `varlen_plan` accepts the model."""
    unshareable = PrefixSharingRefused(f"{model_class(unwrap(model)).__name__}: prefix sharing is refused")
    try:
        packing_plan(model)
    except PrefixSharingRefused as refusal:
        unshareable = refusal  # always: a varlen kernel takes no 4-D mask
    try:
        varlen_plan(model)
    except PrefixSharingRefused as refusal:
        if prefix_sharing:
            raise unshareable from None
        if padding_free:
            raise PrefixSharingRefused(f"padding_free: true packs whole sequences under a varlen kernel; {refusal}") from None
        if prefix_sharing is None:
            log.warning("prefix sharing and padding-free packing off: %s", refusal)
        return False, False
    if prefix_sharing:
        raise PrefixSharingRefused(f"{unshareable}; leave prefix_sharing unset and the whole sequences are packed "
                                   "padding-free instead") from None
    packed = padding_free is not False
    if prefix_sharing is None:
        log.warning("prefix sharing off: %s; %s", unshareable,
                    "the whole sequences are packed end to end into one row instead (padding-free)"
                    if packed else "padding_free is false: padded rows")
    return False, packed


@dataclass(frozen=True)
class VarlenPlan:
    implementation: str  # a varlen kernel (`varlen_kernel`)


_VARLEN_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def varlen_plan(model: torch.nn.Module) -> VarlenPlan:
    """Whether `model` scores whole sequences laid end to end in one row (`Layout.VARLEN`) exactly and cheaply,
    or PrefixSharingRefused (one line) saying why not: its attention must be a varlen kernel (any other would
    need a dense mask over the whole row), its positions rotary and read from the position ids (which restart
    at 0 for each sequence), its layers full or sliding-window attention (a sliding window is applied by the
    kernel within each sequence)."""
    inner = unwrap(model)
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    if inner in _VARLEN_PLANS and _VARLEN_PLANS[inner].implementation == impl:
        return _VARLEN_PLANS[inner]
    name = model_class(inner).__name__
    if not varlen_kernel(impl):
        raise PrefixSharingRefused(
            f"{name}: packing whole sequences into one row needs a varlen attention kernel (attn_implementation "
            f"flash_attention_2 or 3); {impl} would need a dense mask over the whole row"
        )
    _checked_decoder(inner, name, "whole-sequence packing", "each sequence's")
    plan = _VARLEN_PLANS[inner] = VarlenPlan(impl)
    return plan


def packed_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed_input_ids, packed_position_ids, packed_segment_ids, packed_pair_ids) of a `PrefixSharedCollator`
    batch; a batch without a pair map (made by hand) has one pair per row (None)."""
    return (*(batch[k] for k in PACKED_KEYS[:3]), batch.get(PACKED_KEYS[3]))


def row_pairs(segment_ids: torch.Tensor) -> torch.Tensor:
    """The pair map of one pair per row: every column of row r belongs to pair r."""
    r, t = segment_ids.shape
    return torch.arange(r, device=segment_ids.device)[:, None].expand(r, t)


def allowed_attention(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      window: int | None = None, pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[R, 1, T, T] bool, True = attend: a query sees earlier keys of its own pair that are its prompt or its
    own segment (pads: their row's last pair's prompt and pads, so no softmax row is empty), and with a
    sliding `window` only keys whose position id is less than `window` behind its own — the window of the
    unshared row. `pair_ids` None: one pair per row."""
    pair_ids = row_pairs(segment_ids) if pair_ids is None else pair_ids
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    keys, queries = segment_ids[:, None, :], segment_ids[:, :, None]
    allowed = causal & (pair_ids[:, None, :] == pair_ids[:, :, None]) & ((keys == PROMPT) | (keys == queries))
    if window is not None:
        allowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    return allowed[:, None]


def prefix_sharing_mask(segment_ids: torch.Tensor, implementation: str = "sdpa", dtype=torch.float32,
                        position_ids: torch.Tensor | None = None, window: int | None = None,
                        pair_ids: torch.Tensor | None = None):
    """The mask in the form the attention implementation takes: sdpa a bool tensor, eager an additive float
    tensor of `dtype` (0 or finfo.min), flex_attention a `BlockMask`."""
    pair_ids = row_pairs(segment_ids) if pair_ids is None else pair_ids
    if implementation == "flex_attention":
        return _block_mask(segment_ids, position_ids, window, pair_ids)
    allowed = allowed_attention(segment_ids, position_ids, window, pair_ids)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"no prefix-sharing mask for attn_implementation {implementation!r}")


def _block_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None, pair_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, pos, pair = segment_ids, position_ids, pair_ids

    def mask_mod(b, h, q, k):
        ok = (k <= q) & (pair[b, k] == pair[b, q]) & ((seg[b, k] == PROMPT) | (seg[b, k] == seg[b, q]))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < window)
        return ok

    b, t = segment_ids.shape
    return create_block_mask(mask_mod, b, None, t, t, device=segment_ids.device)


def packed_attention_mask(model: torch.nn.Module, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                          pair_ids: torch.Tensor | None = None):
    """What to pass as `attention_mask` for a packed batch: one mask, or {layer_type: mask}."""
    plan = packing_plan(model)
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    pair_ids = row_pairs(segment_ids) if pair_ids is None else pair_ids
    masks = {t: prefix_sharing_mask(segment_ids, plan.implementation, dtype, position_ids, w, pair_ids)
             for t, w in plan.windows.items()}
    return masks if plan.per_layer_type else next(iter(masks.values()))


@dataclass(frozen=True)
class PairSpans:
    """Where each pair of a packed batch lies: its row, first column and part lengths, [B] each."""
    row: torch.Tensor
    start: torch.Tensor
    n_prompt: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor


def pair_spans(segment_ids: torch.Tensor, pair_ids: torch.Tensor | None = None) -> PairSpans:
    """The spans of the pairs in packed rows, read from the pair map (each pair's columns are contiguous, its
    prompt first: what `PrefixSharedCollator` builds). Pairs are numbered 0..max(pair_ids)."""
    pair_ids = row_pairs(segment_ids) if pair_ids is None else pair_ids
    n_pairs = int(pair_ids.max()) + 1 if pair_ids.numel() else 0
    device = segment_ids.device
    # a pair starts where the map changes along its row (or at column 0)
    before = torch.cat([torch.full_like(pair_ids[:, :1], -1), pair_ids[:, :-1]], dim=1)
    rows, cols = (pair_ids != before).nonzero(as_tuple=True)
    owner = pair_ids[rows, cols]  # one start per pair, so the scatter below writes each entry once
    row = torch.zeros(n_pairs, dtype=torch.long, device=device).scatter_(0, owner, rows)
    start = torch.zeros(n_pairs, dtype=torch.long, device=device).scatter_(0, owner, cols)

    def count(segment):
        return torch.bincount(pair_ids[segment_ids == segment], minlength=n_pairs)

    return PairSpans(row, start, count(PROMPT), count(CHOSEN), count(REJECTED))


def _unshared_rows(packed_ids: torch.Tensor, segment_ids: torch.Tensor, pair_ids: torch.Tensor | None = None):
    """Where, in the packed rows, each of the 2B unshared rows' scored positions lie.

    Row r (r < B: chosen of pair r; r >= B: rejected of pair r-B) gets positions k = 0..n: k = 0 is the last
    prompt token (it predicts the first completion token), k >= 1 is completion token k-1. Returns the packed
    row of each unshared row [2B], the packed position of each k [2B, W] and labels [2B, W] holding
    completion token k-1 at k >= 1 (-100 elsewhere): the shape `score_hidden` expects (position k predicts
    label k+1)."""
    spans = pair_spans(segment_ids, pair_ids)
    lengths = torch.cat([spans.n_chosen, spans.n_rejected])
    width = int(lengths.max()) + 1 if lengths.numel() else 1
    k = torch.arange(width, device=packed_ids.device)[None]
    prompt = torch.cat([spans.n_prompt, spans.n_prompt])[:, None]
    begin = torch.cat([spans.start, spans.start])[:, None]  # the pair's first column
    first = begin + prompt + torch.cat([torch.zeros_like(spans.n_chosen), spans.n_chosen])[:, None]
    # k = 0 without a prompt points at the pair's own first column (never scored) rather than another pair's
    last_prompt = torch.maximum(begin + prompt - 1, begin)
    index = torch.where(k == 0, last_prompt, first + k - 1).clamp(0, packed_ids.shape[1] - 1)
    rows = torch.cat([spans.row, spans.row])
    labels = packed_ids[rows[:, None], index]
    # Without a prompt the unshared row cannot score its first completion token either (nothing predicts it).
    scored = (k >= 1) & (k <= lengths[:, None]) & ((k >= 2) | (prompt > 0))
    return rows, index, labels.masked_fill(~scored, -100)


def prefix_shared_logps(
    model: torch.nn.Module,
    packed_input_ids: torch.Tensor,
    packed_position_ids: torch.Tensor,
    packed_segment_ids: torch.Tensor,
    packed_pair_ids: torch.Tensor | None = None,
    *,
    with_hidden_mean: bool = False,
    with_sum_sq: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Per-sequence completion log-probs of every pair's chosen and rejected completion, [2B] (chosen first,
    in pair order whatever row a pair was packed into), from one forward of the packed rows; as
    `sequence_logps` on the unshared rows would give them. `packed_pair_ids` None: one pair per row.

    `with_hidden_mean` adds each completion's mean final hidden state over its tokens (SPO), except that for
    a pair without prompt tokens it leaves out the first completion token (which then has no log-prob); the
    means of the extra completions follow the 2B pair rows, ordered by pair, then by segment."""
    # The map is read before the forward: its few host reads then wait for the mask only, not for the model.
    rows, index, labels = _unshared_rows(packed_input_ids, packed_segment_ids, packed_pair_ids)
    extras = with_hidden_mean and int(packed_segment_ids.max()) >= FIRST_EXTRA
    mask = packed_attention_mask(model, packed_segment_ids, packed_position_ids, packed_pair_ids)
    with _static_shapes_for_cpu_flex(model, packed_input_ids):
        hidden = final_hidden_states(model, input_ids=packed_input_ids, attention_mask=mask,
                                     position_ids=packed_position_ids)
    lp = score_hidden(model, hidden[rows[:, None], index], labels, with_hidden_mean=with_hidden_mean,
                      with_sum_sq=with_sum_sq, chunk_tokens=chunk_tokens)
    if extras:
        lp.hidden_mean = torch.cat([lp.hidden_mean, extra_hidden_means(hidden, packed_segment_ids, packed_pair_ids)])
    return lp


def _static_shapes_for_cpu_flex(model: torch.nn.Module, ids: torch.Tensor):
    """transformers compiles FlexAttention; on the CPU, torch's inductor (2.13) fails to compile a BlockMask that
    reads our id tensors once a second sequence length makes dynamo recompile with dynamic shapes ("C++ compile
    error: 'cur_kvSplitSize…' was not declared"). Static shapes compile once per length, which works."""
    import contextlib

    if ids.device.type != "cpu" or packing_plan(model).implementation != "flex_attention":
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def extra_hidden_means(hidden: torch.Tensor, segment_ids: torch.Tensor,
                       pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[E, H] mean final hidden state of every extra completion (segments >= 3), ordered by pair, then segment."""
    pair_ids = row_pairs(segment_ids) if pair_ids is None else pair_ids
    extra = segment_ids >= FIRST_EXTRA
    n_segments = int(segment_ids.max()) - FIRST_EXTRA + 1
    key = pair_ids[extra] * n_segments + (segment_ids[extra] - FIRST_EXTRA)  # sorts by pair, then segment
    groups, which = torch.unique(key, return_inverse=True)
    # a one-hot matmul rather than index_add: deterministic on every device, and the groups are few; in fp32
    # as the pair rows' means (autocast would round the sums to bf16)
    one_hot = (which[:, None] == torch.arange(len(groups), device=hidden.device)).float()
    with torch.autocast(hidden.device.type, enabled=False):
        return (one_hot.T @ hidden[extra].float()) / one_hot.sum(0)[:, None]


# -- whole sequences in one row, for varlen kernels (`Layout.VARLEN`) ---------------------------------------

def _forward_takes_kwargs(model: torch.nn.Module) -> bool:
    parameters = inspect.signature(model_class(unwrap(model)).forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def varlen_inputs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  cu_seqlens: torch.Tensor, max_length: int) -> dict:
    """The forward inputs of whole sequences laid end to end in one row: `input_ids` and `position_ids` [1, N]
    (0, 1, … for each sequence) and no attention mask, from which transformers reads the sequences itself
    (`masking_utils.find_packed_sequence_indices` builds the sdpa, eager or flex mask; for flash,
    `modeling_flash_attention_utils._is_packed_sequence` and `prepare_fa_kwargs_from_position_ids`); and,
    where the model's forward passes keyword arguments on to its attention (transformers' own models do), the
    varlen kwargs flash takes as they are (`FlashAttentionKwargs`): `cu_seq_lens_q`/`_k` (int32 [S+1], the
    same values) and `max_length_q`/`_k` (an int), so that no layer reads them back from the device. Other
    kernels ignore these kwargs."""
    inputs = {"input_ids": input_ids, "position_ids": position_ids}
    if _forward_takes_kwargs(model):
        inputs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_length,
                      max_length_k=max_length)
    return inputs


def varlen_logps(
    model: torch.nn.Module,
    varlen_input_ids: torch.Tensor,
    varlen_position_ids: torch.Tensor,
    varlen_cu_seqlens: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_scored: int | None = None,
    with_hidden_mean: bool = False,
    with_sum_sq: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Completion log-probs of the S sequences laid end to end in one row (`rows.varlen_row`), from one
    forward without an attention mask: as `sequence_logps` gives them on the same sequences as right-padded
    rows, whose `labels` [S, W] (-100 off the completion, W the longest sequence) it takes. Sequence s is
    columns cu_seqlens[s] … cu_seqlens[s+1]-1 of the row; column t of its padded row is column cu_seqlens[s]+t
    (past its end: its last token, never scored). Only the first `n_scored` sequences (default: all) are
    scored; `with_hidden_mean` gives every sequence's mean final hidden state over its completion."""
    n_sequences, width = labels.shape
    if varlen_cu_seqlens.shape[0] != n_sequences + 1:
        raise PrefalignError(f"varlen row: {varlen_cu_seqlens.shape[0] - 1} sequences, labels for {n_sequences}")
    inputs = varlen_inputs(model, varlen_input_ids, varlen_position_ids, varlen_cu_seqlens, width)
    hidden = final_hidden_states(model, **inputs)[0]  # [N, H]
    n_scored = n_sequences if n_scored is None else n_scored
    rows = n_sequences if with_hidden_mean else n_scored  # the others need no hidden states
    cu = varlen_cu_seqlens.long()
    t = torch.arange(width, device=cu.device)
    index = torch.minimum(cu[:rows, None] + t, cu[1 : rows + 1, None] - 1)
    return score_hidden(model, hidden[index], labels[:rows], n_scored=n_scored, with_hidden_mean=with_hidden_mean,
                        with_sum_sq=with_sum_sq, chunk_tokens=chunk_tokens)
