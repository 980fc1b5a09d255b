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
      answers.json              greedy answers to held-out prompts, scored (ANSWERS_FILE; prefalign sweep)
      answers_per_prompt.jsonl  one object per prompt: the answer and its reward (ANSWERS_PER_PROMPT_FILE)
      resumed_settings.jsonl    per resume: the step it continued from and what changed (SETTINGS_HISTORY_FILE)
      prefalign_files.json      the names the final save wrote (model, tokenizer): what an overwrite removes
      .prefalign.lock           while a process writes into the folder: which one (LOCK_FILE, run_lock.py)
      checkpoint-N/, model and tokenizer files (transformers'), spo_head.* (with SPO);
      in a checkpoint also loss_state.safetensors (α-DPO/β-DPO) and reference_model.safetensors (TR-DPO)

`prefalign online` writes a folder of rounds, each with a training run of the form above inside:

    OUTPUT_DIR/
      online_config.json        the online keys and the training config (ONLINE_CONFIG_FILE)
      rounds.jsonl              one object per finished round; round 0 = the start model's eval (ROUNDS_FILE)
      eval_pairs.jsonl          eval_dataset's pairs as the user's data keys read them, rendered (EVAL_PAIRS_FILE)
      round-N/                  (round_folder)
        samples.jsonl           per sample: prompt, response, tokens, reward or skip reason (SAMPLES_FILE)
        pairs.jsonl             the pairs the round trains on              (PAIRS_FILE)
        eval_samples.jsonl      greedy answers to eval_prompts, scored     (EVAL_SAMPLES_FILE)
        train/                  the round's training run                   (ROUND_TRAIN_FOLDER)

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
# prefalign sweep (`answers:`): the final model's greedy answers to held-out prompts, scored with a reward
ANSWERS_FILE = "answers.json"
ANSWERS_PER_PROMPT_FILE = "answers_per_prompt.jsonl"
LOSS_STATE_FILE = "loss_state.safetensors"  # in a checkpoint: stateful losses' running statistics
SPO_OPTIMIZER_FILE = "spo_head_optimizer.pt"  # in a DeepSpeed or FSDP checkpoint: the SPO head's optimizer and schedule
SYNCED_REFERENCE_FILE = "reference_model.safetensors"  # in a checkpoint: the TR-DPO reference's weights
SETTINGS_HISTORY_FILE = "resumed_settings.jsonl"  # {"from_step", "changed": {key: {"was", "now"}}} per resume
MANIFEST_FILE = "prefalign_files.json"  # {"written": [name, ...]}: files of the final save (names vary by model)
LOCK_FILE = ".prefalign.lock"  # who writes into the folder now (run_lock.RunLock); removed when it ends
# prefalign online (online/records.py)
ONLINE_CONFIG_FILE = "online_config.json"
ROUNDS_FILE = "rounds.jsonl"
# each round's pairs are read as explicit text; the held-out pairs once, with the user's data keys, into this
EVAL_PAIRS_FILE = "eval_pairs.jsonl"
SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
ROUND_TRAIN_FOLDER = "train"
AWAITING_JUDGE_EXIT_CODE = 75  # EX_TEMPFAIL: the run waits for rewards in a judge file; run it again then
INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job stopped by SIGTERM

# What makes a folder hold a run: a new run is not started over it without an explicit request.
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)

# Metric names the trainer writes and the analysis reads (the losses name their own, e.g. amapo/mu).
SHARE_CORRECT = "grad/share_correct"  # share of the per-pair gradient weight |dl/dz| on pairs ranked right
SHARE_MISRANKED = "grad/share_misranked"
SKIPPED_PREFIX = "skipped/"  # skipped/nonfinite_loss_batches, skipped/nonfinite_grad_steps
EVAL_RANKING_ACCURACY = "eval_ranking_accuracy"
# Telemetry (training/telemetry.py), per logged training step, over the training micro-batches of every process
# since the previous log (evaluation excluded):
TOKENS_PROCESSED = "tokens/processed"  # tokens the policy's forward ran on: rows x columns of its input, padding in
TOKENS_PADDING = "tokens/padding"  # how many of those were padding
PADDING_SHARE = "tokens/padding_share"  # tokens/padding / tokens/processed
INTERVAL_SECONDS = "throughput/seconds"  # the training wall time the rates are over (data loading and step included)
PAIRS_PER_SECOND = "throughput/pairs_per_second"
TOKENS_PER_SECOND = "throughput/tokens_per_second"  # processed tokens (padding in) per second
# CUDA only: the largest process's torch.cuda.max_memory_allocated since the previous log, GiB; and model FLOPs
# utilization, training FLOPs of the non-padding tokens per second over the GPUs' dense bf16 peak (known GPUs)
PEAK_ALLOCATED_GIB = "memory/peak_allocated_gib"
MFU = "throughput/mfu"

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


def read_jsonl(path, *, torn_tail: list | None = None) -> list[dict]:
    """One JSON object per line. With `torn_tail` (a list), a last line cut off mid-write (no final newline, not
    JSON: a process killed while appending) is skipped and its line number appended to the list instead of
    being an error; a bad line anywhere else is still an error."""
    rows = []
    text = _read_text(path)
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail is not None and lineno == len(lines) and not text.endswith("\n"):
                torn_tail.append(lineno)
                continue
            raise PrefalignError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PrefalignError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
        rows.append(obj)
    return rows


def read_metrics(path, *, torn_tail: list | None = None) -> list[dict]:
    """metrics.jsonl (a path to the file or to its run folder). A last line cut off by a kill is skipped with a
    warning (and its number appended to `torn_tail` when given): the steps before it are whole."""
    import logging

    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    torn: list = []
    rows = read_jsonl(path, torn_tail=torn)
    if torn:
        logging.getLogger(__name__).warning("%s: line %d is cut off (a run killed while writing it); skipped",
                                            path, torn[0])
        if torn_tail is not None:
            torn_tail.extend(torn)
    return rows


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


def replace_jsonl(rows, path) -> None:
    """Write a JSONL file atomically, as `write_json`: a reader sees the old whole file or the new one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    write_jsonl(rows, tmp)
    os.replace(tmp, path)


def round_folder(run_dir, round_number: int) -> Path:
    """`prefalign online`'s folder of one round (round 0: the start model, evaluated only)."""
    return Path(run_dir) / f"round-{round_number}"


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


def bench_result_path(run_dir, benchmark: str, score: str) -> Path:
    """Where `prefalign bench` keeps a run's result: one file per benchmark and scoring."""
    return Path(run_dir) / BENCH_FOLDER / f"{benchmark}-{score}.json"


def is_run_folder(path) -> bool:
    return (Path(os.path.expanduser(str(path))) / CONFIG_FILE).is_file()
