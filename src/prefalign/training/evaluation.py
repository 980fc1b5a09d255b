"""What `PreferenceTrainer.evaluate()` returns beside the held-out ranking metrics (`evaluate.py`), so that a
TRL script's evaluation keeps its meaning:

- `eval_loss`: the training objective on the eval set. Each pair's Σ wₖ·ℓₖ is computed in its eval batch
  exactly as training computes it (so with AMaPO's, α-DPO's or β-DPO's batch statistics it depends on the pairs
  batched with it), then averaged over every eval pair of every process (not a mean of batch means, which
  weighs a short last batch up); an SFT term (`sft_weight`, loss_type `sft`) adds the chosen completions' NLL
  averaged over every chosen token of the set, as training averages it over a batch's.
- `eval_rewards/chosen|rejected|accuracies|margins`: TRL's names and definitions (DPOTrainer: β·(log π − log
  π_ref) of each completion, `accuracies` = chosen reward > rejected reward, a tie counting as wrong), for the
  first loss, as training logs `rewards/*`: on summed log-probs, or per-token means for a length-normalised
  loss; for a reference-free loss (SimPO, AMaPO, CPO, ORPO) the reward is β·log π. Averaged over pairs.
- `compute_metrics`: called once per eval set with a `PairPrediction` (below); the names it returns are
  prefixed `eval_` (or `eval_{name}_`) as transformers prefixes them.
- `metric_for_best_model`: checked at construction against these names.
"""

from __future__ import annotations

import numpy as np
from transformers.trainer_utils import EvalPrediction

from ..config import SFT, PreferenceConfig
from ..errors import PrefalignError
from ..evaluate import summarize
from ..objective import LOSS, REWARD_CHOSEN, REWARD_REJECTED, WPO_WEIGHT

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class PairPrediction(EvalPrediction):
    """What `compute_metrics` receives: one row per eval pair (all processes gathered, in dataset order).

    - `predictions` [N, 2]: the implicit rewards of the chosen and the rejected completion (those
      `eval_rewards/*` average), so `(p.predictions.argmax(-1) == p.label_ids).mean()` is the reward accuracy
      (argmax counts a tie as chosen);
    - `label_ids` [N]: zeros, column 0 (chosen) is the preferred one;
    - `losses` [N]: each pair's preference loss Σ wₖ·ℓₖ (the SFT term is per token, not per pair);
    - `delta` [N]: Δ = chosen − rejected mean per-token log-prob (ranking accuracy is the share with Δ > 0);
    - `records`: the per-pair records themselves (eval_per_pair.jsonl's rows).
    It must return a dict of metric name → number."""

    def __init__(self, records: list[dict]):
        rewards = np.array([[r[REWARD_CHOSEN], r[REWARD_REJECTED]] for r in records], dtype=np.float64).reshape(-1, 2)
        super().__init__(predictions=rewards, label_ids=np.zeros(len(records), dtype=np.int64),
                         losses=np.array([r[LOSS] for r in records], dtype=np.float64))
        self.delta = np.array([r["delta"] for r in records], dtype=np.float64)
        self.records = records


