"""DPO with a fixed per-pair offset inside the sigmoid: ODPO, R-DPO and DPO-Positive. Each is
−logσ(β·h − offset) on summed log-probs, h = (pc − pr) − (rc − rr); they differ in where the offset
comes from (docs/losses.md gives sources and commits):

odpo   offset = odpo_alpha · log(s_c − s_r), from per-response scores in the data (rycolab/odpo).
rdpo   offset = −rdpo_alpha · (|y_c| − |y_r|), lengths in tokens: the paper's Eq. 9, −logσ(β·h + α·Δ|y|)
       (Park et al., 2024; the authors released no code).
dpop   offset = β · dpop_lambda · max(0, rc − pc): a penalty whenever the chosen completion's likelihood
       falls below the reference's (Pal et al., 2024, Eq. 3).
"""

from __future__ import annotations

import math

import torch

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .reference_based import sigmoid_smoothed


def _finite(value, name: str, minimum: float | None = None) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and (minimum is None or value >= minimum)):
        raise ValueError(f"{name} must be a finite number{'' if minimum is None else f' >= {minimum}'}, got {value!r}")


def offset_terms(pc, pr, rc, rr, beta, offset, label_smoothing=0.0, **metrics) -> PairTerms:
    h = (pc - pr) - (rc - rr)
    z = beta * h - offset
    return PairTerms(
        logits=z,
        loss_of_logit=sigmoid_smoothed(label_smoothing),
        rewards_chosen=beta * (pc - rc).detach(),
        rewards_rejected=beta * (pr - rr).detach(),
        correct=(h > 0).detach(),  # ranked by the implicit rewards, offset aside
        metrics={k: v.detach() for k, v in metrics.items()},
    )


@register("odpo", needs_reference=True, length_normalized=False, summary="ODPO, DPO with an offset (Amini et al., 2024)")
def odpo(pc, pr, rc, rr, *, beta: float = 0.1, odpo_alpha: float = 1.0, label_smoothing: float = 0.0,
         chosen_scores=None, rejected_scores=None) -> PairTerms:
    """The chosen response must win by a margin that grows with how much better its score is."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    _finite(odpo_alpha, "odpo_alpha")
    if chosen_scores is None or rejected_scores is None:
        raise ValueError("odpo needs chosen_scores and rejected_scores (columns score_chosen and score_rejected)")
    gap = chosen_scores - rejected_scores
    if not bool(torch.isfinite(gap).all() & (gap > 0).all()):
        bad = int(torch.nonzero(~(torch.isfinite(gap) & (gap > 0)))[0])
        raise ValueError(f"odpo needs chosen_scores > rejected_scores (the offset is log of their gap); pair {bad} "
                         f"has {float(chosen_scores[bad])} vs {float(rejected_scores[bad])}")
    offset = odpo_alpha * torch.log(gap)
    return offset_terms(pc, pr, rc, rr, beta, offset, label_smoothing, **{"odpo/offset": offset.mean()})


@register("rdpo", needs_reference=True, length_normalized=False, summary="R-DPO, length-regularised (Park et al., 2024)")
def rdpo(pc, pr, rc, rr, *, beta: float = 0.1, rdpo_alpha: float = 0.05, chosen_lengths=None,
         rejected_lengths=None) -> PairTerms:
    """−logσ(β·h + α·(|y_c| − |y_r|)): the part of a preference a length difference explains is discounted."""
    check_beta(beta)
    _finite(rdpo_alpha, "rdpo_alpha", 0.0)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("rdpo needs chosen_lengths and rejected_lengths (completion tokens)")
    length_gap = chosen_lengths - rejected_lengths
    return offset_terms(pc, pr, rc, rr, beta, -rdpo_alpha * length_gap, **{"rdpo/length_gap": length_gap.mean()})


@register("dpop", needs_reference=True, length_normalized=False, summary="DPO-Positive (Pal et al., 2024)")
def dpop(pc, pr, rc, rr, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> PairTerms:
    """−logσ(β·(h − λ·max(0, rc − pc))); the penalty carries gradient, so it pushes pc back up towards rc."""
    check_beta(beta)
    _finite(dpop_lambda, "dpop_lambda", 0.0)
    penalty = torch.relu(rc - pc)
    return offset_terms(pc, pr, rc, rr, beta, beta * dpop_lambda * penalty,
                        **{"dpop/penalty": penalty.mean(), "dpop/penalized_fraction": (penalty > 0).float().mean()})
