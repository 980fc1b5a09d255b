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
    p.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    # The recipe and the --key value overrides are taken from the unparsed arguments (cli/__init__.main).
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from ..config import config_fields, load_config
    from ..training.pipeline import train

    if args.help_keys:
        for name, f in sorted(config_fields().items()):
            doc = f.metadata.get("help", "").split("\n")[0]
            print(f"{name} = {f.default!r}  {doc[:100]}")
        print(loss_hyperparameters())
        return 0
    tokens = list(args.overrides)
    recipe = tokens.pop(0) if tokens and not tokens[0].startswith("--") else None
    overrides = tokens
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(recipe, overrides)
    summary = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one summary, not one per process
        if args.json:
            print(json.dumps(summary, default=str))
        else:
            print(summary_table(summary))
    if summary.get("interrupted"):
        print(f"prefalign: interrupted at step {summary['global_step']}; {summary['checkpoint']} holds the run: "
              "continue with --resume_from_checkpoint latest", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE  # a scheduler can tell a stopped run from a finished one
    return 0


def loss_hyperparameters() -> str:
    """Each loss's hyperparameters with its own defaults (what a key left unset, None above, means)."""
    from ..config import HPARAM_KEYS
    from ..losses import LOSSES

    lines = ["", "loss hyperparameters (a key left unset takes the loss's default; docs/losses.md):"]
    for name, spec in sorted(LOSSES.items()):
        keys = ", ".join(f"{HPARAM_KEYS.get(k, k)}={v!r}" for k, v in spec.defaults.items() if k != "exponent_cap")
        needs = "reference" if spec.needs_reference else "reference-free"
        lines.append(f"  {name:13s} {keys}  [{needs}, {'mean' if spec.length_normalized else 'summed'} log-probs"
                     + (f", reads {', '.join(spec.side_inputs)}" if spec.side_inputs else "") + "]")
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    """The end of a run for a person: steps, time, loss, ranking accuracy with its 95 % interval, skips, files."""
    from ..stats import wilson_interval

    lines = ["", f"run: {summary['output_dir']}",
             f"  steps {summary['global_step']} in {summary['train_seconds']:.0f} s, mean training loss "
             f"{summary['train_loss']:.4f}" + ("  (interrupted)" if summary.get("interrupted") else "")]
    for name, ev in (("before training", summary.get("eval_before")), ("held-out", summary.get("eval"))):
        if ev and ev.get("n_pairs"):
            n, acc = ev["n_pairs"], ev["ranking_accuracy"]
            lo, hi = wilson_interval(round(acc * n), n)
            lines.append(f"  {name:16s} ranking accuracy {acc:.3f} (95 % {lo:.3f}-{hi:.3f}, {n} pairs), "
                         f"mean Δ {ev['mean_delta']:+.3f}")
    for split, report in (summary.get("data") or {}).items():
        skipped = ", ".join(f"{k} {v}" for k, v in report.get("skipped", {}).items()) or "none"
        lines.append(f"  {split} data: {report['n_pairs']} pairs from {report['n_rows']} rows ({report['format']}); "
                     f"skipped: {skipped}")
    lines.append("  files: metrics.jsonl, train_summary.json" + (", eval_results.json, eval_per_pair.jsonl"
                                                                 if summary.get("eval") else "")
                 + (f"; checkpoint {summary['checkpoint']}" if summary.get("checkpoint") else "; the model"))
    return "\n".join(lines)
