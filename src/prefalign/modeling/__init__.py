"""The one forward path: completion-only log-probs for training, the reference pass, evaluation and SPO.

- `head`: what a model's forward does between decoder and logits (soft-capping, logit scales), or a refusal.
- `logps`: `sequence_logps` (fast, completion-only, chunked) and `naive_sequence_logps` (the textbook one).
- `layout`: the batch layouts (unshared, prefix-shared, packed, varlen), the collator of each, and `pair_logps`, the one
  way a batch of pairs is scored whatever its layout.
- `rows`: how rows are built from tokenized pairs (`PairCollator`, `PrefixSharedCollator`).
- `packing`: prefix sharing — each pair as prompt+chosen+rejected, one or (padding-free) several pairs per row —
  and, for varlen kernels (flash attention), whole sequences in one row: the attention inputs for each
  backend, which models each is exact on, and the log-probs mapped back to pairs.
- `selfcheck`: the start-up comparison with the model's own logits; a pad id the model can embed.
"""

from .head import HeadSpec, head_spec, unwrap
from .layout import Layout, pair_logps
from .logps import SequenceLogps, naive_sequence_logps, output_head, sequence_logps
from .packing import (
    PackingPlan,
    PrefixSharingRefused,
    packed_inputs,
    packing_plan,
    prefix_shared_logps,
    resolve_layout,
    resolve_prefix_sharing,
)
from .rows import PairCollator, PrefixSharedCollator
from .selfcheck import FastPathMismatch, check_fast_path, usable_pad_id

__all__ = [
    "FastPathMismatch",
    "HeadSpec",
    "Layout",
    "PackingPlan",
    "PairCollator",
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
