"""What the model writes, measured: greedy answers to held-out prompts (`eval_prompts`), scored with the run's
reward — after every round, and for the start model (round 0), so the rounds' effect is read off rounds.jsonl.

Reports the mean reward of the answers that got one, and — with the checkable task's checker
(`prefalign.online.rewards:exact_answer`) — exact-answer accuracy: the share of all eval prompts answered
exactly (an answer without a reward counts as wrong), with its 95 % Wilson interval.
"""

from __future__ import annotations

from pathlib import Path

from .. import run_files as rf
from .processes import gather, is_main
from .sampling import free, generate_share, load_for_generation

EXACT_ANSWER = "prefalign.online.rewards:exact_answer"


def evaluate_policy(settings, policy_cfg, prompts, reward, path: Path) -> dict:
    """Greedy answers of the policy `policy_cfg` loads, scored and written to `path`; their summary."""
    from ..stats import wilson_interval

    oc = settings.online
    model, tokenizer, pad = load_for_generation(policy_cfg)
    answers = generate_share(model, tokenizer, prompts.texts, None, max_new_tokens=oc.max_new_tokens,
                             batch_size=oc.generation_batch_size, bf16=bool(policy_cfg.bf16), pad_id=pad)
    free(model)
    local = [{"prompt_index": i, "row_index": prompts.row_indices[i], "prompt": prompts.texts[i], **a}
             for (i, _), a in answers.items()]
    scores = reward.score([r["prompt"] for r in local], [r["response"] for r in local])
    for row, score in zip(local, scores):
        row.update(reward=score.reward, skip=score.skip)
    rows = sorted(gather(local), key=lambda row: row["prompt_index"])  # each process answered its share
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        rf.replace_jsonl(rows, path)
    rewards = [r["reward"] for r in rows if r["reward"] is not None]
    summary = {"eval_prompts": len(rows), "eval_scored": len(rewards),
               "eval_mean_reward": sum(rewards) / len(rewards) if rewards else None,
               "eval_mean_tokens": sum(r["tokens"] for r in rows) / max(1, len(rows))}
    if reward.spec == EXACT_ANSWER and rows:
        correct = sum(1 for r in rewards if r == 1.0)
        lo, hi = wilson_interval(correct, len(rows))
        summary.update(eval_accuracy=correct / len(rows), eval_accuracy_interval=[lo, hi])
    return summary
