"""`run_online`: the rounds of a semi-online run, one after the other, resumably.

Before anything is written: the settings are built and checked (`config.py`), the folder's state is
settled (a new run, an online run to continue — with the settings it recorded — or one to replace when
asked), and the tokenizer, prompts, eval prompts and reward are loaded. The folder is locked (`run_lock`)
from the first check to the last record. Then each round not yet in rounds.jsonl runs (`rounds.py`) and
gets its line there. Started again, a run continues after its last finished round; `rounds` may grow.

The reference of a reference-based loss is the start model (`ref_refresh: start`) or the round's start
policy (`ref_refresh: round`). Each round trains with a fresh optimizer and learning-rate schedule. With
use_peft one LoRA adapter trains on from round to round on the start model's weights (the model with it
disabled, the reference, is the start model: `ref_refresh: round` is refused).

Under `accelerate launch` / torchrun every process runs these steps; each samples its share of a round's
responses, the main process writes the records and holds the lock, and the round trains as `prefalign train`
does under the launcher (`processes.py`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .. import run_files as rf
from ..errors import ConfigError, PrefalignError
from .config import OnlineSettings, load_online
from .processes import barrier, is_main, rank_and_world
from .records import (
    changed_settings,
    check_folder,
    read_eval_pairs,
    read_rounds,
    record_round,
    remove_online_run,
)
from .rounds import make_pairs, policy_config, sample_round, train_round
from .scoring import JudgeFileReward, Skips, load_reward

log = logging.getLogger(__name__)


def run_online(settings: OnlineSettings | str | Path | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Run (or continue) the online run a recipe and overrides describe; returns its summary:
    {"status": finished | interrupted | awaiting_judge, "output_dir", "rounds": [rounds.jsonl lines], ...}."""
    if not isinstance(settings, OnlineSettings):
        settings = load_online(settings, overrides)  # under a launcher: starts the processes' group (processes.py)
    _refuse_unsupported(settings)
    out = settings.output_dir
    from ..training.run_folder import check_not_an_input, check_writable, holding_lock

    check_not_an_input(out, settings.base)
    check_writable(out)
    with holding_lock(out, "online", settings.base):  # the main process holds the lock; the others learn of it
        return _run_locked(settings, out)


def _refuse_unsupported(settings: OnlineSettings) -> None:
    oc, cfg = settings.online, settings.base
    if oc.generation_backend == "vllm":
        _refuse_vllm(settings)
    if oc.ref_refresh == "round" and cfg.use_peft:
        raise ConfigError("ref_refresh: round cannot be honoured with use_peft: one LoRA adapter trains on across "
                          "the rounds, so the reference (the model with its adapter disabled) is the start model; use "
                          "ref_refresh: start, or train the full model")
    if oc.ref_refresh == "round" and cfg.ref_model_name_or_path:
        raise ConfigError("ref_refresh: round makes each round's start policy the reference, and "
                          "ref_model_name_or_path names another: set one of them")
    if oc.reward == "judge_file" and oc.eval_prompts:
        raise ConfigError("eval_prompts: a judge file scores only the round's samples; the greedy answers to eval "
                          "prompts need a checker or a reward model")
    if not cfg.dataset:
        raise ConfigError("no dataset: set `dataset` (prompts, or pairs whose prompts are used)")
    if not cfg.model_name_or_path:
        raise ConfigError("no model: set `model_name_or_path`")


def _refuse_vllm(settings: OnlineSettings) -> None:
    """What generation_backend: vllm cannot honour, each in one line (vllm_backend.py)."""
    from .vllm_backend import vllm_installed

    cfg = settings.base
    if not vllm_installed():
        raise ConfigError("generation_backend: vllm is not installed (pip install vllm), or use transformers")
    world = max(rank_and_world()[1], int(os.environ.get("WORLD_SIZE") or 1))
    if world > 1:
        raise ConfigError(f"generation_backend: vllm runs in one process (vLLM shards a model across GPUs itself), "
                          f"but this run was started as {world} processes (accelerate launch / torchrun): run "
                          "prefalign online as one process, or use generation_backend: transformers")
    if cfg.use_peft:
        raise ConfigError("generation_backend: vllm loads full model folders, and with use_peft: true each round's "
                          "policy is a LoRA adapter folder: train the full model, or use generation_backend: "
                          "transformers")
    model = Path(os.path.expanduser(str(cfg.model_name_or_path or "")))
    if (model / "adapter_config.json").is_file():
        raise ConfigError(f"generation_backend: vllm loads full model folders, and {cfg.model_name_or_path} is a LoRA "
                          "adapter folder: merge it into its base model (peft's merge_and_unload, then "
                          "save_pretrained), or use generation_backend: transformers")
    if cfg.use_cpu:
        raise ConfigError("generation_backend: vllm runs on the device its build targets (a GPU), not on the CPU "
                          "use_cpu: true asks for: leave use_cpu off, or use generation_backend: transformers")


