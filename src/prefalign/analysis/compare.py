"""Comparing training runs (`prefalign compare`): a table, plots and a report.

Writes DIR/report.md, DIR/report.html (self-contained) and the PNG plots. Heavy imports (matplotlib,
torch) happen only when it runs, so `prefalign --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def evaluate_runs(runs, dataset: str, *, max_length: int | None, batch_size: int, limit: int | None) -> None:
    """Replace each run's held-out results by a fresh evaluation of its final model on `dataset`."""
    from ..evaluate import evaluate_path
    from .runs import HeldOut

    for r in runs:
        summary, records = evaluate_path(
            str(r.path), dataset, max_length=max_length, batch_size=batch_size, limit=limit
        )
        r.heldout = HeldOut(summary, records, f"--eval {dataset}")
        r.before = None  # measured on the training run's eval set, not on DATASET


def compare(
    run_dirs,
    out,
    *,
    labels: list[str] | None = None,
    eval_dataset: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> Path:
    """Load the runs, optionally evaluate them, write plots and reports into `out`; returns `out`."""
    from ..errors import PrefalignError
    from .plots import make_plots, run_colors
    from .report import render_html, render_markdown
    from .runs import assign_labels, load_run

    runs = [load_run(d) for d in run_dirs]
    assign_labels(runs, labels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrefalignError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if eval_dataset is not None:
        evaluate_runs(runs, eval_dataset, max_length=max_length, batch_size=batch_size, limit=limit)

    plots = make_plots(runs, run_colors(len(runs)), out)
    blocks = build_report(runs, plots, out, eval_dataset)
    title = f"Comparison of {len(runs)} training run{'s' if len(runs) != 1 else ''}"
    (out / REPORT_MD).write_text(render_markdown(title, blocks), encoding="utf-8")
    (out / REPORT_HTML).write_text(render_html(title, blocks), encoding="utf-8")
    return out


def _same_eval_data(runs, eval_dataset: str | None) -> bool:
    scored = [r for r in runs if r.heldout is not None]
    if eval_dataset is None and len({str(r.config.get("eval_dataset")) for r in scored}) > 1:
        return False
    return len({r.heldout.n for r in scored}) <= 1


def bench_caveats(runs) -> list[str]:
    """A line per bench result that cannot stand beside the benchmark's published score, with the reasons
    (truncated pairs, --limit, missing parts, ...) prefalign bench recorded."""
    from ..bench.run import comparability_line

    return [f"{r.label}, {name}: {comparability_line(res)}." for r in runs for name, res in sorted(r.bench.items())
            if not res.get("comparable_to_official")]


def build_report(runs, plots, out: Path, eval_dataset: str | None) -> list:
    from . import findings as F
    from .report import Bullets, Heading, Image, Paragraph, Table

    where = (f"every final model evaluated on `{eval_dataset}` by this command" if eval_dataset
             else "each run's own evaluation (see Sources)")
    blocks = [
        Paragraph(f"Runs: {', '.join(r.label for r in runs)}. Held-out numbers: {where}."),
        Heading("Runs"),
        Table(F.TABLE_HEADER, [F.table_row(r) for r in runs]),
        Paragraph(
            "Batch is per-device batch size × gradient accumulation steps. `Last …` columns are the last logged "
            "training window (`loss`, `rewards/accuracies`, `rewards/margins`). Held-out accuracy is the share of "
            "pairs whose chosen completion has the higher mean per-token log-prob; the interval is the 95% Wilson "
            "score interval. Mean Δ is the mean of chosen − rejected mean per-token log-prob; lengths are in tokens."
        ),
        Heading("Sources"),
        Table(F.SOURCES_HEADER, [F.sources_row(r) for r in runs]),
    ]
    benches = F.bench_tables(runs)
    if benches:
        blocks.append(Heading("Benchmarks"))
        for title, header, rows in benches:
            blocks += [Heading(title, 3), Table(header, rows)]
        blocks.append(Paragraph("From `prefalign bench` (RUN/bench/): accuracy in %, aggregated as the benchmark's "
                                "official code; the scoring says how responses were scored (docs/benchmarks.md)."))
        caveats = bench_caveats(runs)
        if caveats:
            blocks.append(Bullets(caveats))
    blocks.append(Heading("Plots"))
    for p in plots:
        if p.written:
            blocks.append(Image(out / p.filename, p.title, p.caption))
    skipped = [f"`{p.filename}` not written: {p.reason}." for p in plots if not p.written]
    if skipped:
        blocks += [Paragraph("Plots without data for any run:"), Bullets(skipped)]

    blocks.append(Heading("What the plots show"))
    sections = [
        ("Loss", F.loss_findings(runs)),
        ("Accuracy", F.accuracy_findings(runs)),
        ("Gradient allocation", F.grad_findings(runs)),
        ("Δ at the end of training", F.delta_findings(runs)),
        ("AMaPO batch statistics", F.amapo_findings(runs)),
        ("Generated lengths", F.generation_findings(runs)),
        ("Is the held-out accuracy difference separated?", F.separation_findings(runs, _same_eval_data(runs, eval_dataset))),
    ]
    for name, items in sections:
        if items:
            blocks += [Heading(name, 3), Bullets(items)]

    notes = [f"{r.label}: {note}." for r in runs for note in r.notes]
    notes += [f"{r.label}: no held-out evaluation (no eval_results.json, eval rows or per-pair records)."
              for r in runs if r.heldout is None]
    if notes:
        blocks += [Heading("Notes"), Bullets(notes)]
    return blocks
