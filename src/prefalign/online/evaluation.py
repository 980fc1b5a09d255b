"""What the model writes, measured: greedy answers to held-out prompts, scored with a reward.

Inside an online run (`evaluate_policy`): the answers to `eval_prompts` after every round, and of the start
model (round 0), so the rounds' effect is read off rounds.jsonl. Outside one (`evaluate_answers`, `prefalign
eval --generate`): the answers of any model or run folder to the prompts of a dataset.

Both report the mean reward of the answers that got one, and — with the checkable task's checker
(`prefalign.online.rewards:exact_answer`) — exact-answer accuracy: the share of all prompts answered exactly (an
answer without a reward counts as wrong), with its 95 % Wilson interval. Both answer through `greedy_answers`,
score through `score_answers` and summarise through `answers_summary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import run_files as rf
from ..errors import ConfigError, PrefalignError
from .processes import gather, is_main
from .sampling import free_memory, generate_share, load_for_generation
from .scoring import JUDGE_FILE, Skips

EXACT_ANSWER = "prefalign.online.rewards:exact_answer"
# what evaluate_policy reports, each prefixed with eval_ in rounds.jsonl (in this order)
POLICY_KEYS = ("prompts", "scored", "mean_reward", "mean_tokens", "accuracy", "accuracy_interval")


def greedy_answers(model, tokenizer, pad: int, prompts, *, max_new_tokens: int, batch_size: int,
                   bf16: bool) -> list[dict]:
    """This process's share of the greedy answers of `model` to `prompts` (a data.prompts.Prompts), one row per
    prompt: prompt_index, row_index, prompt, response, tokens, stopped_at_eos (all of them on one process)."""
    answers = generate_share(model, tokenizer, prompts.texts, None, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, bf16=bf16, pad_id=pad)
    return _answer_rows(prompts, answers)


def _answer_rows(prompts, answers: dict) -> list[dict]:
    return [{"prompt_index": i, "row_index": prompts.row_indices[i], "prompt": prompts.texts[i], **a}
            for (i, _), a in answers.items()]


def score_answers(local: list[dict], reward) -> list[dict]:
    """`greedy_answers`' rows scored with `reward` (reward, skip, and _detail: what the reward did instead),
    gathered from every process, in prompt order (the policy may be freed before: a reward model loads
    nothing more)."""
    scores = reward.score([r["prompt"] for r in local], [r["response"] for r in local])
    for row, score in zip(local, scores):
        row.update(reward=score.reward, skip=score.skip, _detail=score.detail)
    return sorted(gather(local), key=lambda row: row["prompt_index"])  # each process answered its share


def answers_summary(rows: list[dict], reward_spec: str) -> tuple[dict, Skips]:
    """{prompts, scored, mean_reward, mean_tokens[, accuracy, accuracy_interval]} of answer rows, and the rows'
    skips by reason (with the first example of each). Accuracy (exact_answer only) is over all the rows."""
    from ..stats import wilson_interval

    rewards = [r["reward"] for r in rows if r["reward"] is not None]
    summary = {"prompts": len(rows), "scored": len(rewards),
               "mean_reward": sum(rewards) / len(rewards) if rewards else None,
               "mean_tokens": sum(r["tokens"] for r in rows) / max(1, len(rows))}
    if reward_spec == EXACT_ANSWER and rows:
        correct = sum(1 for r in rewards if r == 1.0)
        lo, hi = wilson_interval(correct, len(rows))
        summary.update(accuracy=correct / len(rows), accuracy_interval=[lo, hi])
    skips = Skips()
    for r in rows:
        if r["skip"]:
            skips.add(r["skip"], f"prompt {r['prompt_index']}: {r.get('_detail', '')}")
    return summary, skips


def _without_detail(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_detail"} for r in rows]


def evaluate_policy(settings, policy_cfg, prompts, reward, path: Path) -> dict:
    """Greedy answers of the policy `policy_cfg` loads, scored and written to `path`; their summary."""
    oc = settings.online
    if oc.generation_backend == "vllm":  # one process (run.py refuses several); the engine is freed when it returns
        from .vllm_backend import generate_share as vllm_share

        local = _answer_rows(prompts, vllm_share(policy_cfg, prompts.texts, None, max_new_tokens=oc.max_new_tokens))
    else:
        model, tokenizer, pad = load_for_generation(policy_cfg)
        local = greedy_answers(model, tokenizer, pad, prompts, max_new_tokens=oc.max_new_tokens,
                               batch_size=oc.generation_batch_size, bf16=bool(policy_cfg.bf16))
        del model  # before a reward model scores: it may need the memory
        free_memory()
    rows = _without_detail(score_answers(local, reward))
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        rf.replace_jsonl(rows, path)
    summary, _ = answers_summary(rows, reward.spec)
    return {f"eval_{k}": summary[k] for k in POLICY_KEYS if k in summary}


# -- outside an online run ------------------------------------------------------------------------------------

@dataclass
class AnswerJob:
    """What `evaluate_answers` has loaded and checked before the policy's weights load: the reward, the
    tokenizer and the prompts (`prompts.kind` says whether the dataset held pairs), and the settings."""

    model: str
    dataset: str
    reward: object
    tokenizer: object
    prompts: object
    settings: dict  # evaluate.run_settings of the model: a run folder's own where not given
    max_new_tokens: int
    batch_size: int
    trust_remote_code: bool
    use_cpu: bool
    n_available: int  # prompts in the dataset before `limit`

    def run(self) -> tuple[dict, list[dict]]:
        """Load the model, answer greedily and score: (summary, rows)."""
        import torch

        from ..modeling import usable_pad_id
        from ..models import load_model

        st = self.settings
        device = torch.device("cuda" if torch.cuda.is_available() and not self.use_cpu else "cpu")
        policy = load_model(self.model, trust_remote_code=self.trust_remote_code, dtype=st["dtype"],
                            attn_implementation=st["attn_implementation"]).to(device)
        local = greedy_answers(policy, self.tokenizer, usable_pad_id(policy, self.tokenizer), self.prompts,
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, bf16=bool(st["bf16"]))
        del policy  # before a reward model scores: it may need the memory
        free_memory()
        rows = score_answers(local, self.reward)
        core, skips = answers_summary(rows, self.reward.spec)
        summary = {"model": self.model, "dataset": self.dataset, "reward": self.reward.spec,
                   **{k: core[k] for k in ("prompts", "scored", "mean_reward", "mean_tokens")},
                   "skipped": skips.counts, "skip_examples": skips.examples,
                   **{k: core[k] for k in ("accuracy", "accuracy_interval") if k in core},
                   "data": {"kind": self.prompts.kind, "n_rows": self.prompts.n_rows,
                            "prompts_available": self.n_available, "skipped": self.prompts.skipped},
                   "max_new_tokens": self.max_new_tokens, "bf16": bool(st["bf16"])}
        return summary, _without_detail(rows)


def prepare_answers(model: str, dataset: str, reward: str, *, split: str | None = None,
                    dataset_config: str | None = None, columns: str | None = None, data_format: str | None = None,
                    chat_template: str | None = None, limit: int | None = None, max_new_tokens: int = 128,
                    batch_size: int = 16, bf16: bool | None = None, trust_remote_code: bool = False,
                    use_cpu: bool = False) -> AnswerJob:
    """Everything `evaluate_answers` needs but the policy's weights, checked: the counts, the reward (loaded;
    `judge_file` refused), the tokenizer (the model's path exists) and the prompts (readable, not none).
    `prefalign eval --generate` calls this before its ranking part, so a mistake stops it before any work."""
    from ..data.prompts import load_prompts
    from ..evaluate import run_settings
    from ..models import load_tokenizer
    from .scoring import load_reward

    for name, value in (("--max-new-tokens", max_new_tokens), ("--generation-batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit {limit}: must be at least 1 (leave it out to answer every prompt)")
    if not isinstance(reward, str) or not reward.strip():
        raise ConfigError("--reward: name the reward: module:function (a checker), model:PATH_OR_ID (a reward "
                          "model), e.g. prefalign.online.rewards:exact_answer")
    if reward.strip() == JUDGE_FILE:
        raise ConfigError(f"--reward {JUDGE_FILE}: a judge file holds rewards for the samples an online round "
                          "writes; answers measured outside a run need a checker (module:function) or a reward "
                          "model (model:PATH_OR_ID)")
    # a run folder's own data reading and precision where not given (None); "auto" detects the format
    st = run_settings(model, {"columns": columns, "chat_template": chat_template, "bf16": bf16,
                              "data_format": data_format})
    scorer = load_reward(reward, batch_size=batch_size, use_cpu=use_cpu)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    prompts = load_prompts(dataset, tokenizer=tokenizer, split=split, config_name=dataset_config,
                           columns=st["columns"], data_format=st["data_format"], chat_template=st["chat_template"])
    if not len(prompts):
        skipped = ", ".join(f"{k} {v}" for k, v in prompts.skipped.items()) or "no rows"
        raise PrefalignError(f"{dataset}: no prompts to answer ({skipped})")
    available = len(prompts)
    if limit is not None:
        prompts.texts, prompts.row_indices = prompts.texts[:limit], prompts.row_indices[:limit]
    return AnswerJob(model=model, dataset=dataset, reward=scorer, tokenizer=tokenizer, prompts=prompts, settings=st,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, trust_remote_code=trust_remote_code,
                     use_cpu=use_cpu, n_available=available)


def evaluate_answers(model: str, dataset: str, reward: str, *, split: str | None = None,
                     dataset_config: str | None = None, columns: str | None = None, data_format: str | None = None,
                     chat_template: str | None = None, limit: int | None = None, max_new_tokens: int = 128,
                     batch_size: int = 16, bf16: bool | None = None, trust_remote_code: bool = False,
                     use_cpu: bool = False) -> tuple[dict, list[dict]]:
    """Greedy answers of `model` to the first `limit` prompts of `dataset`, scored with `reward`; one process.

    `model`: a hub id, a local folder, `smollm2-135m-instruct`, or a prefalign run folder (a LoRA adapter folder
    too), whose own columns, data_format, chat_template, bf16, dtype and attn_implementation apply where not
    given (None: "not given"; `data_format="auto"` detects the format whatever the run's), as `prefalign eval`
    scores a run.
    `dataset`: prompts, or pairs whose distinct prompts are used, read as `prefalign online` reads them.
    `reward`: `module:function` or `model:PATH_OR_ID` (`judge_file` is refused: it holds rewards for the
    samples of an online round). Everything is loaded and checked before anything is generated.

    Returns (summary, rows). rows: one per prompt in prompt order, {prompt_index, row_index, prompt, response,
    tokens, stopped_at_eos, reward, skip}. summary: model, dataset, reward, prompts, scored, mean_reward (of the
    answers with a reward), mean_tokens, skipped (answers without a reward, by reason) and skip_examples; with
    `prefalign.online.rewards:exact_answer` accuracy (the share of all prompts answered exactly; no reward
    counts as wrong) and accuracy_interval [lo, hi] (Wilson 95 %); data (how the dataset was read),
    max_new_tokens and bf16."""
    return prepare_answers(model, dataset, reward, split=split, dataset_config=dataset_config, columns=columns,
                           data_format=data_format, chat_template=chat_template, limit=limit,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16,
                           trust_remote_code=trust_remote_code, use_cpu=use_cpu).run()


def format_answers(summary: dict) -> str:
    """The answers summary as `prefalign eval --generate` prints it."""
    mean = summary["mean_reward"]
    lines = [f"answers (greedy, at most {summary['max_new_tokens']} new tokens): {summary['prompts']} prompts, "
             f"reward {summary['reward']}",
             f"mean reward: {mean:.4f} over {summary['scored']} answers" if mean is not None
             else "mean reward: - (no answer got a reward)",
             f"mean answer length: {summary['mean_tokens']:.1f} tokens"]
    if "accuracy" in summary:
        lo, hi = summary["accuracy_interval"]
        lines.append(f"exact-answer accuracy: {summary['accuracy']:.4f} (95 % {lo:.3f}-{hi:.3f})")
    if summary["skipped"]:
        lines.append("no reward: " + "; ".join(f"{k} {n} (first: {summary['skip_examples'][k]})"
                                                for k, n in summary["skipped"].items()))
    return "\n".join(lines)
