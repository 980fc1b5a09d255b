"""One round of an online run: sample → score → pair → train, each stage's record written when it is done.

    round-N/samples.jsonl   k responses per prompt from the round's start policy, with their rewards
    round-N/pairs.jsonl     the pairs built from them (`pairs.py`), the round's training data
    round-N/train/          a `prefalign train` run on those pairs, steps_per_round steps, from the round's start
                            policy; its saved model is the next round's policy (with use_peft: its LoRA adapter,
                            on the start model, which the next round trains on)

A stage whose file exists was done before (by a run that was stopped): it is read back, not done again, so a
round started again goes on where it stopped (`records.py`). Training continues from the round's last
checkpoint, or restarts when it stopped before one.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import run_files as rf
from .pairs import pairs_of_prompt
from .processes import barrier, gather, is_main, rank_and_world
from .records import judged_rewards, read_samples, sample_check
from .sampling import free_memory, generate_share, load_for_generation, sample_seed
from .scoring import JudgeFileReward, Skips

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    status: str  # "finished", "interrupted" (training stopped by SIGTERM), "awaiting_judge"
    entry: dict = field(default_factory=dict)  # the round's rounds.jsonl line, when finished
    waiting_for: Path | None = None


def round_prompts(n_prompts: int, per_round: int | None, seed: int, round_number: int) -> list[int]:
    """The prompts a round samples: all, or `per_round` taken in turn from one seeded shuffle (every prompt
    is used once before any is used again)."""
    if per_round is None or per_round >= n_prompts:
        return list(range(n_prompts))
    order = list(range(n_prompts))
    random.Random(f"prefalign-online/prompts/{seed}").shuffle(order)
    start = (round_number - 1) * per_round
    return [order[(start + i) % n_prompts] for i in range(per_round)]


def policy_config(settings, policy: str):
    """The config a policy is loaded with for sampling (the training keys, the policy as the model)."""
    return settings.training_config(model_name_or_path=policy, **_later_round_keys(settings, policy))


def _later_round_keys(settings, policy: str) -> dict:
    # a later round's policy is a folder this run saved: the start model's hub revision does not apply to it
    return {} if policy == settings.base.model_name_or_path else {"model_revision": None}


def sample_round(settings, round_number: int, policy: str, prompts, reward, folder: Path) -> tuple[list[dict], Skips]:
    """Sample, score and write samples.jsonl; or read it back when an earlier run wrote it."""
    oc, cfg = settings.online, settings.base
    chosen = round_prompts(len(prompts), oc.prompts_per_round, cfg.seed, round_number)
    expected = [(i, j) for i in chosen for j in range(oc.samples_per_prompt)]
    path = folder / rf.SAMPLES_FILE
    if path.is_file():
        rows = read_samples(path, expected)
        if isinstance(reward, JudgeFileReward):
            _, skips = judged_rewards(path, rows)
        else:
            skips = Skips()
            for lineno, row in enumerate(rows, 1):
                if row.get("skip"):
                    skips.add(row["skip"], f"{path}:{lineno}: {row.get('skip_detail', '')}")
        return rows, skips
    t0 = time.time()
    if oc.generation_backend == "vllm":  # one process (run.py refuses several); the engine is freed when it returns
        from . import vllm_backend

        seeds = _round_seeds(cfg.seed, round_number, prompts, chosen, oc.samples_per_prompt)
        responses = vllm_backend.generate_share(policy_config(settings, policy), [prompts.texts[i] for i in chosen],
                                                seeds, max_new_tokens=oc.max_new_tokens, temperature=oc.temperature,
                                                top_p=oc.top_p)
    else:
        model, tokenizer, pad = load_for_generation(policy_config(settings, policy))
        seeds = _round_seeds(cfg.seed, round_number, prompts, chosen, oc.samples_per_prompt)
        # each process samples and scores its share; the shares, gathered, are what one process samples
        responses = generate_share(model, tokenizer, [prompts.texts[i] for i in chosen], seeds,
                                   max_new_tokens=oc.max_new_tokens, batch_size=oc.generation_batch_size,
                                   temperature=oc.temperature, top_p=oc.top_p, bf16=bool(cfg.bf16), pad_id=pad)
        del model  # before the reward scores: a reward model may need the memory
        free_memory()
    local = []
    for (position, j), r in responses.items():
        i = chosen[position]
        prompt = prompts.texts[i]
        local.append({"prompt_index": i, "row_index": prompts.row_indices[i], "sample": j,
                      "seed": seeds[position][j], "prompt": prompt, "response": r["response"],
                      "tokens": r["tokens"], "stopped_at_eos": r["stopped_at_eos"], "reward": None, "skip": None,
                      "check": sample_check(prompt, r["response"]), "_at": (position, j)})
    sampled = time.time() - t0
    if not isinstance(reward, JudgeFileReward):
        scores = reward.score([r["prompt"] for r in local], [r["response"] for r in local])
        for row, score in zip(local, scores):
            row["reward"], row["skip"] = score.reward, score.skip
            if score.skip:
                row["skip_detail"] = score.detail
    rows = sorted(gather(local), key=lambda row: row.pop("_at"))
    skips = Skips()
    for lineno, row in enumerate(rows, 1):
        if row["skip"]:
            skips.add(row["skip"], f"{path}:{lineno}: {row['skip_detail']}")
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        rf.replace_jsonl(rows, path)
        world = rank_and_world()[1]
        log.info("round %d: %d responses to %d prompts sampled in %.0f s, scored in %.0f s%s", round_number,
                 len(rows), len(chosen), sampled, time.time() - t0 - sampled,
                 f" (by {world} processes, each its share)" if world > 1 else "")
    barrier()  # samples.jsonl is written before any process goes on
    return rows, skips


def _round_seeds(seed: int, round_number: int, prompts, chosen: list[int], k: int) -> list[list[int]]:
    """The seeds of the round's responses: per chosen prompt, one per sample (`sample_seed`)."""
    return [[sample_seed(seed, round_number, prompts.row_indices[i], j) for j in range(k)] for i in chosen]


