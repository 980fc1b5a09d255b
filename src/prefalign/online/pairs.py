"""From one prompt's scored responses to preference pairs.

best_vs_worst      the highest-rewarded response against the lowest (the first sampled wins a tie for either
                   place), when their rewards differ by more than pair_margin: one pair per prompt, as
                   semi-online DPO (Lanchantin et al. 2025) builds them.
all_above_margin   every two responses whose rewards differ by more than pair_margin, the better one chosen.

A prompt that gives no pair is a counted skip: `too_few_rewards` (fewer than two responses have a reward),
`tied` (all rewards equal), `within_margin` (they differ, by no more than pair_margin). Two responses with
the same text are never paired (`identical_responses` counts the pairs left out).
"""

from __future__ import annotations

from .scoring import Skips


def pairs_of_prompt(samples: list[dict], pairing: str, margin: float, skips: Skips, where: str) -> list[dict]:
    """`samples`: one prompt's records ({"sample", "response", "reward"}, reward None when it has none)."""
    scored = [s for s in samples if s["reward"] is not None]
    if len(scored) < 2:
        skips.add("too_few_rewards", f"{where}: {len(scored)} of {len(samples)} responses have a reward")
        return []
    rewards = [s["reward"] for s in scored]
    if max(rewards) == min(rewards):
        skips.add("tied", f"{where}: all {len(scored)} rewards are {rewards[0]:g}")
        return []
    if max(rewards) - min(rewards) <= margin:
        skips.add("within_margin", f"{where}: rewards {min(rewards):g}..{max(rewards):g}, pair_margin {margin:g}")
        return []
    if pairing == "best_vs_worst":
        best = max(scored, key=lambda s: s["reward"])  # max/min keep the first of equals: the first sampled
        worst = min(scored, key=lambda s: s["reward"])
        candidates = [(best, worst)]
    else:
        candidates = [(a, b) for a in scored for b in scored if a["reward"] - b["reward"] > margin]
    pairs = []
    for chosen, rejected in candidates:
        if chosen["response"] == rejected["response"]:
            skips.add("identical_responses", f"{where}: samples {chosen['sample']} and {rejected['sample']}")
            continue
        pairs.append({"chosen": chosen["response"], "rejected": rejected["response"],
                      "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"],
                      "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"]})
    return pairs
