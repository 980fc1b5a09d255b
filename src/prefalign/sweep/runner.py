"""Running a sweep's cells one after the other, each as its own `prefalign train` process (under the sweep's
launcher when it has one), resumably: a finished cell is skipped, a cell with a checkpoint resumes from it,
and a cell that died before its first checkpoint starts again (its folder is the sweep's own).

Before the first cell trains, every cell's config is built and checked, and every started cell's recorded
settings are compared with the file's (`state.py`): an invalid cell, or a run trained with other settings,
stops the sweep in one line before anything is written. A cell that fails while training is reported and
skipped; the others run. SIGINT, SIGTERM or SIGHUP to the sweep is passed to the training cell as SIGTERM
(it saves a checkpoint and stops) and waited for; then the sweep stops (`Interrupted`)."""

from __future__ import annotations

import datetime
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from ..errors import ConfigError, PrefalignError
from ..run_files import (
    GENERATIONS_FILE,
    INTERRUPTED_EXIT_CODE,
    TRAIN_EVAL_FILE,
    TRAIN_EVAL_PER_PAIR_FILE,
    TRAINED_PAIRS_FILE,
    bench_result_path,
    run_files_in,
    trained_rows,
    write_json,
    write_jsonl,
)
from .spec import Cell, Sweep
from .state import (
    CellState,
    cell_states,
    describe_changes,
    final_run,
    finished,
    group_cells,
    last_line,
    record_settings,
    stem,
)

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "check_cells", "command", "extras", "finished", "run_cells", "set_aside"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(Exception):
    """The sweep was stopped by a signal, after the cell it was training (if any) stopped too."""

    def __init__(self, signum: int, cell: str | None = None, code: int | None = None):
        self.signum, self.cell, self.code = signum, cell, code
        if cell is None:
            what = "no cell was training"
        elif code == INTERRUPTED_EXIT_CODE:
            what = f"{cell} saved a checkpoint and stopped"
        else:
            what = f"{cell} stopped (exit {code})"
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {what}; run the same command again to "
                         "continue (finished cells are skipped, a stopped one resumes from its last checkpoint)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a job stopped by this signal


