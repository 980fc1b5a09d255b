"""The run folder: what `prefalign train` writes into `output_dir`, and how it is read back.

One place for the file names, the JSON / JSONL reading and writing, and the metric names that both the
writer (`training/`, `evaluate.py`) and the readers (`analysis/`, `cli/`) use, so they cannot drift apart.

    OUTPUT_DIR/
      prefalign_config.json     the whole config                      (CONFIG_FILE)
      data_report.json          rows read, pairs kept, skips by reason (DATA_REPORT_FILE)
      metrics.jsonl             one object per logged step            (METRICS_FILE)
      eval_before.json          held-out summary before training      (BEFORE_FILE, with evaluate_before)
      eval_before_per_pair.jsonl                                       (BEFORE_PER_PAIR_FILE)
      eval_results.json         held-out summary after training       (EVAL_FILE)
      eval_per_pair.jsonl       one object per held-out pair          (PER_PAIR_FILE)
      train_summary.json        steps, time, losses, data, reference  (SUMMARY_FILE)
      reference_logps/          the run's reference log-probs         (REFERENCE_FOLDER; reference: precomputed)
      bench/BENCHMARK-SCORE.json  prefalign bench results of the model  (BENCH_FOLDER)
      generations.jsonl         prefalign generate's completions       (GENERATIONS_FILE)
      trained_pairs.jsonl       per optimizer step: the rows trained on (TRAINED_PAIRS_FILE)
      eval_trained_pairs.json   ranking accuracy on the pairs trained on (TRAIN_EVAL_FILE; prefalign sweep)
      eval_trained_pairs_per_pair.jsonl                                (TRAIN_EVAL_PER_PAIR_FILE)
      checkpoint-N/, model and tokenizer files (transformers'), spo_head.* (with SPO);
      in a checkpoint also loss_state.safetensors (α-DPO/β-DPO) and reference_model.safetensors (TR-DPO)

Runs written before 2026-12-01 have the same files, except `reference_logps/`; `prefalign compare` reads
them unchanged.

Bad input — a file that is not UTF-8, not JSON, or not a JSON object — raises a one-line PrefalignError
naming the file (and line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import PrefalignError

CONFIG_FILE = "prefalign_config.json"
DATA_REPORT_FILE = "data_report.json"
METRICS_FILE = "metrics.jsonl"
BEFORE_FILE = "eval_before.json"
BEFORE_PER_PAIR_FILE = "eval_before_per_pair.jsonl"
EVAL_FILE = "eval_results.json"
PER_PAIR_FILE = "eval_per_pair.jsonl"
SUMMARY_FILE = "train_summary.json"
REFERENCE_FOLDER = "reference_logps"
BENCH_FOLDER = "bench"  # prefalign bench results of the run's model: bench/{benchmark}-{score}.json
GENERATIONS_FILE = "generations.jsonl"
TRAINED_PAIRS_FILE = "trained_pairs.jsonl"  # {"step", "epoch", "rows": [row_index, ...]} per optimizer step
# prefalign sweep: the final model's ranking accuracy on pairs it trained on (runs before 2026-12-04 have an
# eval_train.json scored on the file's first rows instead, mostly never trained on: not read any more)
TRAIN_EVAL_FILE = "eval_trained_pairs.json"
TRAIN_EVAL_PER_PAIR_FILE = "eval_trained_pairs_per_pair.jsonl"
LOSS_STATE_FILE = "loss_state.safetensors"  # in a checkpoint: stateful losses' running statistics
SYNCED_REFERENCE_FILE = "reference_model.safetensors"  # in a checkpoint: the TR-DPO reference's weights
INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job stopped by SIGTERM

# What makes a folder hold a run: a new run is not started over it without an explicit request.
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)

# Metric names the trainer writes and the analysis reads (the losses name their own, e.g. amapo/mu).
SHARE_CORRECT = "grad/share_correct"  # share of the per-pair gradient weight |dl/dz| on pairs ranked right
SHARE_MISRANKED = "grad/share_misranked"
SKIPPED_PREFIX = "skipped/"  # skipped/nonfinite_loss_batches, skipped/nonfinite_grad_steps
EVAL_RANKING_ACCURACY = "eval_ranking_accuracy"

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_type(obj) -> str:
    return "null" if obj is None else _JSON_TYPES.get(type(obj), type(obj).__name__)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrefalignError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PrefalignError(f"{path}: cannot read ({e.strerror or e})") from None


def read_json_object(path) -> dict:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PrefalignError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(obj, dict):
        raise PrefalignError(f"{path}: expected a JSON object, got {_json_type(obj)}")
    return obj


def read_jsonl(path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefalignError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PrefalignError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
        rows.append(obj)
    return rows


def read_metrics(path) -> list[dict]:
    """metrics.jsonl (a path to the file or to its run folder)."""
    path = Path(path)
    return read_jsonl(path / METRICS_FILE if path.is_dir() else path)


def trained_rows(run_dir) -> list[int] | None:
    """The dataset rows a run trained on, each once, in the order first trained; None for a run without the
    record (written before trained_pairs.jsonl existed)."""
    path = Path(run_dir) / TRAINED_PAIRS_FILE
    if not path.is_file():
        return None
    seen: dict[int, None] = {}
    for row in read_jsonl(path):
        for index in row.get("rows", []):
            seen.setdefault(int(index), None)
    return list(seen)


def write_json(path, obj) -> None:
    """Atomically: a killed run never leaves half a file (a per-process temp name: every process may write)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(rows, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def append_jsonl(row: dict, path) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def run_files_in(folder) -> list[str]:
    """The names in `folder` that show it holds a started or finished run (checkpoints included)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    return [n for n in names if n in RUN_MARKERS or n.startswith("checkpoint-")]


def claim_run_folder(folder, *, resume, overwrite: bool) -> list[str]:
    """The run already in `folder` (names, as `run_files_in`); PrefalignError when there is one and the caller
    neither resumes nor asked to overwrite it. Nothing is deleted here (`clear_run_folder`, once inputs passed)."""
    existing = run_files_in(folder)
    if existing and not resume and not overwrite:
        raise PrefalignError(
            f"output_dir {folder} holds a run ({', '.join(existing[:4])}); continue it with --resume_from_checkpoint "
            "latest, replace it with --overwrite_output_dir true, or choose another output_dir"
        )
    return existing


def clear_run_folder(folder) -> None:
    """overwrite_output_dir: the old run's files go first, so none of them is mixed into the new run."""
    import logging
    import shutil

    shutil.rmtree(folder)
    logging.getLogger(__name__).warning("overwrite_output_dir: removed the run that was in %s", folder)


def bench_result_path(run_dir, benchmark: str, score: str) -> Path:
    """Where `prefalign bench` keeps a run's result: one file per benchmark and scoring."""
    return Path(run_dir) / BENCH_FOLDER / f"{benchmark}-{score}.json"


def is_run_folder(path) -> bool:
    return (Path(os.path.expanduser(str(path))) / CONFIG_FILE).is_file()
