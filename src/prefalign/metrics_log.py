"""Every logged step as one JSON object per line in OUTPUT_DIR/metrics.jsonl, beside the report_to trackers."""

from __future__ import annotations

import json
import math
import os
import time

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a missing value is honest
    return v


class MetricsFileCallback(TrainerCallback):
    def __init__(self):
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        path = os.path.join(args.output_dir, METRICS_FILE)
        if state.is_world_process_zero and os.path.exists(path):
            # A resumed run re-logs the steps after its checkpoint: drop the rows the crashed run wrote for them.
            rows = read_metrics(path)
            kept = [r for r in rows if r.get("step", 0) <= state.global_step]
            if len(kept) < len(rows):
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(path + ".tmp", path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        if self._t0 is not None:
            row["time_s"] = round(time.time() - self._t0, 3)
        row.update({k: _plain(v) for k, v in logs.items()})
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
