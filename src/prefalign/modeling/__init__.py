"""The one forward path: completion-only log-probs for training, the reference pass, evaluation and SPO.

- `head`: what a model's forward does between decoder and logits (soft-capping, logit scales), or a refusal.
- `logps`: `sequence_logps` (fast, completion-only, chunked) and `naive_sequence_logps` (the textbook one).
- `packing`: prefix sharing — each pair as prompt+chosen+rejected, one or (padding-free) several pairs per row —
  and which models it is exact on.
- `selfcheck`: the start-up comparison with the model's own logits; a pad id the model can embed.
"""

from .head import HeadSpec, head_spec, unwrap
from .logps import SequenceLogps, naive_sequence_logps, output_head, sequence_logps
from .packing import (
    PackingPlan,
    PrefixSharedCollator,
    PrefixSharingRefused,
    packed_inputs,
    packing_plan,
    pair_logps,
    prefix_shared_logps,
    resolve_layout,
    resolve_prefix_sharing,
)
from .selfcheck import FastPathMismatch, check_fast_path, usable_pad_id

__all__ = [
    "FastPathMismatch",
    "HeadSpec",
    "PackingPlan",
    "PrefixSharedCollator",
    "PrefixSharingRefused",
    "SequenceLogps",
    "check_fast_path",
    "head_spec",
    "naive_sequence_logps",
    "output_head",
    "packed_inputs",
    "packing_plan",
    "pair_logps",
    "prefix_shared_logps",
    "resolve_layout",
    "resolve_prefix_sharing",
    "sequence_logps",
    "unwrap",
    "usable_pad_id",
]
