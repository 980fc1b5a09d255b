"""Losses that compare the policy with a frozen reference: DPO, IPO, hinge (SLiC) and robust DPO.

All four act on h = (pc − pr) − (rc − rr), the gap of policy-over-reference log-ratios.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing


def _terms(pc, pr, rc, rr, beta, z, loss_of_logit) -> PairTerms:
    h = (pc - pr) - (rc - rr)
    return PairTerms(
        logits=z,
        loss_of_logit=loss_of_logit,
        rewards_chosen=beta * (pc - rc).detach(),
        rewards_rejected=beta * (pr - rr).detach(),
        correct=(h > 0).detach(),
    )


def sigmoid_smoothed(eps: float):
    """ℓ(z) = −(1−ε)·logσ(z) − ε·logσ(−z): the conservative (label-smoothed) sigmoid loss."""
    return lambda z: -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register("dpo", needs_reference=True, length_normalized=False, summary="DPO (Rafailov et al., 2023)")
def dpo(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PairTerms:
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    h = (pc - pr) - (rc - rr)
    return _terms(pc, pr, rc, rr, beta, beta * h, sigmoid_smoothed(label_smoothing))


@register("ipo", needs_reference=True, length_normalized=True, summary="IPO (Azar et al., 2023)")
def ipo(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    # Here z = h itself: β only sets the target gap 1/(2β) that the squared loss pulls h towards.
    check_beta(beta)
    h = (pc - pr) - (rc - rr)
    target = 1.0 / (2.0 * beta)
    return _terms(pc, pr, rc, rr, beta, h, lambda z: (z - target) ** 2)


@register("hinge", needs_reference=True, length_normalized=False, summary="hinge / SLiC (Zhao et al., 2023)")
def hinge(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    check_beta(beta)
    h = (pc - pr) - (rc - rr)
    return _terms(pc, pr, rc, rr, beta, beta * h, lambda z: torch.relu(1 - z))


@register("robust", needs_reference=True, length_normalized=False, summary="robust DPO (Chowdhury et al., 2024)")
def robust(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PairTerms:
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    eps = label_smoothing
    h = (pc - pr) - (rc - rr)

    def loss_of_logit(z):
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)

    return _terms(pc, pr, rc, rr, beta, beta * h, loss_of_logit)
