"""`prefalign sweep SWEEP.yaml [--json]`: run a grid of trainings and report which differences are separated."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of trainings (methods x seeds) and compare them with intervals",
                       description="Run every cell of a sweep file (finished cells are skipped), then report each "
                       "method's held-out accuracy over seeds and its paired difference against the baseline.")
    p.add_argument("sweep_file", metavar="SWEEP.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="report on the finished cells, train nothing")
    p.add_argument("--baseline", default=None, help="compare against another method (report in report-vs-NAME/)")
    p.add_argument("--methods", default=None, metavar="A,B,…",
                   help="run and report only these methods (the baseline among them); the others' cells can be run "
                   "later into the same folder (finished cells are skipped). Report in report-only-A+B…/")
    p.add_argument("--json", action="store_true",
                   help='print {"methods": {NAME: {mean, ci, n_seeds}}, "paired": {NAME: {diff, ci, verdict}}} at the end')
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sweep.report import summarize_sweep, write_report
    from ..sweep.runner import finished, run_cells
    from ..sweep.spec import load_sweep, only_methods

    sweep = load_sweep(args.sweep_file)
    if args.methods:
        sweep = only_methods(sweep, [m.strip() for m in args.methods.split(",") if m.strip()],
                             args.baseline or sweep.baseline)
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.dry_run:
        for cell in sweep.cells:
            state = "finished" if finished(cell) else "to run"
            print(f"{cell.name}: {state} -> {cell.run_dir}")
        return 0
    if not args.report_only:
        run_cells(sweep, echo=echo)
    from ..sweep.spec import slug

    summary = summarize_sweep(sweep, args.baseline)
    folder = "report" if args.baseline in (None, sweep.baseline) else f"report-vs-{slug(args.baseline)}"
    if args.methods:  # a subset's report never replaces the whole sweep's
        folder += "-only-" + "+".join(slug(m) for m in sweep.methods)
    report = write_report(sweep, summary, sweep.output_dir / folder)
    if args.json:
        keep = ("mean", "ci", "n_seeds")
        print(json.dumps({"methods": {m: {k: v[k] for k in keep} for m, v in summary["methods"].items()},
                          "paired": {m: {k: v[k] for k in ("diff", "ci", "verdict")}
                                     for m, v in summary["paired"].items()}}))
    else:
        print(report.read_text(encoding="utf-8"))
    echo(f"wrote {report}")
    return 0

