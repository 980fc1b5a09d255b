"""`prefalign data inspect DATASET`: the detected format, rows read, pairs kept, skips by reason and, with a
tokenizer, token-length percentiles to choose max_length from."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="look at preference data")
    commands = data.add_subparsers(dest="data_command", required=True)
    parser = commands.add_parser(
        "inspect",
        help="format, counts, skipped pairs and token lengths of a dataset",
        description=__doc__.replace("\n", " "),
    )
    parser.add_argument("dataset", help="hub id, or a .json/.jsonl/.jsonl.gz/.parquet/.csv file or a folder of them")
    parser.add_argument("--split", help="split to read (hub datasets; local files have only 'train')")
    parser.add_argument("--config-name", help="hub dataset configuration")
    parser.add_argument("--columns", help="map other column names, e.g. prompt=question,chosen=good,rejected=bad, "
                        "or prompt=input,response_a=output_1,response_b=output_2,winner=label (judged data)")
    parser.add_argument("--winner-values", help="judged data: the verdict's value for each response, e.g. a=0,b=1")
    parser.add_argument(
        "--format", default="auto", choices=("auto", "explicit", "implicit", "conversational", "judged"), help="row format"
    )
    parser.add_argument("--tokenizer", help="tokenizer path or hub id: adds token-length percentiles")
    parser.add_argument("--chat-template", help="jinja file or text, for a tokenizer without a chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
    task = commands.add_parser(
        "task", help="write the demo's checkable task (train.jsonl, test.jsonl), optionally with flipped labels",
        description="The demo's generated task: correct vs plausibly wrong answers to unit-conversion, rounding, "
        "decimal-comparison and doubling questions; held-out numbers never appear in training.")
    task.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    task.add_argument("--n-train", type=int, default=400)
    task.add_argument("--n-test", type=int, default=200)
    task.add_argument("--seed", type=int, default=0)
    task.add_argument("--flip", type=float, default=0.0, help="fraction of training pairs with swapped labels")
    task.set_defaults(func=run_task)


def run_task(args: argparse.Namespace) -> int:
    from ..demo_task import write_demo_dataset
    from ..errors import ConfigError

    if not 0 <= args.flip <= 1 or args.n_train < 1 or args.n_test < 1:
        raise ConfigError("--flip must be in [0, 1] and --n-train, --n-test at least 1")
    train, test = write_demo_dataset(args.out, args.n_train, args.n_test, seed=args.seed, flip=args.flip)
    print(f"wrote {train} ({args.n_train} pairs, {round(args.flip * args.n_train)} flipped) and {test} "
          f"({args.n_test} pairs)")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..data.inspect import format_report, inspect_dataset

    report = inspect_dataset(
        args.dataset,
        tokenizer_path=args.tokenizer,
        split=args.split,
        config_name=args.config_name,
        columns=args.columns,
        data_format=args.format,
        chat_template=args.chat_template,
        winner_values=args.winner_values,
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 0
