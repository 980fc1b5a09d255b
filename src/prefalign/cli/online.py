"""`prefalign online RECIPE.yaml [--key value …]`: semi-online preference optimisation — rounds of sampling from
the policy, scoring with a reward, pairing and training (docs/online.md)."""

from __future__ import annotations

import json
import logging
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "online", help="train in rounds on pairs sampled from the policy and ranked by a reward",
        description="Each round samples responses from the current policy, scores them with the reward (a checker "
        "module:function, model:PATH_OR_ID, or judge_file), pairs best against worst and trains on the pairs. "
        "Running the same command again continues after the last finished round.")
    p.usage = "prefalign online [RECIPE.yaml] [--key value ...]"
    p.add_argument("--help-keys", action="store_true", help="list the online keys with their defaults and exit "
                   "(every `prefalign train --help-keys` key works too)")
    p.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from ..online import run_online
    from ..online.config import online_fields
    from ..run_files import AWAITING_JUDGE_EXIT_CODE, INTERRUPTED_EXIT_CODE

    if args.help_keys:
        for name, f in online_fields().items():
            print(f"{name} = {f.default!r}  {f.metadata.get('help', '')}")
        return 0
    tokens = list(args.overrides)
    recipe = tokens.pop(0) if tokens and not tokens[0].startswith("--") else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_online(recipe, tokens)
    from ..online.processes import is_main

    main = is_main()  # under `accelerate launch`, one summary, not one per process
    if main:
        print(json.dumps(summary, default=str) if args.json else summary_table(summary))
    if summary["status"] in ("awaiting_judge", "interrupted"):
        if main:
            print(f"prefalign: {summary['message']}", file=sys.stderr)
        return AWAITING_JUDGE_EXIT_CODE if summary["status"] == "awaiting_judge" else INTERRUPTED_EXIT_CODE
    return 0


def summary_table(summary: dict) -> str:
    """One line per round: mean reward of the samples, pairs, skips, training, and the eval answers' score."""
    lines = ["", f"online run: {summary['output_dir']} ({summary['status']})",
             f"  {'round':>5} {'mean reward':>11} {'samples':>7} {'pairs':>5} {'steps':>5} {'loss':>7}  "
             f"{'eval reward':>11} {'eval acc':>8}  skips"]
    def num(r, key, fmt):
        return format(r[key], fmt) if isinstance(r.get(key), int | float) else "-"

    for r in summary["rounds"]:
        skips = ", ".join(f"{k} {v}" for k, v in (r.get("skips") or {}).items()) or "-"
        lines.append(f"  {r['round']:>5} {num(r, 'mean_reward', '.4f'):>11} {num(r, 'samples', 'd'):>7} "
                     f"{num(r, 'pairs', 'd'):>5} {num(r, 'train_steps', 'd'):>5} {num(r, 'train_loss', '.4f'):>7}  "
                     f"{num(r, 'eval_mean_reward', '.4f'):>11} {num(r, 'eval_accuracy', '.3f'):>8}  {skips}")
    read = summary.get("prompts")
    if read:
        skipped = ", ".join(f"{k} {v}" for k, v in read["skipped"].items()) or "none"
        lines.append(f"  prompts: {read['n_prompts']} from {read['n_rows']} rows of {read['source']}; skipped: {skipped}")
    if summary.get("final_model"):
        lines.append(f"  final model: {summary['final_model']}")
    return "\n".join(lines)
