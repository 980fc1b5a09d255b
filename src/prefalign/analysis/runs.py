"""Reading a training run directory (what `prefalign train` writes; `run_files` names it) into a `Run`.

Bad input — a missing directory, a missing metrics.jsonl, a file that is not JSON — raises a one-line
PrefalignError naming the file (and line). Missing optional files and null or absent values are not
errors: they are left out of the tables and plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrefalignError
from ..run_files import (
    BEFORE_FILE,
    BENCH_FOLDER,
    CONFIG_FILE,
    EVAL_FILE,
    EVAL_RANKING_ACCURACY,
    GENERATIONS_FILE,
    METRICS_FILE,
    PER_PAIR_FILE,
    SHARE_CORRECT,
    SHARE_MISRANKED,
    SUMMARY_FILE,
    read_json_object,
    read_jsonl,
)
from ..stats import finite


@dataclass
class HeldOut:
    """The held-out evaluation of a run's final model."""

    summary: dict  # eval_results.json keys (n_pairs, ranking_accuracy, mean_delta, ...)
    records: list[dict] | None  # per-pair records, when available
    source: str  # where it came from, for the report

    @property
    def n(self) -> int:
        if self.records is not None:
            return len(self.records)
        n = finite(self.summary.get("n_pairs"))
        return int(n) if n is not None else 0

    @property
    def correct(self) -> int | None:
        """Number of correctly ranked pairs: counted from the records, else accuracy × n."""
        if self.records is not None:
            return sum(bool(r.get("correct")) for r in self.records)
        acc = finite(self.summary.get("ranking_accuracy"))
        return None if acc is None or self.n == 0 else round(acc * self.n)

    @property
    def accuracy(self) -> float | None:
        k = self.correct
        return None if k is None or self.n == 0 else k / self.n

    @property
    def deltas(self) -> list[float]:
        return [d for d in (finite(r.get("delta")) for r in self.records or []) if d is not None]


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    train_summary: dict | None = None
    heldout: HeldOut | None = None
    before: dict | None = None  # eval summary before training
    label: str = ""
    notes: list[str] = field(default_factory=list)
    bench: dict[str, dict] = field(default_factory=dict)  # prefalign bench results: "rm-bench-avg" -> result
    generations: list[dict] | None = None  # prefalign generate's completions of the final model

    @property
    def loss_type(self) -> str | None:
        lt = self.config.get("loss_type")
        if isinstance(lt, list) and lt and all(isinstance(x, str) for x in lt):
            return "+".join(lt)  # a combination, as TRL's list loss_type: dpo+sft
        return lt if isinstance(lt, str) and lt else None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every row with a finite `key`, by step; a step logged twice (a resumed run)
        keeps its later row."""
        by_step: dict[int, float] = {}
        for row in self.rows:
            step, value = finite(row.get("step")), finite(row.get(key))
            if step is not None and value is not None:
                by_step[int(step)] = value
        return sorted(by_step.items())

    def last(self, key: str) -> tuple[int, float] | None:
        s = self.series(key)
        return s[-1] if s else None

    def misranked_share(self) -> list[tuple[int, float]]:
        """grad/share_misranked, or 1 − grad/share_correct where only that was logged."""
        s = self.series(SHARE_MISRANKED)
        return s or [(step, 1.0 - v) for step, v in self.series(SHARE_CORRECT)]

    @property
    def final_row(self) -> dict:
        for row in reversed(self.rows):
            if "train_runtime" in row or "train_loss" in row:
                return row
        return {}

    @property
    def global_step(self) -> int | None:
        v = finite((self.train_summary or {}).get("global_step"))
        if v is None:
            steps = [s for s in (finite(r.get("step")) for r in self.rows) if s is not None]
            v = max(steps) if steps else None
        return None if v is None else int(v)

    @property
    def train_seconds(self) -> float | None:
        for v in ((self.train_summary or {}).get("train_seconds"), self.final_row.get("train_runtime")):
            if finite(v) is not None:
                return finite(v)
        last = self.last("time_s")
        return last[1] if last else None


def _repeated_steps(rows: list[dict]) -> int:
    """Rows whose step is below an earlier row's: what a resumed run appends."""
    count, top = 0, None
    for row in rows:
        step = finite(row.get("step"))
        if step is None:
            continue
        if top is not None and step < top:
            count += 1
        top = step if top is None else max(top, step)
    return count


