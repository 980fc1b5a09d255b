"""Reference-free losses: SimPO and ORPO on mean per-token log-probs, CPO on sums."""

from __future__ import annotations

import math

import torch

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .reference_based import sigmoid_smoothed


@register("simpo", needs_reference=False, length_normalized=True, summary="SimPO (Meng et al., 2024)")
def simpo(pc, pr, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> PairTerms:
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    return PairTerms(
        logits=beta * (pc - pr) - gamma,
        loss_of_logit=sigmoid_smoothed(label_smoothing),
        rewards_chosen=beta * pc.detach(),
        rewards_rejected=beta * pr.detach(),
        correct=(pc > pr).detach(),
    )


# log(1 − eᵖ) is −inf at p = 0 (a completion of probability 1); keep p a hair below 0 so the odds stay finite.
_MAX_LOGP = -1e-6


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) from log p, accurate near p = 1 via expm1."""
    logp = logp.clamp(max=_MAX_LOGP)
    return logp - torch.log(-torch.expm1(logp))


@register("orpo", needs_reference=False, length_normalized=True, summary="ORPO (Hong et al., 2024)")
def orpo(pc, pr, *, beta: float = 0.1) -> PairTerms:
    # ORPO = SFT + β·odds-ratio term. The SFT part is the chosen completion's mean per-token NLL, which is
    # exactly −pc (pc is already the mean per-token log-prob), so the loss is complete on its own.
    check_beta(beta)
    z = log_odds(pc) - log_odds(pr)
    return PairTerms(
        logits=z,
        loss_of_logit=lambda z: -beta * torch.nn.functional.logsigmoid(z),
        rewards_chosen=beta * pc.detach(),
        rewards_rejected=beta * pr.detach(),
        correct=(pc > pr).detach(),
        extra_losses=-pc,
        metrics={"orpo/log_odds_ratio": z.detach().mean(), "orpo/nll": (-pc).detach().mean()},
    )


@register("cpo", needs_reference=False, length_normalized=False, summary="CPO (Xu et al., 2024)")
def cpo(pc, pr, *, beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0, chosen_lengths=None) -> PairTerms:
    """−(1−ε)·logσ(β·(pc − pr)) − ε·logσ(−β·(pc − pr)) on summed log-probs, plus cpo_alpha × the chosen NLL, as
    TRL 1.16's CPOTrainer (loss_type sigmoid): the NLL is the token mean over the batch's chosen completions,
    so pair i carries −pc_i·B/Σ_j n_j of it (the mean over pairs is then exactly Σ −pc / Σ n)."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if not (isinstance(cpo_alpha, int | float) and math.isfinite(cpo_alpha) and cpo_alpha >= 0):
        raise ValueError(f"cpo_alpha must be a finite number >= 0, got {cpo_alpha!r}")
    extra = None
    if cpo_alpha:
        if chosen_lengths is None:
            raise ValueError("cpo with cpo_alpha > 0 needs chosen_lengths (the chosen completions' token counts)")
        extra = -cpo_alpha * pc * pc.shape[0] / chosen_lengths.sum().clamp(min=1)
    return PairTerms(
        logits=beta * (pc - pr),
        loss_of_logit=sigmoid_smoothed(label_smoothing),
        rewards_chosen=beta * pc.detach(),
        rewards_rejected=beta * pr.detach(),
        correct=(pc > pr).detach(),
        extra_losses=extra,
        metrics={} if extra is None else {"cpo/nll": (-pc.sum() / chosen_lengths.sum().clamp(min=1)).detach()},
    )