def make_pairs(settings, rows: list[dict], folder: Path) -> tuple[list[dict], Skips]:
    """pairs.jsonl from the scored samples (the same samples always give the same pairs); a response cut off
    by max_new_tokens loses missing_eos_penalty of its reward for the pairing."""
    oc = settings.online
    skips = Skips()
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    pairs = []
    if oc.missing_eos_penalty:
        by_prompt = {i: [{**s, "reward": s["reward"] - oc.missing_eos_penalty
                          if s["reward"] is not None and not s["stopped_at_eos"] else s["reward"]} for s in samples]
                     for i, samples in by_prompt.items()}
    for prompt_index, samples in by_prompt.items():
        where = f"prompt {prompt_index} (row {samples[0]['row_index'] + 1})"
        for pair in pairs_of_prompt(samples, oc.pairing, oc.pair_margin, skips, where):
            pairs.append({"prompt_index": prompt_index, "prompt": samples[0]["prompt"], **pair})
    path = folder / rf.PAIRS_FILE
    exists = path.is_file()
    barrier()  # every process has looked before the main process writes
    if not exists and is_main():  # written once: a record the round's training run reads
        rf.replace_jsonl(pairs, path)
    barrier()
    return pairs, skips


def train_round(settings, round_number: int, policy: str, start_model: str, folder: Path) -> dict:
    """The round's `prefalign train` run on pairs.jsonl; its summary (read back when it finished before)."""
    from ..training.pipeline import train
    from ..training.run_folder import folder_run

    out = folder / rf.ROUND_TRAIN_FOLDER
    done = folder_run(out)
    if done.finished:
        return done.summary
    oc = settings.online
    reference = None
    if oc.ref_refresh == "start" and settings.base.needs_reference:
        reference = settings.base.ref_model_name_or_path
        if reference is None and policy != start_model and settings.base.reference_mode() != "adapter":
            # with LoRA (reference: adapter) the adapter continues from round to round on the start model's
            # weights, so the model with its adapter disabled is the start model already: nothing to load
            reference = start_model
    held_out = folder.parent / rf.EVAL_PAIRS_FILE  # eval_dataset as the user's data keys read it (records.py)
    eval_keys = {"eval_dataset": str(held_out), "eval_split": None} if settings.base.eval_dataset else {}
    cfg = settings.training_config(
        model_name_or_path=policy, output_dir=str(out), dataset=str(folder / rf.PAIRS_FILE), data_format="explicit",
        columns=None, dataset_split=None, dataset_config=None, chat_template=None, winner_values=None, **eval_keys,
        ref_model_name_or_path=reference, overwrite_output_dir=False,
        resume_from_checkpoint="latest" if done.checkpoints else None, **_later_round_keys(settings, policy))
    summary = train(cfg)
    barrier()  # the main process has written the saved model's last files (tokenizer, records) before any loads it
    return summary
