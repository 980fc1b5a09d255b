"""What the model writes, measured: greedy answers to held-out prompts (`eval_prompts`), scored with the run's
reward — after every round, and for the start model (round 0), so the rounds' effect is read off rounds.jsonl.

Reports the mean reward of the answers that got one, and — with the checkable task's checker
(`prefalign.online.rewards:exact_answer`) — exact-answer accuracy: the share of all eval prompts answered
exactly (an answer without a reward counts as wrong), with its 95 % Wilson interval.
"""

from __future__ import annotations

from pathlib import Path

from .. import run_files as rf
from .sampling import free, generate_responses, load_for_generation

EXACT_ANSWER = "prefalign.online.rewards:exact_answer"


def evaluate_policy(settings, policy_cfg, prompts, reward, path: Path) -> dict:
    """Greedy answers of the policy `policy_cfg` loads, scored and written to `path`; their summary."""
    from ..stats import wilson_interval

    oc = settings.online
    model, tokenizer, pad = load_for_generation(policy_cfg)
    answers = generate_responses(model, tokenizer, prompts.texts, None, max_new_tokens=oc.max_new_tokens,
                                 batch_size=oc.generation_batch_size, bf16=bool(policy_cfg.bf16), pad_id=pad)
    free(model)
    answers = [a[0] for a in answers]
    scores = reward.score(prompts.texts, [a["response"] for a in answers])
    rows = [{"prompt_index": i, "row_index": prompts.row_indices[i], "prompt": prompts.texts[i], **a,
             "reward": s.reward, "skip": s.skip} for i, (a, s) in enumerate(zip(answers, scores))]
    path.parent.mkdir(parents=True, exist_ok=True)
    rf.replace_jsonl(rows, path)
    rewards = [s.reward for s in scores if s.reward is not None]
    summary = {"eval_prompts": len(rows), "eval_scored": len(rewards),
               "eval_mean_reward": sum(rewards) / len(rewards) if rewards else None,
               "eval_mean_tokens": sum(a["tokens"] for a in answers) / max(1, len(answers))}
    if reward.spec == EXACT_ANSWER and rows:
        correct = sum(1 for r in rewards if r == 1.0)
        lo, hi = wilson_interval(correct, len(rows))
        summary.update(eval_accuracy=correct / len(rows), eval_accuracy_interval=[lo, hi])
    return summary