def _inputs(settings: OnlineSettings) -> list[Path]:
    """Local paths the run reads: never removed by an overwrite."""
    cfg, oc = settings.base, settings.online
    paths = []
    for value in (cfg.dataset, cfg.model_name_or_path, cfg.ref_model_name_or_path, oc.eval_prompts,
                  (oc.reward or "").removeprefix("model:")):
        if value and Path(os.path.expanduser(value)).exists():
            paths.append(Path(os.path.expanduser(value)).resolve())
    return paths


def _load_prompts(settings: OnlineSettings, tokenizer, source: str, limit: int | None = None):
    from ..data.prompts import load_prompts

    cfg = settings.base
    same = source == cfg.dataset
    prompts = load_prompts(source, tokenizer=tokenizer, split=cfg.dataset_split if same else None,
                           config_name=cfg.dataset_config if same else None, columns=cfg.columns if same else None,
                           data_format=cfg.data_format if same else "auto", chat_template=cfg.chat_template,
                           on_bad_row=cfg.on_bad_row)
    if not len(prompts):
        raise PrefalignError(f"{source}: no prompts (skipped: {prompts.skipped or 'none'})")
    if limit is not None:
        prompts.texts, prompts.row_indices = prompts.texts[:limit], prompts.row_indices[:limit]
    return prompts


def _run_locked(settings: OnlineSettings, out: Path) -> dict:
    from ..training.pipeline import load_tokenizer_for

    cfg, oc = settings.base, settings.online
    plan = check_folder(out, overwrite=cfg.overwrite_output_dir)
    recorded_online = oc.as_dict()
    if plan == "continue":
        changes = changed_settings(out, recorded_online, cfg.prefalign_dict())
        if changes:
            listed = "; ".join(f"{k} {v['was']!r} -> {v['now']!r}" for k, v in list(changes.items())[:5])
            raise PrefalignError(f"output_dir {out} holds an online run with other settings ({listed}); run it with "
                                 "its own settings to continue it, replace it with --overwrite_output_dir true, or "
                                 "choose another output_dir")
    # every input is loaded and checked before anything is written
    tokenizer = load_tokenizer_for(cfg)
    prompts = _load_prompts(settings, tokenizer, cfg.dataset)
    eval_prompts = _load_prompts(settings, tokenizer, oc.eval_prompts, oc.max_eval_prompts) if oc.eval_prompts else None
    held_out = read_eval_pairs(settings, tokenizer)
    reward = load_reward(oc.reward, max_length=cfg.max_length, batch_size=cfg.per_device_eval_batch_size,
                         use_cpu=cfg.use_cpu)
    barrier()  # every process has checked the folder and its inputs before the main process writes
    if plan == "overwrite" and is_main():
        removed = remove_online_run(out, _inputs(settings))
        log.warning("overwrite_output_dir: removed the online run that was in %s (%d files and folders)", out,
                    len(removed))
    if plan in ("new", "overwrite") and is_main():
        rf.write_json(out / rf.ONLINE_CONFIG_FILE, {"online": recorded_online, "training": cfg.prefalign_dict()})
    if held_out is not None and is_main():
        rf.replace_jsonl(held_out, out / rf.EVAL_PAIRS_FILE)  # the same rows each time: the settings are the same
    barrier()
    rounds = read_rounds(out)
    start_model = cfg.model_name_or_path
    if eval_prompts is not None and not any(r["round"] == 0 for r in rounds):
        from .evaluation import evaluate_policy

        summary = evaluate_policy(settings, policy_config(settings, start_model), eval_prompts, reward,
                                  rf.round_folder(out, 0) / rf.EVAL_SAMPLES_FILE)
        rounds = _record(out, {"round": 0, "policy": start_model, **summary})
        log.info("round 0 (the start model): %s", _eval_line(summary))
    finished = [r for r in rounds if r["round"] >= 1]
    if len(finished) >= oc.rounds:
        log.info("%s: all %d rounds finished before (rounds.jsonl); raise rounds to run more", out, len(finished))
    read = {"prompts": {"source": prompts.source, "n_prompts": len(prompts), "n_rows": prompts.n_rows,
                        "skipped": prompts.skipped}}
    for number in range(len(finished) + 1, oc.rounds + 1):
        result = _run_round(settings, out, number, rounds, prompts, eval_prompts, reward, start_model)
        if result["status"] != "finished":
            return {**result, "output_dir": str(out), "rounds": rounds, **read}
        rounds = _record(out, result["entry"])
    return {"status": "finished", "output_dir": str(out), "rounds": rounds, **read,
            "final_model": str(out / current_policy(rounds, start_model)) if _trained(rounds) else start_model}


