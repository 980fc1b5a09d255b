"""Start-up checks before a model is trained or evaluated: one small batch scored by the fast path (and, with
prefix sharing, packed) and by the model's own `log_softmax(logits)`; and a pad id the model can embed.

A disagreement stops the run with one line naming the model type and the size of the difference, so a
family nobody tested cannot be trained on wrong log-probs. It costs three forwards of two pairs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.collate import PairCollator
from ..errors import PrefalignError
from .head import unwrap
from .logps import SequenceLogps, naive_sequence_logps, sequence_logps
from .packing import PrefixSharedCollator, packed_inputs, prefix_shared_logps

log = logging.getLogger(__name__)

# Largest allowed |difference| of a completion's mean log-prob, nats per token. Full precision agrees to
# float rounding; low precision (bf16/fp16 weights or autocast) differs by kernel shapes, far below what a
# missed soft-cap or logit scale or a wrong mask does (nats per token).
TOLERANCE = {"full": 2e-3, "low": 0.1}
SELF_CHECK_PROMPT, SELF_CHECK_COMPLETION = 32, 16  # tokens kept of each part of the two pairs


class FastPathMismatch(PrefalignError):
    pass


@dataclass
class SelfCheck:
    fast_vs_model: float  # max |Δ mean log-prob| of the completion-only path vs the model's logits
    packed_vs_model: float | None  # the same for prefix sharing (None: not checked)
    tolerance: float
    n_completions: int


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
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> SelfCheck:
    """Score `rows` (tokenized pairs, two are plenty) three ways; FastPathMismatch when they disagree."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    rows = [_shortened(r) for r in rows]
    batch = (PrefixSharedCollator if prefix_sharing else PairCollator)(pad_token_id)(rows)
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()  # dropout would make the two paths differ for no fault of theirs
    try:
        with autocast():
            low = _low_precision(model, device.type)
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            naive = _naive_by_row(model, *args)
            fast = sequence_logps(model, *args)
            packed = prefix_shared_logps(model, *packed_inputs(batch)) if prefix_sharing else None
    finally:
        model.train(was_training)
    tolerance = TOLERANCE["low" if low else "full"]
    result = SelfCheck(
        fast_vs_model=float((fast.mean - naive.mean).abs().max()),
        packed_vs_model=None if packed is None else float((packed.mean - naive.mean).abs().max()),
        tolerance=tolerance,
        n_completions=int(naive.mean.numel()),
    )
    name = getattr(inner.config, "model_type", type(inner).__name__)
    if not result.fast_vs_model <= tolerance:
        raise FastPathMismatch(
            f"self-check: {name}: prefalign's log-probs differ from the model's own logits by "
            f"{result.fast_vs_model:.3g} nats/token (tolerance {tolerance:g}); this model family is not supported"
        )
    if packed is not None and not result.packed_vs_model <= tolerance:
        raise FastPathMismatch(
            f"self-check: {name}: prefix-shared log-probs differ from the model's own logits by "
            f"{result.packed_vs_model:.3g} nats/token (tolerance {tolerance:g}); set prefix_sharing: false"
        )
    log.info("self-check: %s log-probs match the model's logits (max |Δ| %.2g nats/token%s)", name,
             result.fast_vs_model, "" if packed is None else f", packed {result.packed_vs_model:.2g}")
    return result


def _shortened(row: dict) -> dict:
    """The end of the prompt and the start of each completion: enough tokens to exercise the head, the
    masks and (for test-sized models) sliding windows, few enough that the model's full logits stay small."""
    return {
        "prompt_input_ids": list(row["prompt_input_ids"])[-SELF_CHECK_PROMPT:],
        "chosen_input_ids": list(row["chosen_input_ids"])[:SELF_CHECK_COMPLETION],
        "rejected_input_ids": list(row["rejected_input_ids"])[:SELF_CHECK_COMPLETION],
        "row_index": row["row_index"],
    }


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
    vocab = unwrap(model).get_input_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id
    if pad is not None and 0 <= pad < vocab:
        return pad
    eos = tokenizer.eos_token_id
    replacement = eos if isinstance(eos, int) and 0 <= eos < vocab else 0
    log.warning("pad id %s is outside the model's %d embeddings (a token added without resize_token_embeddings); "
                "padding with id %d instead (padded positions are masked)", pad, vocab, replacement)
    return replacement
