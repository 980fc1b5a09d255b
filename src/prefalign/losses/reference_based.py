"""Losses of one logit built from the policy-over-reference log-ratios: DPO (TRL's sigmoid), IPO, hinge
(SLiC), robust DPO, EXO, DiscoPOP and TRL's sigmoid_norm — all as TRL 1.16's DPOTrainer computes them.

With u_c = pc − rc and u_r = pr − rr the log-ratios, each acts on h = f′(u_c) − f′(u_r): under the default
reverse KL f′(u) = u and h = (pc − pr) − (rc − rr); `f_divergence_type` picks another f (`divergences.py`).
IPO and sigmoid_norm take per-token means (TRL divides the summed scores by the token counts); with an f
other than the reverse KL they need those counts (`chosen_lengths`, `rejected_lengths`), as f acts on sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .divergences import check_f_divergence, f_score


def log_ratio_gap(pc, pr, rc, rr, kind: str, alpha_coef: float, lengths=None) -> torch.Tensor:
    """h = f′(u_c) − f′(u_r); for per-token means with `lengths` = (n_c, n_r), f acts on the sums as in TRL."""
    check_f_divergence(kind, alpha_coef)
    if kind == "reverse_kl":
        return (pc - pr) - (rc - rr)
    if lengths is None:
        return f_score(pc - rc, kind, alpha_coef) - f_score(pr - rr, kind, alpha_coef)
    n_c, n_r = lengths
    if n_c is None or n_r is None:
        raise ValueError(f"f_divergence_type {kind} with a per-token-mean loss needs chosen_lengths and rejected_lengths")
    n_c, n_r = n_c.clamp(min=1), n_r.clamp(min=1)
    return f_score((pc - rc) * n_c, kind, alpha_coef) / n_c - f_score((pr - rr) * n_r, kind, alpha_coef) / n_r


def _terms(pc, pr, rc, rr, beta, h, z, loss_of_logit, **extra) -> PairTerms:
    return PairTerms(
        logits=z,
        loss_of_logit=loss_of_logit,
        rewards_chosen=beta * (pc - rc).detach(),
        rewards_rejected=beta * (pr - rr).detach(),
        correct=(h > 0).detach(),
        **extra,
    )


def sigmoid_smoothed(eps: float):
    """ℓ(z) = −(1−ε)·logσ(z) − ε·logσ(−z): the conservative (label-smoothed) sigmoid loss."""
    return lambda z: -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register("dpo", needs_reference=True, length_normalized=False, summary="DPO (Rafailov et al., 2023)")
def dpo(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5) -> PairTerms:
    # TRL 1.16's sigmoid has no label smoothing; here ε > 0 gives conservative DPO (cDPO), ε = 0 is TRL's.
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return _terms(pc, pr, rc, rr, beta, h, beta * h, sigmoid_smoothed(label_smoothing))


@register("ipo", needs_reference=True, length_normalized=True, summary="IPO (Azar et al., 2023)")
def ipo(pc, pr, rc, rr, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5, chosen_lengths=None, rejected_lengths=None) -> PairTerms:
    # Here z = h itself: β only sets the target gap 1/(2β) that the squared loss pulls h towards.
    check_beta(beta)
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef, (chosen_lengths, rejected_lengths))
    target = 1.0 / (2.0 * beta)
    return _terms(pc, pr, rc, rr, beta, h, h, lambda z: (z - target) ** 2)


@register("hinge", needs_reference=True, length_normalized=False, summary="hinge / SLiC (Zhao et al., 2023)")
def hinge(pc, pr, rc, rr, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl",
          f_alpha_divergence_coef: float = 0.5) -> PairTerms:
    check_beta(beta)
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return _terms(pc, pr, rc, rr, beta, h, beta * h, lambda z: torch.relu(1 - z))


@register("robust", needs_reference=True, length_normalized=False, summary="robust DPO (Chowdhury et al., 2024)")
def robust(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
           f_alpha_divergence_coef: float = 0.5) -> PairTerms:
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    eps = label_smoothing
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)

    def loss_of_logit(z):
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)

    return _terms(pc, pr, rc, rr, beta, h, beta * h, loss_of_logit)


@register("sigmoid_norm", needs_reference=True, length_normalized=True,
          summary="length-normalised DPO (TRL's sigmoid_norm)")
def sigmoid_norm(pc, pr, rc, rr, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, chosen_lengths=None, rejected_lengths=None) -> PairTerms:
    check_beta(beta)
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef, (chosen_lengths, rejected_lengths))
    return _terms(pc, pr, rc, rr, beta, h, beta * h, lambda z: -F.logsigmoid(z))


@register("exo_pair", needs_reference=True, length_normalized=False, summary="EXO, pairwise (Ji et al., 2024)")
def exo_pair(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 1e-3,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> PairTerms:
    """KL(softmax over the pair of βh ‖ (1−ε, ε)): σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε), z = βh.
    ε must be > 0 (TRL's requirement; the paper uses 1e-3, which is the default here)."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if label_smoothing <= 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the target distribution (1-ε, ε)); the paper uses 1e-3")
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)

    def loss_of_logit(z):
        return torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)

    return _terms(pc, pr, rc, rr, beta, h, beta * h, loss_of_logit)


@register("discopop", needs_reference=True, length_normalized=False, summary="DiscoPOP (Chris Lu et al., 2024)")
def discopop(pc, pr, rc, rr, *, beta: float = 0.1, discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> PairTerms:
    """The log-ratio-modulated loss: (1 − σ(z/τ))·(−logσ(z)) + σ(z/τ)·e^(−z), z = βh.

    The exponential part is computed as exp(−z + logσ(z/τ)): the same value, but finite for very negative z,
    where TRL's e^(−z)·σ(z/τ) overflows to inf·0 = NaN."""
    check_beta(beta)
    if not (isinstance(discopop_tau, int | float) and math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau must be a positive number, got {discopop_tau!r}")
    h = log_ratio_gap(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)

    def loss_of_logit(z):
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z + F.logsigmoid(z / discopop_tau))

    return _terms(pc, pr, rc, rr, beta, h, beta * h, loss_of_logit)
