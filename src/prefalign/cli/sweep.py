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
    p.add_argument("--report-only", action="store_true",
                   help="report on the finished cells (every other cell listed with why), train nothing")
    p.add_argument("--baseline", default=None, help="compare against another method (report in report-vs-NAME/)")
    p.add_argument("--methods", default=None, metavar="A,B,…",
                   help="run and report only these methods (the baseline among them); the others' cells can be run "
                   "later into the same folder (finished cells are skipped). Report in report-only-A+B…/")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again the cells whose run was trained with other settings than the file gives now "
                   "(each old run is kept, moved to RUN_DIR.replaced-K); without it such a sweep is refused")
    p.add_argument("--json", action="store_true",
                   help='print {"methods": {NAME: {mean, ci, n_seeds}}, "paired": {NAME: {diff, ci, verdict}}} at the end '
                   '(and "missing": {CELL: why} when a cell has no result)')
    p.set_defaults(func=run)


def run(args) -> int:
    from ..run_lock import RunLock
    from ..sweep.runner import Interrupted
    from ..sweep.spec import load_sweep, only_methods
    from ..sweep.state import cell_states, describe_changes

    sweep = load_sweep(args.sweep_file)
    if args.methods:
        sweep = only_methods(sweep, [m.strip() for m in args.methods.split(",") if m.strip()],
                             args.baseline or sweep.baseline)
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.dry_run:  # reads only: no lock
        for state in cell_states(sweep):
            detail = {"invalid": f": {state.error}", "changed": f" since it ran: {describe_changes(state.changed)}"}
            print(f"{state.cell.name}: {state.status}{detail.get(state.status, '')} -> {state.cell.run_dir}")
        return 0
    # One sweep at a time writes into its folder: a second one is refused naming the first (each cell's
    # `prefalign train` also locks its own run folder).
    with RunLock(sweep.output_dir, "sweep"):
        try:
            return _run_locked(args, sweep, echo)
        except Interrupted as e:
            print(f"prefalign sweep: {e}", file=sys.stderr)
            return e.exit_code


def _run_locked(args, sweep, echo) -> int:
    from ..sweep.report import summarize_sweep, write_report
    from ..sweep.runner import run_cells
    from ..sweep.spec import slug

    failed = {}
    if not args.report_only:
        failed = run_cells(sweep, echo=echo, rerun_changed=args.rerun_changed)["failed"]
    summary = summarize_sweep(sweep, args.baseline)
    folder = "report" if args.baseline in (None, sweep.baseline) else f"report-vs-{slug(args.baseline)}"
    if args.methods:  # a subset's report never replaces the whole sweep's
        folder += "-only-" + "+".join(slug(m) for m in sweep.methods)
    report = write_report(sweep, summary, sweep.output_dir / folder)
    if args.json:
        keep = ("mean", "ci", "n_seeds")
        out = {"methods": {m: {k: v[k] for k in keep} for m, v in summary["methods"].items()},
               "paired": {m: {k: v[k] for k in ("diff", "ci", "verdict")} for m, v in summary["paired"].items()}}
        if summary["missing"]:
            out["missing"] = summary["missing"]
        print(json.dumps(out))
    else:
        print(report.read_text(encoding="utf-8"))
    echo(f"wrote {report}")
    if failed:  # the report is written without them; the exit status says the sweep is not complete
        print(f"prefalign sweep: {len(failed)} of {len(sweep.cells)} cells failed ({', '.join(failed)}); the "
              "report leaves them out; see their logs, fix the cause and run the same command again to train them",
              file=sys.stderr)
        return 1
    return 0
