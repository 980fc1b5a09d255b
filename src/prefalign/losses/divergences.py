"""f-divergence scores of a log-ratio u = log π_θ(y|x) − log π_ref(y|x) (f-DPO, Wang et al. 2024), as TRL 1.16.

DPO is the reverse KL, whose score is u itself; another f replaces u by f′(π_θ/π_ref) in the chosen-minus-
rejected difference. Only that difference is valid (a β·log Z(x) term cancels in it), so only the losses of
that difference take `f_divergence_type` — TRL's list: sigmoid (dpo), sigmoid_norm, hinge, ipo, exo_pair,
robust and discopop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
ALPHA_EXPONENT_CAP = 80.0  # TRL's clamp of (α−1)·u for fp32 before exp, so exp stays finite


def check_f_divergence(kind: str, alpha_coef: float) -> None:
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {kind!r}")
    if not (isinstance(alpha_coef, int | float) and math.isfinite(alpha_coef)):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {alpha_coef!r}")


def f_score(log_ratio: torch.Tensor, kind: str = "reverse_kl", alpha_coef: float = 0.5) -> torch.Tensor:
    """f′(t) at t = exp(log_ratio): u (reverse KL), 1 − e^(−u) (forward KL), log 2 + logσ(u) (Jensen-Shannon),
    (e^((α−1)u) − 1)/(α−1) (α-divergence; α = 1 is the reverse KL limit)."""
    check_f_divergence(kind, alpha_coef)
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha_coef - 1.0) < 1e-6):
        return log_ratio
    if kind == "forward_kl":
        return -torch.expm1(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    t = ((alpha_coef - 1.0) * log_ratio).clamp(max=ALPHA_EXPONENT_CAP)
    return torch.expm1(t) / (alpha_coef - 1.0)
