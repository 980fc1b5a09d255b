"""AMaPO — Adaptive Margin-attached Preference Optimization (Deng et al., AAAI 2026).

Reference-free and length-normalised: Δᵢ = pcᵢ − prᵢ (mean per-token log-probs). With μ and s the
mean and unbiased std of the detached rᵢ over the whole (gathered) batch, zᵢ = (μ − rᵢ)/s and

    Mᵢ = β·exp(zᵢ·μ)  if rᵢ < μ,  else 0          (no gradient through M)
    ℓᵢ = −(1−ε)·logσ(βΔᵢ − Mᵢ) − ε·logσ(−(βΔᵢ − Mᵢ))

variant="official" (the authors' code, the default): rᵢ = Δᵢ.
variant="paper" (the paper's notation, statistics of the reward r = βΔ): rᵢ = βΔᵢ, so the exponent
is zᵢ·β·μ_Δ.

Ablations of the paper: z_norm=False uses μ − rᵢ in place of zᵢ; exponential=False uses the official
code's linear alternative Mᵢ = 2β·zᵢ·μ; zero_margin=False gives every pair its margin.

Numerics the official code leaves open: statistics are taken in float64 whatever the input dtype; a batch
of one pair, zero spread or a non-finite statistic gives M = 0 (the loss falls back to −logσ(βΔ)); the
exponent is capped at `exponent_cap` (default 20, so M ≤ β·4.9e8) which leaves ordinary values alone and
keeps loss and gradient finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .reference_based import sigmoid_smoothed

VARIANTS = ("official", "paper")


def adaptive_margin(
    r: torch.Tensor,
    batch_r: torch.Tensor,
    *,
    beta: float,
    z_norm: bool = True,
    exponential: bool = True,
    zero_margin: bool = True,
    exponent_cap: float = 20.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Margins Mᵢ (detached, dtype of r) and the batch statistics they came from."""
    r64 = r.detach().double()
    all64 = batch_r.detach().double().flatten()
    n = all64.numel()
    mu = all64.mean()
    s = all64.std(unbiased=True) if n > 1 else torch.zeros((), dtype=torch.float64, device=all64.device)
    degenerate = n < 2 or not bool(torch.isfinite(mu) & torch.isfinite(s) & (s > 0))

    gap = mu - r64
    z = gap if not z_norm else gap / (s if not degenerate else torch.ones_like(s))
    if exponential:
        margin = beta * torch.exp((z * mu).clamp(max=exponent_cap))
    else:
        margin = 2 * beta * z * mu
    if zero_margin:
        margin = torch.where(r64 < mu, margin, torch.zeros_like(margin))
    if degenerate:
        margin = torch.zeros_like(margin)
    stats = {"mu": mu, "std": s, "margin": margin}
    return margin.to(r.dtype), stats


@register("amapo", needs_reference=False, length_normalized=True, summary="AMaPO (Deng et al., AAAI 2026)")
def amapo(
    pc,
    pr,
    *,
    beta: float = 2.0,
    label_smoothing: float = 0.0,
    amapo_variant: str = "official",
    z_norm: bool = True,
    exponential: bool = True,
    zero_margin: bool = True,
    exponent_cap: float = 20.0,
    gathered_delta: torch.Tensor | None = None,
    gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PairTerms:
    """`gathered_delta` (Δ of the whole global batch) or `gather_fn` (e.g. accelerator.gather) make μ and s
    global in distributed training; with neither, the local batch is the whole batch."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if amapo_variant not in VARIANTS:
        raise ValueError(f"amapo_variant must be one of {', '.join(VARIANTS)}, got {amapo_variant!r}")
    if gathered_delta is not None and gather_fn is not None:
        raise ValueError("pass gathered_delta or gather_fn, not both")

    delta = pc - pr
    scale = beta if amapo_variant == "paper" else 1.0
    if gather_fn is not None:
        batch_delta = gather_fn(delta.detach())
    elif gathered_delta is not None:
        batch_delta = torch.as_tensor(gathered_delta, device=delta.device)
    else:
        batch_delta = delta.detach()
    margin, stats = adaptive_margin(
        scale * delta,
        scale * batch_delta,
        beta=beta,
        z_norm=z_norm,
        exponential=exponential,
        zero_margin=zero_margin,
        exponent_cap=exponent_cap,
    )
    m64 = stats["margin"]
    return PairTerms(
        logits=beta * delta - margin,
        loss_of_logit=sigmoid_smoothed(label_smoothing),
        rewards_chosen=beta * pc.detach(),
        rewards_rejected=beta * pr.detach(),
        correct=(delta > 0).detach(),
        metrics={
            "amapo/mu": stats["mu"].float(),
            "amapo/std": stats["std"].float(),
            "amapo/mean_margin": m64.mean().float(),
            "amapo/margin_fraction": (m64 > 0).double().mean().float(),
        },
    )
