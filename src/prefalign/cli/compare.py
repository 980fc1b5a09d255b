"""`prefalign compare RUN_DIR… [--eval DATASET] --out DIR`: a table, plots and a report over training runs."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare training runs: table, plots and a markdown/HTML report",
        description="Compare prefalign training runs: one table row per run, plots of loss, accuracy, "
        "gradient allocation, Δ distribution and AMaPO statistics, and a report of what they show.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output directories (with metrics.jsonl)")
    p.add_argument("--eval", dest="eval_dataset", default=None, metavar="DATASET",
                   help="evaluate each run's final model on DATASET instead of using its saved eval results")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, report.html and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.add_argument("--labels", default=None, help="comma-separated run names, one per RUN_DIR (default: the loss)")
    p.add_argument("--max-length", type=int, default=None,
                   help="with --eval: max tokens per prompt+completion (default: each run's own)")
    p.add_argument("--batch-size", type=int, default=8, help="with --eval: pairs per forward pass")
    p.add_argument("--limit", type=int, default=None, help="with --eval: the first N pairs only")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..analysis.compare import REPORT_HTML, REPORT_MD, compare
    from .writes import refuse_to_replace

    for name in (REPORT_MD, REPORT_HTML):  # an earlier report is kept unless asked, before any run is read
        refuse_to_replace(Path(args.out).expanduser() / name, args.overwrite, "--out another folder")
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    out = compare(
        args.run_dirs,
        args.out,
        labels=labels,
        eval_dataset=args.eval_dataset,
        max_length=args.max_length,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    print(f"wrote {out / REPORT_MD} and {out / REPORT_HTML}")
    return 0
