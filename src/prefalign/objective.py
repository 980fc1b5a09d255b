"""The training objective of a batch of pairs: from per-sequence log-probs to the loss and its metrics.

    objective = Objective.from_config(args)
    out = compute_objective(objective, policy_logps, reference_logps, states=..., spo=...)
    out.loss.backward()

Pure: it knows the losses (the registry in `losses/`), the sequence weightings (LD-DPO, WPO) and SPO's
auxiliary term, and nothing of models, batches' layouts or trainers. The trainer runs the forward and hands
over the [2B] log-probs (chosen rows, then rejected rows); evaluation calls the same function on the same
numbers, so `eval_loss` is the training objective by construction.

    total = Σₖ wₖ · mean ℓₖ                      preference terms, as TRL combines a list of loss types
          + sft_weight · NLL(chosen)              token-averaged NLL of the chosen completions
          + w_sft · NLL(chosen) · mean WPO weight  TRL's "sft" loss_type (weighted as TRL weights it)
          + spo_weight · CE(SPO head)             SPO's degree classification (spo/)

The first preference loss's output (rewards, margins, gradient weights) describes the run, as a single loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import SFT
from .losses import LOSSES, compute_loss
from .losses.base import LossOutput
from .modeling.logps import SequenceLogps
from .modeling.sequence_weights import length_desensitized, wpo_weights
from .spo.head import spo_loss

# Per-pair fields an evaluation records beside Δ (eval_per_pair.jsonl): each pair's Σ wₖ·ℓₖ, the first loss's
# implicit rewards and, with WPO, the pair weight.
LOSS, REWARD_CHOSEN, REWARD_REJECTED, WPO_WEIGHT = "loss", "reward_chosen", "reward_rejected", "wpo_weight"


@dataclass(frozen=True)
class Objective:
    """What the loss of a batch is made of (from the config: `Objective.from_config`)."""

    terms: tuple[tuple[str, float], ...]  # (preference loss, weight)
    hparams: dict[str, dict] = field(default_factory=dict)  # loss -> its hyperparameters
    sft_weight: float = 0.0
    sft_term_weight: float = 0.0  # loss_type "sft": weighted by the mean WPO weight, as TRL
    ld_alpha: float | None = None
    use_weighting: bool = False
    wpo_clamp: bool = False
    spo_weight: float = 0.0
    seed: int = 0  # stateful losses draw from it

    @classmethod
    def from_config(cls, args) -> Objective:
        terms = tuple((n, float(w)) for n, w in args.loss_terms() if n != SFT)
        return cls(terms=terms, hparams={n: args.loss_hparams(n) for n, _ in terms},
                   sft_weight=float(args.sft_weight),
                   sft_term_weight=float(sum(w for n, w in args.loss_terms() if n == SFT)),
                   ld_alpha=args.ld_alpha, use_weighting=bool(args.use_weighting), wpo_clamp=bool(args.wpo_clamp),
                   spo_weight=float(getattr(args, "spo_weight", 0.0) or 0.0), seed=int(args.seed))


@dataclass
class SPOTerm:
    """SPO's auxiliary classification: the head, the degraded rows' mean final hidden states, their degrees,
    and `scale` = local samples × processes / samples over all processes (1 on one process), which makes the
    per-process mean the mean over every process's samples once DDP/FSDP average the gradients."""

    head: torch.nn.Module
    hidden_mean: torch.Tensor
    degrees: torch.Tensor
    scale: float = 1.0


@dataclass
class BatchObjective:
    loss: torch.Tensor
    first: LossOutput  # the first preference loss's output: rewards, margins, gradient weights
    metrics: dict[str, torch.Tensor]  # detached, one number each
    per_pair: dict[str, torch.Tensor]  # [B] each, detached: LOSS, REWARD_*, WPO_WEIGHT
    states: dict[str, dict]  # stateful losses' updated running statistics (the caller keeps them, if training)


def compute_objective(objective: Objective, policy: SequenceLogps,
                      reference: tuple[torch.Tensor, torch.Tensor] | None, *,
                      chosen_scores: torch.Tensor | None = None, rejected_scores: torch.Tensor | None = None,
                      states: dict | None = None, gather_fn: Callable | None = None, local_offset: int | None = None,
                      spo: SPOTerm | None = None) -> BatchObjective:
    """The loss of B pairs from the policy's log-probs [2B] and the reference's (summed, per-token mean) [2B]
    each or None. `gather_fn`/`local_offset`: for losses with batch statistics, the micro-batch over every
    process (as the authors' code pools it); `states`: stateful losses' running statistics so far."""
    b = policy.sum.shape[0] // 2
    states = states or {}
    sums, means = (policy.sum, policy.mean) if objective.ld_alpha is None else length_desensitized(policy, objective.ld_alpha)
    weights = wpo_weights(policy, clamp=objective.wpo_clamp) if objective.use_weighting else None
    side = {"chosen_lengths": policy.n_tokens[:b], "rejected_lengths": policy.n_tokens[b:],
            "chosen_scores": chosen_scores, "rejected_scores": rejected_scores}
    loss, first, metrics, per_pair, new_states = 0.0, None, {}, 0.0, {}
    for name, weight in objective.terms:
        spec = LOSSES[name]
        used = means if spec.length_normalized else sums
        ref = None if reference is None or not spec.needs_reference else reference[1 if spec.length_normalized else 0]
        runtime = dict(side)
        if spec.gathers and gather_fn is not None:
            runtime.update(gather_fn=gather_fn, local_offset=local_offset)
        if spec.stateful:
            runtime.update(state=states.get(name), seed=objective.seed)
        term = compute_loss(name, used[:b], used[b:], None if ref is None else ref[:b],
                            None if ref is None else ref[b:], pair_weights=weights, **runtime,
                            **objective.hparams.get(name, {}))
        if spec.stateful:
            new_states[name] = term.state
        loss = loss + weight * term.losses.mean()
        per_pair = per_pair + weight * term.losses.detach()
        if first is None:
            first = term
            metrics = {"logps/chosen": used[:b].detach().mean(), "logps/rejected": used[b:].detach().mean()}
        if len(objective.terms) > 1:
            metrics[f"loss/{name}"] = term.losses.detach().mean()
    if first is None:
        raise ValueError("an objective needs a preference loss (sft alone is refused by the config)")
    if weights is not None:
        metrics["wpo/weight"] = weights.mean()
    for sft, weighted in ((objective.sft_weight, False), (objective.sft_term_weight, weights is not None)):
        if sft > 0:
            # Token-averaged NLL of the chosen completions (TRL's "sft" term; the AMaPO code's CrossEntropyLoss)
            nll = -policy.sum[:b].sum() / policy.n_tokens[:b].sum().clamp(min=1)
            loss = loss + sft * (nll * weights.mean() if weighted else nll)
            metrics["sft_loss"] = nll.detach()
    if spo is not None:
        aux, spo_metrics = spo_loss(spo.head, spo.hidden_mean, spo.degrees)
        loss = loss + objective.spo_weight * aux * spo.scale
        metrics.update(spo_metrics)
    pairs = {LOSS: per_pair, REWARD_CHOSEN: first.rewards_chosen, REWARD_REJECTED: first.rewards_rejected}
    if weights is not None:
        pairs[WPO_WEIGHT] = weights
    return BatchObjective(loss, first, metrics, pairs, new_states)

