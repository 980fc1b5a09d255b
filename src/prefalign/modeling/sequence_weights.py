"""Per-sequence quantities built from per-token log-probs, as TRL 1.16's DPOTrainer builds them.

- `length_desensitized`: LD-DPO (Liu et al., 2024). Of a pair's two completions, the tokens past the shorter
  one's length count with weight α: log p = Σ_{t ≤ min(n_c, n_r)} log p_t + α·Σ_{t > min} log p_t, for the
  policy and the reference alike. Per-token means become that sum over all n tokens (TRL's ipo/sigmoid_norm).
- `wpo_weights`: WPO (Zhou et al., 2024), each completion's exp(mean_t [log p_t − log Σ_v p_v²]) — the
  probability of the completion under the policy, aligned so that a greedy-peaked distribution is not
  favoured — computed without gradient; a pair's weight is the product of its two.
"""

from __future__ import annotations

import torch

from .logps import SequenceLogps


def length_desensitized(lp: SequenceLogps, ld_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, means) [2B] of a pair batch laid out chosen rows then rejected rows, LD-weighted."""
    if lp.token_logps is None:
        raise ValueError("LD-DPO needs per-token log-probs (SequenceLogps.token_logps)")
    n = lp.n_tokens
    b = n.shape[0] // 2
    shared = torch.minimum(n[:b], n[b:]).repeat(2)  # each row's pair shares min(n_c, n_r) positions
    weight = torch.where(lp.token_positions <= shared[lp.token_rows], 1.0, float(ld_alpha))
    sums = torch.zeros_like(lp.sum).index_add(0, lp.token_rows, lp.token_logps * weight.to(lp.token_logps.dtype))
    return sums, sums / n.clamp(min=1)


@torch.no_grad()
def wpo_weights(lp: SequenceLogps, *, clamp: bool = False) -> torch.Tensor:
    """[B] pair weights w_c·w_r (detached) of a pair batch laid out chosen rows then rejected rows; `clamp`
    caps them at 1 as the WPO authors' code does (wzhouad/WPO scripts/run_wpo.py; TRL does not)."""
    if lp.token_log_sum_sq is None:
        raise ValueError("WPO weights need each token's log Σ p² (score with with_sum_sq=True)")
    aligned = (lp.token_logps.detach() - lp.token_log_sum_sq).float()
    per_row = torch.zeros_like(lp.sum, dtype=torch.float32).index_add(0, lp.token_rows, aligned)
    weights = torch.exp(per_row / lp.n_tokens.clamp(min=1))
    b = weights.shape[0] // 2
    pair = weights[:b] * weights[b:]
    return pair.clamp(max=1.0) if clamp else pair