def _last_eval_row(rows: list[dict]) -> dict | None:
    for row in reversed(rows):
        if finite(row.get(EVAL_RANKING_ACCURACY)) is not None:
            return row
    return None


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise PrefalignError(f"{path}: run directory does not exist")
    if not path.is_dir():
        raise PrefalignError(f"{path}: not a directory (expected a training run's output_dir)")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise PrefalignError(f"{metrics}: not found — is {path} a prefalign training output_dir?")
    torn: list = []
    run = Run(path=path, config={}, rows=read_jsonl(metrics, torn_tail=torn))
    if torn:
        run.notes.append(f"{METRICS_FILE} line {torn[0]} is cut off (the run was killed while writing it) and is "
                         "skipped")
    if not run.rows:
        run.notes.append(f"{METRICS_FILE} has no rows")
    repeated = _repeated_steps(run.rows)
    if repeated:
        run.notes.append(f"{METRICS_FILE} has {repeated} rows at steps logged before (a resumed run?); the later rows are used")

    if (path / CONFIG_FILE).is_file():
        run.config = read_json_object(path / CONFIG_FILE)
    else:
        run.notes.append(f"no {CONFIG_FILE}: loss and hyperparameters unknown")
    if (path / SUMMARY_FILE).is_file():
        run.train_summary = read_json_object(path / SUMMARY_FILE)

    records = read_jsonl(path / PER_PAIR_FILE) if (path / PER_PAIR_FILE).is_file() else None
    if (path / EVAL_FILE).is_file():
        run.heldout = HeldOut(read_json_object(path / EVAL_FILE), records, EVAL_FILE)
    elif isinstance((run.train_summary or {}).get("eval"), dict):
        run.heldout = HeldOut(run.train_summary["eval"], records, f"{SUMMARY_FILE} (eval)")
    elif (row := _last_eval_row(run.rows)) is not None:
        summary = {k[len("eval_"):]: v for k, v in row.items() if k.startswith("eval_")}
        run.heldout = HeldOut(summary, records, f"{METRICS_FILE} (last eval row, step {row.get('step')})")
    elif records is not None:
        run.heldout = HeldOut({}, records, PER_PAIR_FILE)

    for result in sorted((path / BENCH_FOLDER).glob("*.json")) if (path / BENCH_FOLDER).is_dir() else []:
        run.bench[result.stem] = read_json_object(result)
    if (path / GENERATIONS_FILE).is_file():
        run.generations = read_jsonl(path / GENERATIONS_FILE)

    if (path / BEFORE_FILE).is_file():
        run.before = read_json_object(path / BEFORE_FILE)
    elif isinstance((run.train_summary or {}).get("eval_before"), dict):
        run.before = run.train_summary["eval_before"]
    return run


def uses_spo(run: Run) -> bool:
    """SPO was on: `use_spo` and a positive `spo_weight` (the weight has a default even when SPO is off)."""
    weight = finite(run.config.get("spo_weight"))
    return run.config.get("use_spo") is True and weight is not None and weight > 0


def default_label(run: Run) -> str:
    loss = run.loss_type or run.path.resolve().name
    return f"{loss}+spo" if uses_spo(run) else loss


def assign_labels(runs: list[Run], labels: list[str] | None = None) -> None:
    """Given labels, or the loss name (+spo); runs that would share a label get their directory name too."""
    if labels is not None:
        if len(labels) != len(runs):
            raise PrefalignError(f"--labels has {len(labels)} names for {len(runs)} run directories")
        if not all(labels):
            raise PrefalignError(f"--labels has an empty name: {','.join(labels)!r}")
        if len(set(labels)) != len(labels):
            raise PrefalignError(f"--labels has repeated names: {', '.join(labels)}")
        for run, label in zip(runs, labels):
            run.label = label
        return
    names = [default_label(r) for r in runs]
    names = [f"{n} ({r.path.resolve().name})" if names.count(n) > 1 else n for n, r in zip(names, runs)]
    for i, (run, name) in enumerate(zip(runs, names)):
        run.label = f"{name} #{i + 1}" if names.count(name) > 1 else name
