"""The loss registry and its single entry point, `compute_loss`.

Every preference loss here is a function of one per-pair *logit* z (for DPO z = β·h, for AMaPO
z = β·Δ − M, …) followed by a scalar function ℓ(z). Keeping the two apart lets `compute_loss` measure,
for any loss, the gradient weight |∂ℓ/∂z| each pair receives — the quantity AMaPO's argument is about —
without a per-loss derivative written by hand.

A few losses act on the chosen and the rejected log-ratio separately (NCA, BCO, SPPO, APO): their logit is
a pair z = (z_c, z_r) per pair ([B, 2]) and the gradient weight is the mean of |∂ℓ/∂z_c| and |∂ℓ/∂z_r|,
which for a loss of z_c − z_r alone is exactly |∂ℓ/∂z| again.

Besides hyperparameters, a loss may take per-pair *side inputs* (`SIDE_INPUTS`: response scores, token
counts), a `state` it carries from step to step (EMA statistics; returned updated, never changed in place),
a `gather_fn` that collects a detached tensor from every process (with `local_offset`, where this
process's pairs start in it) and a `seed` for random draws.
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

    logits: torch.Tensor  # [B] (or [B, 2]: z_c, z_r) the argument z of ℓ; differentiable
    loss_of_logit: Callable[[torch.Tensor], torch.Tensor]  # ℓ: [B] -> [B] elementwise, or [B, 2] -> [B]
    rewards_chosen: torch.Tensor  # [B] implicit rewards (TRL's `rewards/chosen`)
    rewards_rejected: torch.Tensor  # [B]
    correct: torch.Tensor  # [B] bool: the pair is ranked correctly now
    extra_losses: torch.Tensor | None = None  # [B] a term outside ℓ(z), e.g. ORPO's chosen NLL
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None  # [B] detached per-pair factor of the loss (β-DPO's data filter)
    state: dict[str, torch.Tensor] | None = None  # the loss's state after this batch (stateful losses)


@dataclass
class LossOutput:
    losses: torch.Tensor  # [B] differentiable per-pair losses; the trainer takes the mean
    logits: torch.Tensor  # [B] detached z
    grad_weights: torch.Tensor  # [B] detached |∂ℓ/∂z|, the gradient weight of each pair
    correct: torch.Tensor  # [B] bool, detached
    rewards_chosen: torch.Tensor  # [B] detached
    rewards_rejected: torch.Tensor  # [B] detached
    metrics: dict[str, torch.Tensor]  # detached scalars
    state: dict[str, torch.Tensor] | None = None  # a stateful loss's state after this batch


# Per-pair inputs besides the log-probs, passed by keyword to the losses that declare them.
SIDE_INPUTS = ("chosen_scores", "rejected_scores", "chosen_lengths", "rejected_lengths")
# Keyword arguments of a loss function that are not hyperparameters.
RUNTIME_INPUTS = (*SIDE_INPUTS, "state", "gather_fn", "gathered_delta", "local_offset", "seed")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., PairTerms]
    needs_reference: bool
    length_normalized: bool  # wants mean per-token log-probs instead of sums
    summary: str

    @property
    def defaults(self) -> dict[str, object]:
        """The loss's hyperparameters and their defaults (keyword-only arguments of `fn`, runtime inputs aside)."""
        return {k: v for k, v in self._keywords.items() if k not in RUNTIME_INPUTS}

    @property
    def side_inputs(self) -> tuple[str, ...]:
        return tuple(k for k in SIDE_INPUTS if k in self._keywords)

    @property
    def stateful(self) -> bool:
        return "state" in self._keywords

    @property
    def gathers(self) -> bool:
        """Takes `gather_fn`: batch statistics over every process."""
        return "gather_fn" in self._keywords

    @property
    def _keywords(self) -> dict[str, object]:
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
    *,
    pair_weights: torch.Tensor | None = None,
    **hparams,
) -> LossOutput:
    """Per-pair losses, gradient weights and detached metrics for the loss `name`.

    Log-probs are per sequence: sums over completion tokens, or per-token means where
    `LOSSES[name].length_normalized`. A hyperparameter left out (or passed as None) takes the loss's default.
    Side inputs (`SIDE_INPUTS`), `state` and `gather_fn` go to the losses that declare them.
    `pair_weights` ([B], detached) multiplies each pair's loss and gradient weight (WPO's weights).
    """
    spec = get_loss(name)
    defaults = spec.defaults
    runtime = {k: hparams.pop(k) for k in RUNTIME_INPUTS if k in hparams}
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise ValueError(
            f"loss '{name}' does not take {', '.join(unknown)}; its hyperparameters: {', '.join(defaults) or 'none'}"
        )
    kwargs = {k: (v if hparams.get(k) is None else hparams[k]) for k, v in defaults.items()}
    for key, value in runtime.items():
        if key in spec._keywords:  # a side input the loss does not use is simply not passed
            kwargs[key] = _side_input(value, key) if key in SIDE_INPUTS and value is not None else value

    pc = _as_float(policy_chosen_logps, "policy_chosen_logps")
    pr = _as_float(policy_rejected_logps, "policy_rejected_logps")
    if pc.shape != pr.shape:
        raise ValueError(f"chosen and rejected log-probs differ in shape: {tuple(pc.shape)} vs {tuple(pr.shape)}")
    rc = _as_float(reference_chosen_logps, "reference_chosen_logps")
    rr = _as_float(reference_rejected_logps, "reference_rejected_logps")
    for key in spec.side_inputs:
        if kwargs.get(key) is not None:
            if kwargs[key].shape != pc.shape:
                raise ValueError(f"{key} has shape {tuple(kwargs[key].shape)}, the log-probs {tuple(pc.shape)}")
            kwargs[key] = kwargs[key].to(device=pc.device, dtype=pc.dtype)
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
    if grad_weights.dim() == 2:  # (z_c, z_r): how strongly the pair pushes each of its two log-probs
        grad_weights = grad_weights.mean(-1)
    factor = None
    for w in (terms.weights, pair_weights):
        if w is not None:
            w = _side_input(w, "pair_weights").detach().to(losses.dtype)
            factor = w if factor is None else factor * w
    if factor is not None:
        losses, grad_weights = losses * factor, grad_weights * factor

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
        state=terms.state,
    )


def _side_input(value, what: str) -> torch.Tensor:
    t = value if torch.is_tensor(value) else torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor with one value per pair, got shape {tuple(t.shape)}")
    return t if t.dtype == torch.float64 else t.float()


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
