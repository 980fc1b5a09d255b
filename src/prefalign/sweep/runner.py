"""Running a sweep's cells one after the other, each as its own `prefalign train` process (under the sweep's
launcher when it has one), resumably: a finished cell is skipped, a cell with a checkpoint resumes from it,
and a cell that died before its first checkpoint starts again (its folder is the sweep's own)."""

from __future__ import annotations

import logging
import subprocess
import sys

import yaml

from ..errors import PrefalignError
from ..run_files import (
    EVAL_FILE,
    GENERATIONS_FILE,
    SUMMARY_FILE,
    TRAIN_EVAL_FILE,
    TRAIN_EVAL_PER_PAIR_FILE,
    TRAINED_PAIRS_FILE,
    bench_result_path,
    run_files_in,
    trained_rows,
    write_json,
    write_jsonl,
)
from .spec import Cell, Sweep, slug

log = logging.getLogger(__name__)


def finished(cell: Cell) -> bool:
    done = (cell.run_dir / SUMMARY_FILE).is_file()
    return done and (not cell.values.get("eval_dataset") or (cell.run_dir / EVAL_FILE).is_file())


def command(sweep: Sweep, cell: Cell) -> list[str]:
    recipe = sweep.output_dir / "cells" / f"{slug(cell.method)}-seed{cell.seed}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(cell.values, sort_keys=True), encoding="utf-8")
    head = [*sweep.launcher] if sweep.launcher else [sys.executable]
    argv = [*head, "-m", "prefalign.cli", "train", str(recipe)]
    if any(p.name.startswith("checkpoint-") for p in cell.run_dir.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "latest"]
    elif cell.run_dir.exists() and run_files_in(cell.run_dir):
        argv += ["--overwrite_output_dir", "true"]  # died before its first checkpoint: the sweep's own folder
    return argv


def run_cells(sweep: Sweep, *, echo=print) -> list[str]:
    """Train every unfinished cell, then its bench/generate extras; returns what was run."""
    ran = []
    logs = sweep.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for k, cell in enumerate(sweep.cells, 1):
        if finished(cell):
            echo(f"[{k}/{len(sweep.cells)}] {cell.name}: finished before, skipped")
        else:
            argv = command(sweep, cell)
            echo(f"[{k}/{len(sweep.cells)}] {cell.name}: training ({' '.join(argv[-3:])})")
            log_file = logs / f"{slug(cell.method)}-seed{cell.seed}.log"
            with log_file.open("w", encoding="utf-8") as f:
                code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
            if code != 0:
                lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise PrefalignError(f"sweep cell {cell.name} failed (exit {code}): {lines[-1] if lines else ''} "
                                     f"(log: {log_file}); rerun the sweep to continue from there")
            ran.append(cell.name)
        extras(sweep, cell, echo)
    return ran


def extras(sweep: Sweep, cell: Cell, echo) -> None:
    """The final model's ranking accuracy on the pairs it trained on (the overfitting gap is measured on one
    metric and the right pairs), bench and generate — each once (their files are kept in the run folder)."""
    if not (cell.run_dir / TRAIN_EVAL_FILE).is_file() and cell.values.get("dataset"):
        trained = trained_rows(cell.run_dir)
        if trained is None:
            echo(f"    {cell.name}: no {TRAINED_PAIRS_FILE} (a run from before it was written): no train − held-out gap")
        else:
            from ..evaluate import evaluate_path

            chosen = trained[: sweep.train_eval_pairs]
            echo(f"    {cell.name}: ranking accuracy on {len(chosen)} of the {len(trained)} pairs it trained on")
            summary, records = evaluate_path(
                str(cell.run_dir), cell.values["dataset"], split=cell.values.get("dataset_split"),
                dataset_config=cell.values.get("dataset_config"), rows=chosen,
                batch_size=cell.values.get("per_device_eval_batch_size", 8))
            summary.update({"pairs": "trained", "n_trained_pairs": len(trained)})
            write_jsonl(records, cell.run_dir / TRAIN_EVAL_PER_PAIR_FILE)
            write_json(cell.run_dir / TRAIN_EVAL_FILE, summary)  # last: its presence means both are complete
    for spec in sweep.bench:
        score = spec.get("score", "avg")
        if bench_result_path(cell.run_dir, spec["benchmark"], score).is_file():
            continue
        from ..bench.run import run_bench

        echo(f"    {cell.name}: bench {spec['benchmark']}")
        run_bench(spec["benchmark"], str(cell.run_dir), dataset=spec.get("dataset"), score=score,
                  limit=spec.get("limit"), batch_size=spec.get("batch_size", 8), max_length=spec.get("max_length"),
                  bf16=bool(cell.values.get("bf16")))
    if sweep.generate and not (cell.run_dir / GENERATIONS_FILE).is_file():
        from ..generation import generate_completions

        echo(f"    {cell.name}: generate")
        g = sweep.generate
        rows = generate_completions(str(cell.run_dir), g["dataset"], split=g.get("split"), limit=g.get("limit"),
                                    max_new_tokens=g.get("max_new_tokens", 256), batch_size=g.get("batch_size", 8),
                                    data_format=cell.values.get("data_format", "auto"),
                                    chat_template=cell.values.get("chat_template"))
        write_jsonl(rows, cell.run_dir / GENERATIONS_FILE)
