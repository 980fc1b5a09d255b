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