def _record(out: Path, entry: dict) -> list[dict]:
    """The round's line written by the main process; rounds.jsonl as every process then reads it."""
    if is_main():
        record_round(out, entry)
    barrier()
    rounds = read_rounds(out)
    barrier()  # read by all before the main process replaces it again
    return rounds


def _trained(rounds: list[dict]) -> bool:
    return any(r.get("trained") for r in rounds)


def current_policy(rounds: list[dict], start_model: str) -> str:
    """The policy after the finished rounds: the last round that trained saved it (a path in the run folder)."""
    trained = [r for r in rounds if r["round"] >= 1 and r.get("trained")]
    return trained[-1]["policy"] if trained else start_model


def _run_round(settings, out: Path, number: int, rounds: list[dict], prompts, eval_prompts, reward,
               start_model: str) -> dict:
    folder = rf.round_folder(out, number)
    policy_name = current_policy(rounds, start_model)
    policy = str(out / policy_name) if policy_name != start_model else start_model
    t0 = time.time()
    rows, reward_skips = sample_round(settings, number, policy, prompts, reward, folder)
    if isinstance(reward, JudgeFileReward) and all(r["reward"] is None for r in rows):
        path = folder / rf.SAMPLES_FILE
        message = (f"round {number}: fill in the reward of each line of {path} (a number; null leaves the sample "
                   "out), then run the same command again")
        return {"status": "awaiting_judge", "waiting_for": str(path), "message": message}
    if reward_skips.counts and is_main():
        log.warning("round %d: %d of %d samples have no reward: %s", number, sum(reward_skips.counts.values()),
                    len(rows), reward_skips.describe())
    pairs, pair_skips = make_pairs(settings, rows, folder)
    if pair_skips.counts and is_main():
        log.warning("round %d: %d prompts gave no pair: %s", number, sum(v for k, v in pair_skips.counts.items()
                    if k != "identical_responses"), pair_skips.describe())
    sampled = time.time() - t0
    entry = {"round": number, "policy_before": policy_name, "prompts": len({r["prompt_index"] for r in rows}),
             "samples": len(rows)}
    rewards = [r["reward"] for r in rows if r["reward"] is not None]
    entry.update(scored=len(rewards), mean_reward=sum(rewards) / len(rewards) if rewards else None,
                 mean_tokens=sum(r["tokens"] for r in rows) / len(rows), pairs=len(pairs))
    skips = Skips()
    skips.merge(reward_skips)
    skips.merge(pair_skips)
    entry.update(skips=skips.counts, skip_examples=skips.examples)
    if pairs:
        summary = train_round(settings, number, policy, start_model, folder)
        if summary.get("interrupted"):
            return {"status": "interrupted", "round": number, "checkpoint": summary.get("checkpoint"),
                    "message": f"round {number}: training stopped at step {summary['global_step']}; run the same "
                               "command again to continue from its checkpoint"}
        entry.update(trained=True, policy=str((folder / rf.ROUND_TRAIN_FOLDER).relative_to(out)),
                     train_steps=summary.get("global_step"), train_loss=summary.get("train_loss"),
                     train_data_skipped=(summary.get("data") or {}).get("train", {}).get("skipped"))
        if (summary.get("eval") or {}).get("ranking_accuracy") is not None:
            entry["eval_ranking_accuracy"] = summary["eval"]["ranking_accuracy"]
    else:
        log.warning("round %d: no pairs, so nothing to train; the policy stays %s", number, policy_name)
        entry.update(trained=False, policy=policy_name)
    trained_seconds = time.time() - t0 - sampled
    if eval_prompts is not None:
        from .evaluation import evaluate_policy

        after = str(out / entry["policy"]) if entry["trained"] or policy_name != start_model else start_model
        entry.update(evaluate_policy(settings, policy_config(settings, after), eval_prompts, reward,
                                     folder / rf.EVAL_SAMPLES_FILE))
    entry["seconds"] = {"sample_score_pair": round(sampled, 1), "train": round(trained_seconds, 1),
                        "total": round(time.time() - t0, 1)}
    say = log.info if is_main() else log.debug  # one line per round, not one per process
    say("round %d: mean reward %s over %d samples, %d pairs, trained %s%s", number,
        f"{entry['mean_reward']:.4g}" if entry["mean_reward"] is not None else "-", len(rows), len(pairs),
        entry.get("train_steps", 0), f"; {_eval_line(entry)}" if eval_prompts is not None else "")
    return {"status": "finished", "entry": entry}


def _eval_line(summary: dict) -> str:
    mean = summary.get("eval_mean_reward")
    line = f"eval mean reward {mean:.4g}" if mean is not None else "eval: no rewards"
    if "eval_accuracy" in summary:
        lo, hi = summary["eval_accuracy_interval"]
        line += f", exact-answer accuracy {summary['eval_accuracy']:.3f} (95 % {lo:.3f}-{hi:.3f})"
    return line + f" on {summary['eval_prompts']} prompts"
