"""Losses whose margin or temperature follows running (EMA) statistics of the batch: α-DPO and β-DPO.

Both keep the mean and the (unbiased) standard deviation of a detached per-pair quantity, gathered over
every process, in an exponential moving average with momentum 0.9 that starts at zero and is updated
*before* it is used, as the authors' code does. The state is a dict of tensors that the loss returns
updated (it never changes its input), so the trainer saves it in checkpoints and every process holds the
same values. Numerics the authors' code leaves open: statistics in float64; a batch of one pair adds a
standard deviation of 0; a zero or non-finite running std makes the normalised gap 0 (α-DPO) or the
data-filter weights uniform (β-DPO) instead of NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .base import PairTerms, register
from .checks import check_beta, check_label_smoothing
from .reference_based import sigmoid_smoothed

EMA_MOMENTUM = 0.9
MIN_BETA = 1e-3  # β-DPO's floor on the dynamic β (authors' clamp)


def ema_update(state: dict | None, batch: torch.Tensor, momentum: float = EMA_MOMENTUM) -> dict[str, torch.Tensor]:
    """A new state {mean, std, updates} with this batch's mean and unbiased std folded in."""
    x = batch.detach().double().flatten()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    old = {k: torch.as_tensor(v, device=x.device) for k, v in (state or {}).items()}
    mean, std = old.get("mean", zero).double(), old.get("std", zero).double()
    batch_std = x.std(unbiased=True) if x.numel() > 1 else zero
    return {
        "mean": momentum * mean + (1 - momentum) * x.mean(),
        "std": momentum * std + (1 - momentum) * batch_std,
        "updates": old.get("updates", torch.zeros((), dtype=torch.long, device=x.device)).long() + 1,
    }


def _usable(std: torch.Tensor) -> bool:
    return bool(torch.isfinite(std) & (std > 0))


def _gathered(x: torch.Tensor, gather_fn: Callable | None) -> torch.Tensor:
    return gather_fn(x.detach()) if gather_fn is not None else x.detach()


@register("alpha_dpo", needs_reference=True, length_normalized=True, summary="α-DPO (Wu et al., 2024)")
def alpha_dpo(pc, pr, rc, rr, *, beta: float = 2.5, alpha: float = 0.2, gamma_beta_ratio: float = 0.6,
              label_smoothing: float = 0.0, state=None, gather_fn=None) -> PairTerms:
    """−logσ(β·(Δπ − sg(α·(M − μ)/σ + γ/β))) on mean log-probs: Δπ = pc − pr, M = Δπ − (rc − rr), and μ, σ the
    running mean and std of M. The reference enters only through the detached, adaptive margin."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    for name, value in (("alpha", alpha), ("gamma_beta_ratio", gamma_beta_ratio)):
        if not (isinstance(value, int | float) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    policy_gap = pc - pr
    m = policy_gap - (rc - rr)
    new_state = ema_update(state, _gathered(m, gather_fn))
    mu, sd = new_state["mean"], new_state["std"]
    normalized = (m.detach().double() - mu) / sd if _usable(sd) else torch.zeros_like(m, dtype=torch.float64)
    margin = (alpha * normalized + gamma_beta_ratio).to(m.dtype)
    return PairTerms(
        logits=beta * (policy_gap - margin),
        loss_of_logit=sigmoid_smoothed(label_smoothing),
        rewards_chosen=beta * pc.detach(),
        rewards_rejected=beta * pr.detach(),
        correct=(policy_gap > 0).detach(),
        state=new_state,
        metrics={"alpha_dpo/ema_mean": mu.float(), "alpha_dpo/ema_std": sd.float(),
                 "alpha_dpo/mean_margin": margin.mean()},
    )


@register("beta_dpo", needs_reference=True, length_normalized=False, summary="β-DPO (Wu et al., 2024)")
def beta_dpo(pc, pr, rc, rr, *, beta: float = 0.1, rho: float = 0.2, beta_dpo_a: float = 0.6, state=None,
             gather_fn=None, local_offset: int = 0, seed: int = 0) -> PairTerms:
    """−logσ(β_b·h) with one β per batch, β_b = max(β·(1 + a·(mean h of the kept pairs − μ)), 1e-3), over the
    pairs a data filter keeps: (1 − ρ)·N of the N pairs of the global batch, drawn without replacement with
    weights exp(−½((h − μ)/σ)²) (pairs far from the running mean of h are dropped more often). The loss is the
    mean over the kept pairs of the global batch (weights mask·N/kept, so the processes' mean, which DDP takes,
    is it; the authors' code divides by each process's own kept count instead, which makes the result depend
    on how the kept pairs fall across processes). The draw uses its own generator, seeded by `seed` and the
    number of updates, so it is the same on every process and after a resume."""
    check_beta(beta)
    if not (isinstance(rho, int | float) and 0 <= rho < 1):
        raise ValueError(f"rho (the fraction of pairs the filter drops) must be in [0, 1), got {rho!r}")
    if not (isinstance(beta_dpo_a, int | float) and math.isfinite(beta_dpo_a)):
        raise ValueError(f"beta_dpo_a must be a finite number, got {beta_dpo_a!r}")
    h = (pc - pr) - (rc - rr)
    if gather_fn is not None:  # the weights below are right only if every process holds as many pairs
        sizes = gather_fn(torch.tensor([h.shape[0]], device=h.device)).tolist()
        if len(set(sizes)) > 1:
            raise ValueError(f"beta_dpo: its global mean over kept pairs needs the same number of pairs on every "
                             f"process (accelerate's even_batches, on by default); got {sizes}")
    everywhere = _gathered(h, gather_fn).double()
    new_state = ema_update(state, everywhere)
    mu, sd = new_state["mean"], new_state["std"]
    n = everywhere.numel()
    if _usable(sd):  # floored so that a draw without replacement never runs out of candidates
        weights = torch.exp(-0.5 * ((everywhere - mu) / sd) ** 2).clamp(min=1e-300)
    else:
        weights = torch.ones_like(everywhere)
    kept = max(1, int(n * (1 - rho)))
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(new_state["updates"]))
    index = torch.multinomial(weights.cpu(), kept, replacement=False, generator=generator).to(everywhere.device)
    mask = torch.zeros_like(everywhere)
    mask[index] = 1.0
    beta_used = (beta * (1 + beta_dpo_a * (everywhere[index].mean() - mu))).clamp(min=MIN_BETA)
    local = mask[local_offset : local_offset + h.shape[0]].to(h.dtype)
    return PairTerms(
        logits=beta_used.to(h.dtype) * h,
        loss_of_logit=sigmoid_smoothed(0.0),
        rewards_chosen=beta * (pc - rc).detach(),
        rewards_rejected=beta * (pr - rr).detach(),
        correct=(h > 0).detach(),
        weights=local * n / mask.sum(),
        state=new_state,
        metrics={"beta_dpo/beta": beta_used.float(), "beta_dpo/ema_mean": mu.float(), "beta_dpo/ema_std": sd.float(),
                 "beta_dpo/kept_fraction": mask.mean().float()},
    )