class _Stopper:
    """While the sweep runs cells, a stop signal is passed to the training cell as SIGTERM (`prefalign train`
    then saves a checkpoint and exits 143) and the sweep waits for it; a second signal kills the cell at once.
    With no cell training the sweep stops where it is (its files are written whole)."""

    def __init__(self, echo):
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.cell: str | None = None
        self.launching = False
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set them
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup`, or `&` in a script: left ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        if self.launching and self.proc is None:
            return  # the cell is being started: `run` passes the signal on as soon as it has its process
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise Interrupted(self.signum)
        name = signal.Signals(signum).name
        if again:
            proc.kill()
            self._say(f"    {name} again: killed {self.cell} (its steps since its last checkpoint are lost)")
        else:
            proc.send_signal(signal.SIGTERM)
            self._say(f"    {name}: asked {self.cell} to save a checkpoint and stop; waiting for it "
                      "(a second signal kills it at once)")

    def _say(self, message: str) -> None:
        try:
            self.echo(message)
        except OSError:  # a closed terminal (SIGHUP): the cell is still waited for
            pass

    def run(self, argv: list[str], log_file: Path, cell: str) -> int:
        """The cell's exit status; Interrupted once it stopped when a stop signal came meanwhile."""
        with log_file.open("a", encoding="utf-8") as f:  # appended: a resumed cell's earlier log is kept
            f.write(f"=== prefalign sweep, {datetime.datetime.now().isoformat(timespec='seconds')}: "
                    f"{' '.join(argv)}\n")
            f.flush()
            self.cell, self.launching = cell, True
            try:
                # Its own session: a Ctrl-C at the terminal reaches the sweep alone, which asks the cell to stop
                # with SIGTERM (a checkpoint) rather than a KeyboardInterrupt that loses the steps since the last.
                try:
                    self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as e:  # the launcher itself: every cell would fail alike
                    raise PrefalignError(f"cannot start {cell}: {argv[0]}: {e.strerror or e}") from None
                if self.signum is not None:  # came while it was being started
                    self.proc.send_signal(signal.SIGTERM)
                code = self.proc.wait()
            finally:
                self.proc, self.launching = None, False
        if self.signum is not None:
            raise Interrupted(self.signum, cell, code)
        return code


def command(sweep: Sweep, cell: Cell) -> list[str]:
    recipe = sweep.output_dir / "cells" / f"{stem(cell)}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({**cell.values, **(cell.online or {})}, sort_keys=True), encoding="utf-8")
    head = [*sweep.launcher] if sweep.launcher else [sys.executable]
    if cell.online is not None:  # running it again continues from its last finished round (or checkpoint)
        return [*head, "-m", "prefalign.cli", "online", str(recipe)]
    argv = [*head, "-m", "prefalign.cli", "train", str(recipe)]
    if any(p.name.startswith("checkpoint-") for p in cell.run_dir.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "latest"]
    elif cell.run_dir.exists() and run_files_in(cell.run_dir):
        argv += ["--overwrite_output_dir", "true"]  # died before its first checkpoint: the sweep's own folder
    return argv


def set_aside(cell: Cell) -> Path:
    """Move a cell's old run to RUN_DIR.replaced-K (nothing is deleted), so the cell trains afresh."""
    from ..run_lock import RunLock

    with RunLock(cell.run_dir, "sweep"):  # one line, and nothing moved, while a process writes there
        pass
    k = 1
    while cell.run_dir.with_name(f"{cell.run_dir.name}.replaced-{k}").exists():
        k += 1
    aside = cell.run_dir.with_name(f"{cell.run_dir.name}.replaced-{k}")
    cell.run_dir.rename(aside)
    return aside


def check_cells(sweep: Sweep, *, rerun_changed: bool = False, echo=print) -> list[CellState]:
    """Every cell's config built and checked, every started cell's settings compared with its record — before
    anything trains. An invalid cell is refused; so is a run trained with other settings, unless
    `rerun_changed`: then it is set aside and the cell trains again."""
    states = cell_states(sweep)
    invalid = [s for s in states if s.error is not None]
    if invalid:
        raise ConfigError(f"{sweep.path}: {len(invalid)} of {len(states)} cells cannot run, nothing was trained: "
                          + group_cells(invalid, lambda s: s.error))
    changed = [s for s in states if s.changed]
    if changed and not rerun_changed:
        listed = group_cells(changed, lambda s: describe_changes(s.changed))
        raise PrefalignError(
            f"{sweep.path}: {len(changed)} of {len(states)} cells were trained with other settings than the file "
            f"gives now, so their results are not this file's ({listed}); give the sweep a new output_dir, or pass "
            "--rerun-changed to train them again (each old run is kept, moved to RUN_DIR.replaced-K)")
    for s in changed:
        aside = set_aside(s.cell)
        echo(f"{s.cell.name}: trained with other settings ({describe_changes(s.changed)}): its old run moved to "
             f"{aside}; it trains again")
        s.changed = {}
    return states


def run_cells(sweep: Sweep, *, echo=print, rerun_changed: bool = False) -> dict:
    """Check every cell (`check_cells`), then train each unfinished one and run its bench/generate extras. A
    cell that fails is reported and skipped, the others run. Returns {"ran": [cell, ...], "failed": {cell:
    why}}; raises Interrupted when a stop signal came (after the training cell stopped)."""
    states = check_cells(sweep, rerun_changed=rerun_changed, echo=echo)
    ran, failed = [], {}
    logs = sweep.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with _Stopper(echo) as stopper:
        for k, state in enumerate(states, 1):
            cell, head = state.cell, f"[{k}/{len(states)}] {state.cell.name}"
            if finished(cell):
                echo(f"{head}: finished before, skipped")
            else:
                record_settings(sweep, state)  # what it trains with, for the next run to compare
                argv = command(sweep, cell)
                echo(f"{head}: training ({' '.join(argv[-3:])})")
                log_file = logs / f"{stem(cell)}.log"
                code = stopper.run(argv, log_file, cell.name)
                if code != 0 or not finished(cell):
                    why = f"exit {code}: {last_line(log_file)}" if code != 0 else "it ended without its results"
                    failed[cell.name] = f"failed ({why}; log: {log_file})"
                    echo(f"{head}: {failed[cell.name]}; skipped, the other cells go on")
                    continue
                ran.append(cell.name)
            extras(sweep, cell, echo)
    return {"ran": ran, "failed": failed}


def extras(sweep: Sweep, cell: Cell, echo) -> None:
    """The final model's ranking accuracy on the pairs it trained on (the overfitting gap is measured on one
    metric and the right pairs), bench, generate and answers — each once (their files are kept in the folder of
    the run that holds the final model: the cell's own, or an online cell's last trained round)."""
    from ..run_files import ANSWERS_FILE, ANSWERS_PER_PROMPT_FILE, CONFIG_FILE, read_json_object

    run_dir = final_run(cell)
    config = read_json_object(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else cell.values
    if not (run_dir / TRAIN_EVAL_FILE).is_file() and config.get("dataset"):
        trained = trained_rows(run_dir)
        if trained is None:
            echo(f"    {cell.name}: no {TRAINED_PAIRS_FILE} (a run from before it was written): no train − held-out gap")
        else:
            from ..evaluate import evaluate_path

            chosen = trained[: sweep.train_eval_pairs]
            echo(f"    {cell.name}: ranking accuracy on {len(chosen)} of the {len(trained)} pairs it trained on")
            summary, records = evaluate_path(
                str(run_dir), config["dataset"], split=config.get("dataset_split"),
                dataset_config=config.get("dataset_config"), rows=chosen,
                batch_size=cell.values.get("per_device_eval_batch_size", 8))
            summary.update({"pairs": "trained", "n_trained_pairs": len(trained)})
            write_jsonl(records, run_dir / TRAIN_EVAL_PER_PAIR_FILE)
            write_json(run_dir / TRAIN_EVAL_FILE, summary)  # last: its presence means both are complete
    for spec in sweep.bench:
        score = spec.get("score", "avg")
        if bench_result_path(run_dir, spec["benchmark"], score).is_file():
            continue
        from ..bench.run import run_bench

        echo(f"    {cell.name}: bench {spec['benchmark']}")
        run_bench(spec["benchmark"], str(run_dir), dataset=spec.get("dataset"), score=score,
                  limit=spec.get("limit"), batch_size=spec.get("batch_size", 8), max_length=spec.get("max_length"),
                  bf16=bool(cell.values.get("bf16")))
    if sweep.generate and not (run_dir / GENERATIONS_FILE).is_file():
        from ..generation import generate_completions

        echo(f"    {cell.name}: generate")
        g = sweep.generate
        rows = generate_completions(str(run_dir), g["dataset"], split=g.get("split"), limit=g.get("limit"),
                                    max_new_tokens=g.get("max_new_tokens", 256), batch_size=g.get("batch_size", 8),
                                    data_format=cell.values.get("data_format", "auto"),
                                    chat_template=cell.values.get("chat_template"))
        write_jsonl(rows, run_dir / GENERATIONS_FILE)
    if sweep.answers and not (run_dir / ANSWERS_FILE).is_file():
        from ..online.evaluation import evaluate_answers

        a = sweep.answers
        echo(f"    {cell.name}: greedy answers to {a['dataset']}, scored with {a['reward']}")
        summary, rows = evaluate_answers(str(run_dir), a["dataset"], a["reward"], limit=a.get("limit"),
                                         max_new_tokens=a.get("max_new_tokens", 128),
                                         batch_size=a.get("batch_size", 16), bf16=cell.values.get("bf16"),
                                         # read as the sweep's data is, not as an online round's pairs.jsonl
                                         data_format=cell.values.get("data_format", "auto"),
                                         columns=cell.values.get("columns"),
                                         chat_template=cell.values.get("chat_template"),
                                         use_cpu=bool(cell.values.get("use_cpu")))
        write_jsonl(rows, run_dir / ANSWERS_PER_PROMPT_FILE)
        write_json(run_dir / ANSWERS_FILE, summary)  # last: its presence means both are complete
