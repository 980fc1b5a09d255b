"""Start-up checks before a model is trained, evaluated or benchmarked (for the reference model too):

- the head check (`check_head`): one forward of the model on a short batch, its decoder's final hidden state
  captured by a hook and its own `.logits` taken from that same forward; at up to 8 real positions per row
  the fast path's output head and post-processing (`head.HeadSpec`, read from the forward's source as a first
  guess) are applied to that hidden state and compared with the model's logits. The inputs to the head are
  identical, so only rounding may differ and the tolerance is tight: a missed or misread soft-cap, logit
  scale or vocabulary limit — or one the source does not show — is caught however small its effect on a
  completion's mean log-prob;
- one small batch of two pairs scored by the fast path (and, with prefix sharing, packed: both pairs in one
  row, so the pattern within a pair and the isolation between pairs are checked at once — one pair per row
  is its special case; under a varlen kernel, the whole sequences in one row) and by the model's own
  `log_softmax(logits)`: masks, positions and prefix sharing, at a per-sequence tolerance;
- a pad id the model can embed.

A disagreement stops the run with one line naming the model and the size of the difference, so a family
nobody tested cannot be trained on wrong log-probs. It costs a few forwards of two shortened pairs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import PrefalignError
from . import logps as _logps
from .head import model_class, unwrap
from .layout import Layout, pair_logps
from .logps import SequenceLogps, naive_sequence_logps

log = logging.getLogger(__name__)

# Largest allowed |difference| of a completion's mean log-prob, nats per token. Full precision agrees to
# float rounding; low precision (bf16/fp16 weights or autocast) differs by kernel shapes, far below what a
# missed soft-cap or logit scale or a wrong mask does (nats per token).
TOLERANCE = {"full": 2e-3, "low": 0.1}
SELF_CHECK_PROMPT, SELF_CHECK_COMPLETION = 32, 16  # tokens kept of each part of the two pairs

# The head check: the largest allowed max |Δ log-prob| over the vocabulary at one position is
#     HEAD_ATOL + HEAD_ULPS · eps · max |model's logit at that position|,
# eps the spacing of numbers near 1 in the least precise format the head computes in (fp32, TF32, bf16,
# fp16). Both sides apply the same head to the same hidden state, the model to every position and we to a
# subset, so a logit can differ only by the rounding of a matmul of another shape (at most an ulp, ≤
# eps·|logit|) and, where the model post-processes in low precision (Gemma's soft-cap in bf16: three
# roundings), ≤ 1.5 eps·|logit| more; a log-prob by twice the largest logit error (its log-sum-exp moves by
# at most that): ≤ 5 eps·max|logit| in all. Measured on CPU (48 positions × 4 rows, ratio to eps·max|logit|):
# 0 in fp32, bf16 weights, bf16 autocast and fp16 for stories260K and tiny Llama, Qwen 2, Cohere (logits ~160),
# Granite, Mixtral, GPT-2 (the CPU matmul rounds every row alike); 0.28-0.30 for tiny Gemma 2/3 (cap 1) and
# 1.0-1.15 for Gemma 2 with cap 30 and logits near it, in bf16/fp16 — 0 in fp32. So 8 (1.6x the bound, 7x
# the largest measured): in fp32 the tolerance is ~1e-4 nats; in bf16 it is 6% of the largest logit (0.8
# nats at stories260K's logits of 13, where one bf16 ulp is 0.06), while a missed or misread scale s moves
# log-probs by ~|s − 1| · max|logit| and a missed soft-cap at c by ~|logit|³/c² at the largest logits. Not
# measured on a GPU (kernels there may round rows differently by batch shape: the 1-ulp term above).
HEAD_ATOL, HEAD_ULPS = 1e-4, 8
HEAD_POSITIONS = 8  # probed per row, spread over its real tokens


class FastPathMismatch(PrefalignError):
    pass


@dataclass
class SelfCheck:
    fast_vs_model: float  # max |Δ mean log-prob| of the completion-only path vs the model's logits
    packed_vs_model: float | None  # the same for prefix sharing or the varlen row (None: not checked)
    tolerance: float
    n_completions: int
    head_vs_model: float | None = None  # the head check's max |Δ log-prob| (None: not run)
    head_tolerance: float | None = None  # its tolerance at the position that came closest to it


def _low_precision(model: torch.nn.Module, device_type: str) -> bool:
    weights_low = next(unwrap(model).parameters()).dtype in (torch.bfloat16, torch.float16)
    return weights_low or torch.is_autocast_enabled(device_type)


@torch.no_grad()
def check_fast_path(
    model: torch.nn.Module,
    rows: Sequence[dict],
    pad_token_id: int,
    *,
    prefix_sharing: bool,
    padding_free: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    role: str | None = None,
) -> SelfCheck:
    """The head check on `rows` (tokenized pairs, two are plenty), then the rows scored three ways;
    FastPathMismatch when anything disagrees. `role` ("reference model") names the model in messages.
    `padding_free` without `prefix_sharing` checks the varlen layout (whole sequences in one row) instead."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    rows = [_shortened(r) for r in rows]
    # every pair in one row (the docstring says why)
    layout = Layout.PACKED if prefix_sharing else Layout.VARLEN if padding_free else Layout.UNSHARED
    row_length = sum(_packed_size(r) for r in rows) if prefix_sharing else None
    batch = layout.collator(pad_token_id, row_length=row_length)(rows)
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()  # dropout would make the two paths differ for no fault of theirs
    try:
        with autocast():
            low = _low_precision(model, device.type)
            head_diff, head_tol = check_head(model, batch["input_ids"], batch["attention_mask"], role=role)
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            naive = _naive_by_row(model, *args)
            fast = pair_logps(model, batch, layout=Layout.UNSHARED)
            packed = pair_logps(model, batch, layout=layout) if layout is not Layout.UNSHARED else None
    finally:
        model.train(was_training)
    tolerance = TOLERANCE["low" if low else "full"]
    result = SelfCheck(
        fast_vs_model=float((fast.mean - naive.mean).abs().max()),
        packed_vs_model=None if packed is None else float((packed.mean - naive.mean).abs().max()),
        tolerance=tolerance,
        n_completions=int(naive.mean.numel()),
        head_vs_model=head_diff,
        head_tolerance=head_tol,
    )
    name = _name(inner, role)
    if not result.fast_vs_model <= tolerance:
        raise FastPathMismatch(
            f"self-check: {name}: prefalign's log-probs differ from the model's own logits by "
            f"{result.fast_vs_model:.3g} nats/token (tolerance {tolerance:g}); this model family is not supported"
        )
    if packed is not None and not result.packed_vs_model <= tolerance:
        what, off = ("prefix-shared", "prefix_sharing") if prefix_sharing else ("padding-free (whole sequences)", "padding_free")
        raise FastPathMismatch(
            f"self-check: {name}: {what} log-probs differ from the model's own logits by "
            f"{result.packed_vs_model:.3g} nats/token (tolerance {tolerance:g}); set {off}: false"
        )
    log.info("self-check: %s log-probs match the model's logits (max |Δ| %.2g nats/token%s; head %.2g nats, "
             "tolerance %.2g)", name, result.fast_vs_model,
             "" if packed is None else f", packed {result.packed_vs_model:.2g}", head_diff, head_tol)
    return result