def numeric(summary: dict) -> dict:
    """The scalar metrics of a held-out summary (its bucket table and flags aside)."""
    return {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def has_objective(args: PreferenceConfig, has_reference: bool) -> bool:
    """Whether eval pairs can carry the training loss: the reference log-probs it needs are there, and it reads
    no per-response scores (held-out pairs are read without them)."""
    return (has_reference or args.reference_mode() == "none") and not args.needs_scores


def no_objective_reason(args: PreferenceConfig) -> str:
    if args.needs_scores:
        return "the loss reads per-response scores, which held-out pairs are read without"
    return "reference log-probs are precomputed only for the eval_dataset the trainer was given"


def objective_metrics(records: list[dict], args: PreferenceConfig) -> dict:
    """`loss` and TRL's `rewards/*` over the scored pairs (unprefixed); {} when the pairs carry no loss (their
    reference log-probs were not available)."""
    if not records or LOSS not in records[0]:
        return {}
    n = len(records)
    mean = lambda key: sum(r[key] for r in records) / n  # noqa: E731
    loss = mean(LOSS)
    sft_term = sum(w for name, w in args.loss_terms() if name == SFT)
    if args.sft_weight > 0 or sft_term > 0:
        # token-averaged over the whole set; the loss_type `sft` term carries the mean WPO weight, as in training
        nll = -sum(r["chosen_logp_sum"] for r in records) / max(sum(r["chosen_len"] for r in records), 1)
        wpo = mean(WPO_WEIGHT) if WPO_WEIGHT in records[0] else 1.0
        loss += args.sft_weight * nll + sft_term * nll * wpo
    chosen, rejected = mean(REWARD_CHOSEN), mean(REWARD_REJECTED)
    return {"loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": sum(r[REWARD_CHOSEN] > r[REWARD_REJECTED] for r in records) / n,
            "rewards/margins": chosen - rejected}


def user_metrics(compute_metrics, records: list[dict], prefix: str) -> dict:
    """compute_metrics(PairPrediction) with its names prefixed as transformers prefixes them."""
    out = compute_metrics(PairPrediction(records))
    if not isinstance(out, dict):
        raise PrefalignError(f"compute_metrics returned {type(out).__name__}; it must return a dict of metric name -> number")
    return {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in out.items()}


def metric_names(args: PreferenceConfig, eval_dataset) -> list[str]:
    """The names `evaluate()` returns for the trainer's eval set(s), compute_metrics' own aside."""
    record = {"delta": 1.0, "correct": True, "chosen_logp_mean": 0.0, "rejected_logp_mean": 0.0, "chosen_len": 1,
              "rejected_len": 1}
    if args.reference_mode() != "none":  # with a reference, the DPO reward accuracy and margin
        record.update(reward_margin=1.0, reward_correct=True)
    names = [*(() if args.needs_scores else ("loss", *REWARD_METRICS)), *numeric(summarize([record]))]
    if args.use_spo:
        names.append("spo_accuracy")
    prefixes = [f"eval_{k}" for k in eval_dataset] if isinstance(eval_dataset, dict) else ["eval"]
    return [f"{p}_{n}" for p in prefixes for n in names]


def best_metric_key(args: PreferenceConfig) -> str | None:
    """metric_for_best_model as transformers looks it up (`eval_` added unless there)."""
    name = args.metric_for_best_model
    return None if name is None else name if name.startswith("eval_") else f"eval_{name}"


def check_best_metric(args: PreferenceConfig, eval_dataset, compute_metrics) -> None:
    """metric_for_best_model names a metric evaluate() will return; a name compute_metrics may return is
    checked at the first evaluation instead (`missing_best_metric`)."""
    key = best_metric_key(args)
    if key is None or eval_dataset is None or compute_metrics is not None:
        return
    names = metric_names(args, eval_dataset)
    if key not in names:
        raise PrefalignError(f"metric_for_best_model: {key!r} is not a metric evaluate() returns; valid: {', '.join(names)}")


def missing_best_metric(args: PreferenceConfig, metrics: dict) -> None:
    key = best_metric_key(args)
    if key is not None and key not in metrics:
        raise PrefalignError(f"metric_for_best_model: {key!r} is not among the metrics evaluate() returned "
                             f"({', '.join(metrics)})")


def check_trainer_kwargs(args: PreferenceConfig, kwargs: dict) -> None:
    """transformers.Trainer arguments prefalign would otherwise take and never use: refused in one line."""
    if kwargs.get("compute_loss_func") is not None:
        raise PrefalignError("compute_loss_func: not supported; prefalign's loss is chosen by loss_type "
                             "(and loss_weights, sft_weight)")
    if kwargs.get("preprocess_logits_for_metrics") is not None:
        raise PrefalignError("preprocess_logits_for_metrics: not supported; evaluation keeps no logits, and "
                             "compute_metrics receives per-pair rewards, losses and Δ (docs/trl-migration.md)")
    if kwargs.get("compute_metrics") is not None and args.batch_eval_metrics:
        raise PrefalignError("batch_eval_metrics: prefalign calls compute_metrics once with every eval pair; "
                             "set batch_eval_metrics false")
