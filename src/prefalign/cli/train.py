"""`prefalign train [RECIPE.yaml] [--key value …]`: any PreferenceConfig field can be set either way."""

from __future__ import annotations

import json
import logging
import sys

from ..run_files import INTERRUPTED_EXIT_CODE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on preference pairs",
        description="Train with a YAML recipe and/or --key value overrides (any TrainingArguments or prefalign key).",
    )
    p.usage = "prefalign train [RECIPE.yaml] [--key value ...]"
    p.add_argument("--help-keys", action="store_true", help="list every config key with its default and exit")
    # The recipe and the --key value overrides are taken from the unparsed arguments (cli/__init__.main).
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from ..config import config_fields, load_config
    from ..training.pipeline import train

    if args.help_keys:
        for name, f in sorted(config_fields().items()):
            doc = f.metadata.get("help", "").split("\n")[0]
            print(f"{name} = {f.default!r}  {doc[:100]}")
        return 0
    tokens = list(args.overrides)
    recipe = tokens.pop(0) if tokens and not tokens[0].startswith("--") else None
    overrides = tokens
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(recipe, overrides)
    summary = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one summary, not one per process
        print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2, default=str))
    if summary.get("interrupted"):
        print(f"prefalign: interrupted at step {summary['global_step']}; {summary['checkpoint']} holds the run: "
              "continue with --resume_from_checkpoint latest", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE  # a scheduler can tell a stopped run from a finished one
    return 0
