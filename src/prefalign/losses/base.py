"""The loss registry and its single entry point, `compute_loss`.

Every preference loss here is a function of one per-pair *logit* z (for DPO z = β·h, for AMaPO
z = β·Δ − M, …) followed by a scalar function ℓ(z). Keeping the two apart lets `compute_loss` measure,
for any loss, the gradient weight |∂ℓ/∂z| each pair receives — the quantity AMaPO's argument is about —
without a per-loss derivative written by hand.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class PairTerms:
    """What a loss function returns before `compute_loss` turns it into a `LossOutput`."""

    logits: torch.Tensor  # [B] the argument z of ℓ; differentiable
    loss_of_logit: Callable[[torch.Tensor], torch.Tensor]  # ℓ, elementwise
    rewards_chosen: torch.Tensor  # [B] implicit rewards (TRL's `rewards/chosen`)
    rewards_rejected: torch.Tensor  # [B]
    correct: torch.Tensor  # [B] bool: the pair is ranked correctly now
    extra_losses: torch.Tensor | None = None  # [B] a term outside ℓ(z), e.g. ORPO's chosen NLL
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    losses: torch.Tensor  # [B] differentiable per-pair losses; the trainer takes the mean
    logits: torch.Tensor  # [B] detached z
    grad_weights: torch.Tensor  # [B] detached |∂ℓ/∂z|, the gradient weight of each pair
    correct: torch.Tensor  # [B] bool, detached
    rewards_chosen: torch.Tensor  # [B] detached
    rewards_rejected: torch.Tensor  # [B] detached
    metrics: dict[str, torch.Tensor]  # detached scalars


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., PairTerms]
    needs_reference: bool
    length_normalized: bool  # wants mean per-token log-probs instead of sums
    summary: str

    @property
    def defaults(self) -> dict[str, object]:
        """The loss's hyperparameters and their defaults (keyword-only arguments of `fn`)."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, needs_reference: bool, length_normalized: bool, summary: str):
    def wrap(fn: Callable[..., PairTerms]) -> Callable[..., PairTerms]:
        LOSSES[name] = LossSpec(name, fn, needs_reference, length_normalized, summary)
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        valid = ", ".join(sorted(LOSSES))
        near = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown loss '{name}'{hint}; valid losses: {valid}")
    return LOSSES[name]


def _as_float(t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor of per-sequence log-probs, got shape {tuple(t.shape)}")
    # Half-precision log-probs lose the small differences preference losses live on: work in fp32 at least.
    return t if t.dtype == torch.float64 else t.float()


def compute_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    **hparams,
) -> LossOutput:
    """Per-pair losses, gradient weights and detached metrics for the loss `name`.

    Log-probs are per sequence: sums over completion tokens, or per-token means where
    `LOSSES[name].length_normalized`. A hyperparameter left out (or passed as None) takes the loss's default.
    """
    spec = get_loss(name)
    defaults = spec.defaults
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise ValueError(
            f"loss '{name}' does not take {', '.join(unknown)}; its hyperparameters: {', '.join(defaults) or 'none'}"
        )
    kwargs = {k: (v if hparams.get(k) is None else hparams[k]) for k, v in defaults.items()}

    pc = _as_float(policy_chosen_logps, "policy_chosen_logps")
    pr = _as_float(policy_rejected_logps, "policy_rejected_logps")
    if pc.shape != pr.shape:
        raise ValueError(f"chosen and rejected log-probs differ in shape: {tuple(pc.shape)} vs {tuple(pr.shape)}")
    rc = _as_float(reference_chosen_logps, "reference_chosen_logps")
    rr = _as_float(reference_rejected_logps, "reference_rejected_logps")
    if spec.needs_reference:
        if rc is None or rr is None:
            raise ValueError(
                f"loss '{name}' needs reference log-probs (reference_chosen_logps and reference_rejected_logps); "
                f"reference-free losses: {', '.join(sorted(k for k, s in LOSSES.items() if not s.needs_reference))}"
            )
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError("reference log-probs must have the same shape as the policy log-probs")
        rc, rr = rc.to(pc.dtype), rr.to(pc.dtype)
        terms = spec.fn(pc, pr, rc, rr, **kwargs)
    else:
        terms = spec.fn(pc, pr, **kwargs)

    losses = terms.loss_of_logit(terms.logits)
    if terms.extra_losses is not None:
        losses = losses + terms.extra_losses

    # |∂ℓ/∂z| on a detached copy, so this never touches the model's graph and works under no_grad.
    with torch.enable_grad():
        z = terms.logits.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(terms.loss_of_logit(z).sum(), z)
    grad_weights = grad.abs().detach()

    correct = terms.correct.detach().bool()
    rc_, rr_ = terms.rewards_chosen.detach(), terms.rewards_rejected.detach()
    metrics = {
        "rewards/chosen": rc_.mean(),
        "rewards/rejected": rr_.mean(),
        "rewards/accuracies": (rc_ > rr_).float().mean(),
        "rewards/margins": (rc_ - rr_).mean(),
        **gradient_allocation(grad_weights, correct),
        **{k: v.detach() for k, v in terms.metrics.items()},
    }
    return LossOutput(
        losses=losses,
        logits=terms.logits.detach(),
        grad_weights=grad_weights,
        correct=correct,
        rewards_chosen=rc_,
        rewards_rejected=rr_,
        metrics=metrics,
    )


def gradient_allocation(grad_weights: torch.Tensor, correct: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of the batch's total gradient weight on correctly ranked vs misranked pairs.

    With no weight at all (every pair saturated) both shares are 0, not NaN.
    """
    total = grad_weights.sum()
    on_correct = grad_weights[correct].sum()
    on_misranked = grad_weights[~correct].sum()
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return {
        "grad/share_correct": torch.where(total > 0, on_correct / safe, torch.zeros_like(total)),
        "grad/share_misranked": torch.where(total > 0, on_misranked / safe, torch.zeros_like(total)),
        "grad/weight_mean": grad_weights.mean(),
    }
