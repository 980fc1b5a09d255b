"""Losses that treat the chosen and the rejected log-ratio apart — NCA, BCO, SPPO (hard) and APO as TRL
1.16's DPOTrainer computes them, and Cal-DPO as its authors' code does. Their logit is the pair z = (z_c, z_r) per pair, z_c = β·(pc − rc) and
z_r = β·(pr − rr) (SPPO, Cal-DPO: without β), so each can pull a response's likelihood up or down on its own
instead of only their difference; `compute_loss` reports the mean of |∂ℓ/∂z_c| and |∂ℓ/∂z_r| as the
pair's gradient weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairTerms, register
from .checks import check_beta


def per_response_terms(pc, pr, rc, rr, beta, z, loss_of_logit, **extra) -> PairTerms:
    u_c, u_r = pc - rc, pr - rr
    return PairTerms(
        logits=z,
        loss_of_logit=loss_of_logit,
        rewards_chosen=beta * u_c.detach(),
        rewards_rejected=beta * u_r.detach(),
        correct=(u_c > u_r).detach(),
        **extra,
    )


def _scaled(pc, pr, rc, rr, beta) -> torch.Tensor:
    return beta * torch.stack([pc - rc, pr - rr], dim=-1)


@register("nca_pair", needs_reference=True, length_normalized=False, summary="NCA, pairwise (Chen et al., 2024)")
def nca_pair(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    """−logσ(z_c) − ½·logσ(−z_c) − ½·logσ(−z_r)."""
    check_beta(beta)

    def loss_of_logit(z):
        zc, zr = z.unbind(-1)
        return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)

    return per_response_terms(pc, pr, rc, rr, beta, _scaled(pc, pr, rc, rr, beta), loss_of_logit)


@register("bco_pair", needs_reference=True, length_normalized=False, summary="BCO, pairwise (Jung et al., 2024)")
def bco_pair(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    """−logσ(z_c) − logσ(−z_r): each response classified on its own (TRL 1.16: no running reward mean)."""
    check_beta(beta)

    def loss_of_logit(z):
        zc, zr = z.unbind(-1)
        return -F.logsigmoid(zc) - F.logsigmoid(-zr)

    return per_response_terms(pc, pr, rc, rr, beta, _scaled(pc, pr, rc, rr, beta), loss_of_logit)


@register("sppo_hard", needs_reference=True, length_normalized=False, summary="SPPO, hard labels (Wu et al., 2024)")
def sppo_hard(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    """(u_c − 1/(2β))² + (u_r + 1/(2β))² on the unscaled log-ratios u (P = 1 for the winner, 0 for the loser)."""
    check_beta(beta)
    half = 0.5 / beta

    def loss_of_logit(z):
        uc, ur = z.unbind(-1)
        return (uc - half) ** 2 + (ur + half) ** 2

    z = torch.stack([pc - rc, pr - rr], dim=-1)
    return per_response_terms(pc, pr, rc, rr, beta, z, loss_of_logit)


@register("apo_zero", needs_reference=True, length_normalized=False, summary="APO-zero (D'Oosterlinck et al., 2024)")
def apo_zero(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    """(1 − σ(z_c)) + σ(z_r): raise the chosen likelihood, lower the rejected (chosen better than the model's own)."""
    check_beta(beta)

    def loss_of_logit(z):
        zc, zr = z.unbind(-1)
        return 1 - torch.sigmoid(zc) + torch.sigmoid(zr)

    return per_response_terms(pc, pr, rc, rr, beta, _scaled(pc, pr, rc, rr, beta), loss_of_logit)


@register("apo_down", needs_reference=True, length_normalized=False, summary="APO-down (D'Oosterlinck et al., 2024)")
def apo_down(pc, pr, rc, rr, *, beta: float = 0.1) -> PairTerms:
    """σ(z_c) + (1 − σ(z_c − z_r)): lower both, the rejected more (chosen worse than the model's own outputs)."""
    check_beta(beta)

    def loss_of_logit(z):
        zc, zr = z.unbind(-1)
        return torch.sigmoid(zc) + 1 - torch.sigmoid(zc - zr)

    return per_response_terms(pc, pr, rc, rr, beta, _scaled(pc, pr, rc, rr, beta), loss_of_logit)


@register("cal_dpo", needs_reference=True, length_normalized=False, summary="Cal-DPO (Xiao et al., 2024)")
def cal_dpo(pc, pr, rc, rr, *, beta: float = 0.001) -> PairTerms:
    """−logσ(u_c − u_r) + ½[(u_c − 1/(2β))² + (u_r + 1/(2β))²] on the unscaled log-ratios u: DPO's ranking term
    (no β inside the sigmoid, as the authors' code) plus a calibration that pulls the implicit rewards to
    ±1/(2β), so the chosen likelihood cannot fall with the rejected one. Default β: the authors' run script."""
    check_beta(beta)
    target = 0.5 / beta

    def loss_of_logit(z):
        uc, ur = z.unbind(-1)
        return -F.logsigmoid(uc - ur) + 0.5 * ((uc - target) ** 2 + (ur + target) ** 2)

    z = torch.stack([pc - rc, pr - rr], dim=-1)
    return per_response_terms(pc, pr, rc, rr, beta, z, loss_of_logit)
