"""`prefalign data inspect DATASET`: the detected format, rows read, pairs kept, skips by reason and, with a
tokenizer, token-length percentiles to choose max_length from."""

from __future__ import annotations

import argparse
import json

PERCENTILES = (50, 90, 95, 99)


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
    parser.add_argument("--columns", help="map other column names, e.g. prompt=question,chosen=good,rejected=bad")
    parser.add_argument(
        "--format", default="auto", choices=("auto", "explicit", "implicit", "conversational"), help="row format"
    )
    parser.add_argument("--tokenizer", help="tokenizer path or hub id: adds token-length percentiles")
    parser.add_argument("--chat-template", help="jinja file or text, for a tokenizer without a chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_dataset(
        args.dataset,
        tokenizer_path=args.tokenizer,
        split=args.split,
        config_name=args.config_name,
        columns=args.columns,
        data_format=args.format,
        chat_template=args.chat_template,
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def inspect_dataset(source: str, *, tokenizer_path: str | None = None, **load_options) -> dict:
    """The inspect report as a dict: source, format, n_rows, n_pairs, skipped and (with a tokenizer) token_lengths."""
    from . import load_preference_data, tokenize_pairs

    tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    pdata = load_preference_data(source, tokenizer=tokenizer, **load_options)
    report = {
        "source": pdata.source,
        "format": pdata.format,
        "n_rows": pdata.n_rows,
        "n_pairs": pdata.n_pairs,
        "skipped": dict(pdata.skipped),
    }
    if tokenizer is not None:
        tokenized, token_skips = tokenize_pairs(pdata.dataset, tokenizer, max_length=None, max_prompt_length=None)
        for reason, count in token_skips.items():
            report["skipped"][reason] = report["skipped"].get(reason, 0) + count
        report["n_pairs"] = len(tokenized)
        report["token_lengths"] = _token_lengths(tokenized)
    return report


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from ..errors import ConfigError

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds; all mean "cannot load"
        raise ConfigError(f"tokenizer {path}: cannot load ({str(e).strip().splitlines()[0]})") from e


def _token_lengths(tokenized) -> dict[str, dict[str, int]]:
    import numpy as np

    if len(tokenized) == 0:
        return {}
    prompt = np.array([len(ids) for ids in tokenized["prompt_input_ids"]])
    chosen = np.array([len(ids) for ids in tokenized["chosen_input_ids"]])
    rejected = np.array([len(ids) for ids in tokenized["rejected_input_ids"]])
    lengths = {
        "prompt": prompt,
        "completion": np.concatenate([chosen, rejected]),
        "prompt+longer completion": prompt + np.maximum(chosen, rejected),  # what max_length must hold
    }
    # method="higher": every reported length is one that occurs, and it never under-states what fits.
    return {
        name: {**{f"p{q}": int(np.percentile(values, q, method="higher")) for q in PERCENTILES}, "max": int(values.max())}
        for name, values in lengths.items()
    }


def format_report(report: dict) -> str:
    skipped = ", ".join(f"{reason} {count}" for reason, count in report["skipped"].items()) or "none"
    lines = [
        f"source:     {report['source']}",
        f"format:     {report['format']}",
        f"rows read:  {report['n_rows']}",
        f"pairs kept: {report['n_pairs']}",
        f"skipped:    {skipped}",
    ]
    if report.get("token_lengths"):
        columns = [*(f"p{q}" for q in PERCENTILES), "max"]
        lines.append("token lengths:" + " " * 13 + "".join(f"{c:>8}" for c in columns))
        for name, stats in report["token_lengths"].items():
            lines.append(f"  {name:<25}" + "".join(f"{stats[c]:>8}" for c in columns))
    return "\n".join(lines)
