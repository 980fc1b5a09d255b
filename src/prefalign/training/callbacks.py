"""The trainer's callbacks: the metrics file, the non-finite gradient guard, SPO's head gradient and epoch,
and the reference pass when training begins.

`MetricsFileCallback` writes every logged step as one JSON object per line in OUTPUT_DIR/metrics.jsonl,
beside the report_to trackers."""

from __future__ import annotations

import math
import os
import time

import torch
from transformers import TrainerCallback

from ..errors import PrefalignError
from ..run_files import METRICS_FILE, TRAINED_PAIRS_FILE, append_jsonl, read_jsonl, read_metrics, write_jsonl
from .zero import global_grad_norm


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a missing value is honest
    return v


def trim_to_step(path: str, step: int, read) -> None:
    """A resumed run logs the steps after its checkpoint again: drop the lines a crashed run wrote for them, and a
    last line a kill cut off mid-write (`read`: the file's reader, taking `torn_tail`)."""
    if not os.path.exists(path):
        return
    torn: list = []
    rows = read(path, torn_tail=torn)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) < len(rows) or torn:
        write_jsonl(kept, path + ".tmp")
        os.replace(path + ".tmp", path)


class MetricsFileCallback(TrainerCallback):
    def __init__(self):
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        if state.is_world_process_zero:
            trim_to_step(os.path.join(args.output_dir, METRICS_FILE), state.global_step, read_metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        if self._t0 is not None:
            row["time_s"] = round(time.time() - self._t0, 3)
        row.update({k: _plain(v) for k, v in logs.items()})
        os.makedirs(args.output_dir, exist_ok=True)
        append_jsonl(row, os.path.join(args.output_dir, METRICS_FILE))


class TrainedPairsFile(TrainerCallback):
    """OUTPUT_DIR/trained_pairs.jsonl: per optimizer step the dataset rows (`row_index`) it trained on, over all
    processes — what the train − held-out gap and per-pair training records must be measured on (each seed
    shuffles its own pairs, so "the first N rows of the file" are mostly pairs the run never saw)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._trained_rows.clear()
        if state.is_world_process_zero:
            trim_to_step(os.path.join(args.output_dir, TRAINED_PAIRS_FILE), state.global_step, read_jsonl)

    def on_step_end(self, args, state, control, **kwargs):
        rows = list(self.trainer._trained_rows)
        self.trainer._trained_rows.clear()
        if self.trainer.accelerator.num_processes > 1:  # every rank takes part, whatever its list holds
            parts = [None] * self.trainer.accelerator.num_processes
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        if state.is_world_process_zero:
            epoch = max(0, math.ceil(state.epoch - 1e-9) - 1)  # state.epoch is fractional: k + the share done
            os.makedirs(args.output_dir, exist_ok=True)
            append_jsonl({"step": state.global_step, "epoch": epoch, "rows": rows},
                         os.path.join(args.output_dir, TRAINED_PAIRS_FILE))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP2's sharded gradients); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGradientGuard(TrainerCallback):
    """A NaN/inf gradient stops the run naming the step and rows, or (on_nonfinite=skip) drops the step.

    The decision is agreed over processes (under FSDP each holds only its shard of the gradient), and with
    fp16 it is left to the GradScaler, whose job is to skip the overflow steps a loss scale produces."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            return
        acc = self.trainer.accelerator
        if self.trainer.is_deepspeed_enabled:  # the engine has taken the step in backward: stop on its norm
            norm = global_grad_norm(self.trainer.model_wrapped)
            if norm is not None and not math.isfinite(norm):
                raise PrefalignError(f"non-finite gradient norm at step {state.global_step + 1} under DeepSpeed (dataset "
                                     f"rows {sorted(self.trainer._rows_since_step)[:20]}); the engine has applied "
                                     "it: resume from the last checkpoint with a lower learning rate")
            self.trainer._rows_since_step.clear()
            return
        # under FSDP2 a gradient is a DTensor: this process checks its own shard, the processes then agree
        grads = [_local(p.grad) for p in self.trainer.model.parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        finite = finite.to(acc.device, torch.float32)
        if acc.num_processes > 1:
            finite = acc.reduce(finite, reduction="sum") == acc.num_processes
        if bool(finite):
            self.trainer._rows_since_step.clear()
            return
        rows = sorted(self.trainer._rows_since_step)
        self.trainer._rows_since_step.clear()
        if args.on_nonfinite == "error":
            raise PrefalignError(
                f"non-finite gradient at step {state.global_step + 1} (dataset rows {rows[:20]}"
                f"{f' on process {args.process_index}' if acc.num_processes > 1 else ''}); "
                "lower the learning rate or set on_nonfinite: skip"
            )
        for p in self.trainer.model.parameters():
            p.grad = None  # the optimizer skips parameters without a gradient
        if self.trainer.spo_head is not None:
            self.trainer.spo_head.zero_grad(set_to_none=True)
        self.trainer._skipped["nonfinite_grad_steps"] += 1 if args.process_index == 0 else 0
        self.trainer._trained_rows.clear()  # the step is dropped: its pairs were not trained on


class SPOHeadGradSync(TrainerCallback):
    """The SPO head lives outside the (DDP-wrapped) model, so the Trainer neither averages its gradient over
    processes nor clears it after a step (it calls model.zero_grad()): both are done here."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return
        for p in self.trainer.spo_head.parameters():
            # Every rank takes part, a rank whose batches drew no SPO sample with zeros: a collective that
            # depended on per-rank state would hang the others.
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = acc.reduce(grad, reduction="mean")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.spo_optimizer is not None:  # DeepSpeed, FSDP: the head's own optimizer, as the model's steps
            self.trainer.spo_optimizer.step()
            self.trainer.spo_scheduler.step()
        self.trainer.spo_head.zero_grad(set_to_none=True)


class SPOEpoch(TrainerCallback):
    """SPO draws are a pure function of (seed, epoch, row, response): tell the sampler the epoch. transformers
    calls this before it creates the epoch's dataloader iterator, so DataLoader workers get it too."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(math.floor(state.epoch + 1e-6))  # a resumed run restarts inside its epoch


class DeferredSelfCheck(TrainerCallback):
    """The start-up self-check of a ZeRO-3 model, whose parameters are placeholders until `accelerator.prepare`
    has built the engine (which gathers them around each submodule's forward): when training begins."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.self_check is None:
            self.trainer.self_check = self.trainer.run_self_check()


class ReferencePass(TrainerCallback):
    """Reference log-probs (reference: precomputed) when training begins: after `accelerator.prepare`, before
    the first update, so they come from the model as it trains (device, layout, precision, engine); of the
    train pairs, those of the `state.max_steps` steps the trainer has just planned (a resumed run's included)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.prepare_reference(resuming=state.global_step > 0, steps=state.max_steps)
