"""AOT — alignment via optimal transport (Melnyk et al., 2024) — as TRL 1.16 computes it: a sigmoid loss on
the gap between two *sorted* batches of log-ratios, i.e. the policy's distribution of margins is made to
dominate the reference's (paired) or the chosen rewards' to dominate the rejected ones' (unpaired).

TRL takes the k-th smallest of one batch against the k-th smallest of the other. Here the k-th term is
attributed to the pair whose policy margin (aot) or chosen log-ratio (aot_unpaired) is the k-th smallest,
so the per-pair losses are a permutation of TRL's (same mean, same gradient) and each pair's gradient
weight is that of the term its own log-probs enter directly.
"""

from __future__ import annotations

import torch

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .reference_based import sigmoid_smoothed


def rank_matched(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """own_j − (the element of `other` whose rank in `other` is own_j's rank in `own`): sorted minus sorted, by pair."""
    order = torch.argsort(own, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return own - torch.sort(other, stable=True).values[rank]


def _terms(pc, pr, rc, rr, beta, gap, eps) -> PairTerms:
    return PairTerms(
        logits=beta * gap,
        loss_of_logit=sigmoid_smoothed(eps),
        rewards_chosen=beta * (pc - rc).detach(),
        rewards_rejected=beta * (pr - rr).detach(),
        correct=((pc - pr) > (rc - rr)).detach(),  # ranked by the implicit rewards
    )


@register("aot", needs_reference=True, length_normalized=False, summary="AOT, paired (Melnyk et al., 2024)")
def aot(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PairTerms:
    """ℓ(β·(sort(pc − pr)_k − sort(rc − rr)_k)), ℓ the label-smoothed sigmoid loss."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    return _terms(pc, pr, rc, rr, beta, rank_matched(pc - pr, rc - rr), label_smoothing)


@register("aot_unpaired", needs_reference=True, length_normalized=False, summary="AOT, unpaired (Melnyk et al., 2024)")
def aot_unpaired(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PairTerms:
    """ℓ(β·(sort(pc − rc)_k − sort(pr − rr)_k))."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    return _terms(pc, pr, rc, rr, beta, rank_matched(pc - rc, pr - rr), label_smoothing)