def _name(inner: torch.nn.Module, role: str | None) -> str:
    name = getattr(getattr(inner, "config", None), "model_type", None) or type(inner).__name__
    return name if role is None else f"{name} ({role})"


def _rounding_eps(model: torch.nn.Module, device_type: str) -> float:
    """eps of the least precise format the output head computes in here (weights, autocast, fp32 matmul mode)."""
    dtypes = {_logps.output_head(model).weight.dtype}
    if torch.is_autocast_enabled(device_type):
        dtypes.add(torch.get_autocast_dtype(device_type))
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    fp32_matmul = {"high": 2.0**-10, "medium": 2.0**-7}  # TF32 (10 mantissa bits) / bf16 passes
    return max(eps, fp32_matmul.get(torch.get_float32_matmul_precision(), 0.0))


def _probe_positions(attention_mask: torch.Tensor, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of up to `per_row` real (unpadded) positions of each row, spread from first to last."""
    rows, cols = [], []
    for r in range(attention_mask.shape[0]):
        real = attention_mask[r].nonzero().flatten()
        if len(real):
            pick = torch.linspace(0, len(real) - 1, min(per_row, len(real)), device=real.device).round().long()
            cols.append(real[pick.unique()])
            rows.append(torch.full_like(cols[-1], r))
    return torch.cat(rows), torch.cat(cols)


@torch.no_grad()
def check_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
               role: str | None = None, per_row: int = HEAD_POSITIONS) -> tuple[float, float]:
    """One forward of `model` (as it is: eval mode and autocast are the caller's): the fast path's head applied
    to the decoder's final hidden state vs that forward's own logits, at up to `per_row` real positions per
    row. (max |Δ log-prob|, its tolerance at the closest position); FastPathMismatch beyond it.

    Log-probs rather than raw logits are compared: they are what every loss reads, and a constant shift of
    all logits at a position — which changes no log-prob — is no error. Both sides are fp32: the model's
    logits are cast after its forward, ours are computed in fp32 from its head's output (`head_logits`)."""
    inner = unwrap(model)
    with _logps.capturing_final_hidden(model) as captured:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # all positions' logits
    logits = out.logits if hasattr(out, "logits") else out[0]
    cls = model_class(inner).__name__
    where = f"self-check: {_name(inner, role)}: prefalign's log-probs differ from the model's own logits"
    if len(captured) != 1 or captured[0].shape[:2] != logits.shape[:2]:
        raise FastPathMismatch(f"{where} ({cls}: its decoder ran {len(captured)} times or its logits do not cover "
                               "every position, so the fast path's output head cannot be checked)")
    rows, cols = _probe_positions(attention_mask, per_row)
    spec = _logps.cached_head_spec(model)
    ours = _logps.head_logits(_logps.output_head(model), spec, captured[0][rows, cols])
    theirs = logits[rows, cols].float()
    if ours.shape != theirs.shape:
        raise FastPathMismatch(f"{where} ({cls}, head read as: {spec.describe()}): {ours.shape[-1]} vocabulary "
                               f"entries vs the model's {theirs.shape[-1]}")
    ours, theirs_lp = ours.log_softmax(-1), theirs.log_softmax(-1)
    # equal entries count as 0 (both -inf: a masked token), NaN as infinitely far
    diff = torch.where(ours == theirs_lp, 0.0, (ours - theirs_lp).abs()).nan_to_num(nan=float("inf")).amax(-1)
    tol = HEAD_ATOL + HEAD_ULPS * _rounding_eps(model, input_ids.device.type) * theirs.abs().amax(-1)
    worst = int((diff / tol).argmax())
    if not bool((diff <= tol).all()):
        raise FastPathMismatch(
            f"{where} by {float(diff[worst]):.3g} nats/token at the same hidden state (tolerance "
            f"{float(tol[worst]):.2g}; {cls}, output head read as: {spec.describe()}); this model's output head "
            "is not supported"
        )
    return float(diff.max()), float(tol[worst])


def _shortened(row: dict) -> dict:
    """The end of the prompt and the start of each completion: enough tokens to exercise the head, the
    masks and (for test-sized models) sliding windows, few enough that the model's full logits stay small."""
    return {
        "prompt_input_ids": list(row["prompt_input_ids"])[-SELF_CHECK_PROMPT:],
        "chosen_input_ids": list(row["chosen_input_ids"])[:SELF_CHECK_COMPLETION],
        "rejected_input_ids": list(row["rejected_input_ids"])[:SELF_CHECK_COMPLETION],
        "row_index": row["row_index"],
    }


def _packed_size(row: dict) -> int:
    return sum(len(row[f"{part}_input_ids"]) for part in ("prompt", "chosen", "rejected"))


def _naive_by_row(model, input_ids, attention_mask, labels) -> SequenceLogps:
    """The model's own log-softmax, one unpadded row at a time (full-vocabulary logits of one row only)."""
    parts = []
    for i in range(input_ids.shape[0]):
        n = int(attention_mask[i].sum())
        parts.append(naive_sequence_logps(model, input_ids[i : i + 1, :n], attention_mask[i : i + 1, :n], labels[i : i + 1, :n]))
    return SequenceLogps(*(torch.cat([getattr(p, f) for p in parts]) for f in ("sum", "mean", "n_tokens")))


def usable_pad_id(model: torch.nn.Module, tokenizer) -> int:
    """The tokenizer's pad id when the model can embed it; else its eos id, else 0 (padded positions are
    masked, so any embeddable id gives the same log-probs). Logged once when replaced."""
    weight = unwrap(model).get_input_embeddings().weight
    vocab = int(getattr(weight, "ds_shape", weight.shape)[0])  # a ZeRO-3 placeholder keeps its full shape there
    pad = tokenizer.pad_token_id
    if pad is not None and 0 <= pad < vocab:
        return pad
    eos = tokenizer.eos_token_id
    replacement = eos if isinstance(eos, int) and 0 <= eos < vocab else 0
    log.warning("pad id %s is outside the model's %d embeddings (a token added without resize_token_embeddings); "
                "padding with id %d instead (padded positions are masked)", pad, vocab, replacement)
    return replacement
