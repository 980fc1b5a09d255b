"""Held-out evaluation: ranking accuracy (AMaPO's definition) and, with a reference, DPO reward accuracy.

Ranking accuracy is the fraction of pairs whose chosen completion has the higher mean per-token
log-prob under the policy; a tie counts as wrong. With reference log-probs the implicit-reward accuracy
is the fraction with h = (pc − pr) − (rc − rr) > 0 on summed log-probs.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable

import torch

from .modeling import pair_logps

# Buckets of |Δ| (nats per token): where confident mistakes show up.
MARGIN_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    reference: Callable[[dict], torch.Tensor] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[dict]:
    """One record per pair. `reference(batch)` returns summed reference log-probs [2B] (chosen then rejected);
    `gather` collects per-pair tensors from all processes (accelerator.gather_for_metrics)."""
    was_training = model.training
    model.eval()
    cols: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in batches:
            b = batch["row_index"].shape[0]
            with autocast():
                lp = pair_logps(model, batch)  # packed when the collator packed the batch
            fields = {
                "index": batch["row_index"],
                "chosen_logp_mean": lp.mean[:b],
                "rejected_logp_mean": lp.mean[b:],
                "chosen_logp_sum": lp.sum[:b],
                "rejected_logp_sum": lp.sum[b:],
                "chosen_len": lp.n_tokens[:b],
                "rejected_len": lp.n_tokens[b:],
            }
            if reference is not None:
                ref = reference(batch).float()
                fields["ref_chosen_logp_sum"] = ref[:b]
                fields["ref_rejected_logp_sum"] = ref[b:]
            for k, v in fields.items():
                v = v.detach()
                cols.setdefault(k, []).append((gather(v) if gather else v).cpu())
    finally:
        model.train(was_training)
    if not cols:
        return []
    table = {k: torch.cat(v).tolist() for k, v in cols.items()}
    records = []  # in dataset order, whatever order the sampler (length grouping) or the gather gave them
    for i in range(len(table["index"])):
        r = {k: table[k][i] for k in table}
        r["delta"] = r["chosen_logp_mean"] - r["rejected_logp_mean"]
        r["correct"] = r["delta"] > 0
        if reference is not None:
            h = (r["chosen_logp_sum"] - r["rejected_logp_sum"]) - (r["ref_chosen_logp_sum"] - r["ref_rejected_logp_sum"])
            r["reward_margin"] = h
            r["reward_correct"] = h > 0
        records.append(r)
    return sorted(records, key=lambda r: r["index"])


def summarize(records: list[dict]) -> dict:
    n = len(records)
    if n == 0:
        return {"n_pairs": 0, "ranking_accuracy": None}
    mean = lambda key: sum(r[key] for r in records) / n  # noqa: E731
    deltas = sorted(r["delta"] for r in records)
    out = {
        "n_pairs": n,
        "ranking_accuracy": mean("correct"),
        "mean_delta": mean("delta"),
        "median_delta": deltas[n // 2] if n % 2 else 0.5 * (deltas[n // 2 - 1] + deltas[n // 2]),
        "mean_logp_chosen": mean("chosen_logp_mean"),
        "mean_logp_rejected": mean("rejected_logp_mean"),
        "chosen_len_mean": mean("chosen_len"),
        "rejected_len_mean": mean("rejected_len"),
        "accuracy_by_margin_bucket": accuracy_by_margin_bucket(records),
    }
    if "reward_correct" in records[0]:
        out["reward_accuracy"] = mean("reward_correct")
        out["mean_reward_margin"] = mean("reward_margin")
    return out


def accuracy_by_margin_bucket(records: list[dict]) -> list[dict]:
    """Accuracy within buckets of |Δ|: low accuracy in a high bucket means confident mistakes."""
    rows = []
    for lo, hi in zip(MARGIN_BUCKETS[:-1], MARGIN_BUCKETS[1:]):
        inside = [r for r in records if lo <= abs(r["delta"]) < hi]
        if inside:
            rows.append({
                "abs_delta_min": lo,
                "abs_delta_max": None if math.isinf(hi) else hi,
                "n_pairs": len(inside),
                "accuracy": sum(r["correct"] for r in inside) / len(inside),
            })
    return rows


def write_per_pair(records: list[dict], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def format_summary(summary: dict) -> str:
    lines = [f"pairs: {summary['n_pairs']}"]
    if summary["n_pairs"]:
        lines.append(f"ranking accuracy: {summary['ranking_accuracy']:.4f}")
        if "reward_accuracy" in summary:
            lines.append(f"reward accuracy (vs reference): {summary['reward_accuracy']:.4f}")
        lines.append(f"mean Δ (chosen − rejected mean log-prob): {summary['mean_delta']:+.4f}")
        lines.append(
            f"mean completion length: chosen {summary['chosen_len_mean']:.1f}, rejected {summary['rejected_len_mean']:.1f}"
        )
        lines.append("accuracy by |Δ| bucket:")
        for b in summary["accuracy_by_margin_bucket"]:
            hi = "inf" if b["abs_delta_max"] is None else f"{b['abs_delta_max']:g}"
            lines.append(f"  [{b['abs_delta_min']:g}, {hi}): {b['accuracy']:.3f} of {b['n_pairs']}")
    return "\n".join(lines)
