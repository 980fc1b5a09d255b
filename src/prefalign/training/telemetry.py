"""Training telemetry, per logged step: what the policy's forward ran on (tokens, the padding among them, pairs),
how fast, and on CUDA the peak allocated memory and an MFU estimate. The names are in `run_files.py`.

The trainer makes four calls (`meter(trainer)` makes the meter on first use, one per `train()` call):

    meter(trainer).count(batch)          every training micro-batch, before its forward (compute_loss)
    meter(trainer).evaluation_ended()    at an evaluation's log: its time is not training time
    meter(trainer).take()                this process's sums since the last log, gathered with the other metrics
    meter(trainer).metrics(parts, trainer)   the logged values from every process's part

What is counted is the tensor the forward is given, whatever the layout: rows × columns of `packed_input_ids`
when the batch is packed (prefix sharing; padding is segment id PAD), else of `input_ids` (2B unshared rows;
padding is attention_mask 0) together with SPO's degraded rows, which ride in the same forward padded to the
wider of the two (`modeling/layout.pad_cat`); the layout's `forward_tokens` counts them. The reference
model's forwards are not counted (precomputed by default; a live reference adds 2·params·tokens that MFU
leaves out).

Nothing here synchronises the device per step: token and pair counts come from tensor shapes, and the padding
count is summed on the batch's device and read once per log.
"""

from __future__ import annotations

import logging
import re
import time

import torch

from ..modeling.layout import forward_tokens  # the layout counts what its forward runs on
from ..run_files import (
    INTERVAL_SECONDS,
    MFU,
    PADDING_SHARE,
    PAIRS_PER_SECOND,
    PEAK_ALLOCATED_GIB,
    TOKENS_PADDING,
    TOKENS_PER_SECOND,
    TOKENS_PROCESSED,
)

log = logging.getLogger(__name__)

GIB = 2**30

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s per GPU, from the vendors' datasheets, which print
# the sparse figure (twice these) with an asterisk. Matched in order against torch.cuda.get_device_name(), so
# the specific variants come before the family.
BF16_DENSE_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),  # NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity
    (r"\bGH200\b", 989.0),  # NVIDIA GH200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity
    (r"\bH200 NVL\b", 835.0),  # NVIDIA H200 datasheet, H200 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity
    (r"\bH200\b", 989.0),  # NVIDIA H200 datasheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity
    (r"\bH100 NVL\b", 835.0),  # NVIDIA H100 datasheet, H100 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity
    (r"\bH100 PCIe\b", 756.0),  # NVIDIA H100 datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity
    (r"\bH100\b", 989.0),  # NVIDIA H100 datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity
    (r"\bA100\b", 312.0),  # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe
    (r"\bL40S\b", 362.05),  # NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)
    (r"\bL4\b", 121.0),  # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    (r"\bA10G\b", 70.0),  # NVIDIA A10G datasheet (AWS G5): BF16 Tensor Core 70 TFLOPS (140 with sparsity)
    (r"\bA10\b", 125.0),  # NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity); not the A10G
)


# -- what a micro-batch's forward runs on (tokens and padding: the layout's `forward_tokens`) ----------------
def batch_pairs(batch: dict) -> int:
    return int(batch["row_index"].shape[0])


# -- FLOPs and MFU (pure arithmetic) -----------------------------------------------------------------------
def train_flops_per_token(params: int, trainable: int | None = None) -> float:
    """Model FLOPs of one training token: 2·params forward, 2·params for the activations' gradients and
    2·trainable for the weights' gradients — the usual 6·params when every parameter trains (fewer with LoRA,
    whose frozen weights get no gradient). Attention's quadratic term is left out, as in the 6·N convention."""
    trainable = params if trainable is None else trainable
    return 4.0 * params + 2.0 * trainable


def model_flops_utilization(tokens: float, seconds: float, flops_per_token: float, peak_flops: float) -> float:
    """Achieved model FLOP/s (tokens · flops_per_token / seconds) over the peak FLOP/s of all devices."""
    return tokens * flops_per_token / seconds / peak_flops


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name() names it, or None when unknown."""
    return next((tflops for pattern, tflops in BF16_DENSE_TFLOPS if re.search(pattern, device_name)), None)


def summarize(parts: list[dict], *, flops_per_token: float | None = None,
              peak_flops_per_device: float | None = None) -> dict:
    """The logged values from every process's `TrainingMeter.take()`: tokens, padding and pairs summed over
    processes, over the longest process's time; peak memory the largest process's; MFU from the non-padding
    tokens against one peak per process (one GPU each)."""
    tokens = sum(p["tokens"] for p in parts)
    if tokens == 0:
        return {}
    padding = sum(p["padding"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    out = {TOKENS_PROCESSED: tokens, TOKENS_PADDING: padding, PADDING_SHARE: padding / tokens}
    if seconds > 0:
        out[INTERVAL_SECONDS] = seconds
        out[PAIRS_PER_SECOND] = sum(p["pairs"] for p in parts) / seconds
        out[TOKENS_PER_SECOND] = tokens / seconds
        if flops_per_token and peak_flops_per_device:
            out[MFU] = model_flops_utilization(tokens - padding, seconds, flops_per_token,
                                               peak_flops_per_device * len(parts))
    peaks = [p["peak_bytes"] for p in parts if p.get("peak_bytes") is not None]
    if peaks:
        out[PEAK_ALLOCATED_GIB] = max(peaks) / GIB
    return out


# -- the meter ---------------------------------------------------------------------------------------------
class CudaProbe:
    """The few CUDA calls telemetry makes (the tests give a stand-in: no GPU there)."""

    def __init__(self, device):
        self.device = device

    @classmethod
    def of(cls, device) -> CudaProbe | None:
        return cls(device) if torch.device(device).type == "cuda" else None

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def take_peak(self) -> int:
        """torch.cuda.max_memory_allocated since the last reset (bytes), and reset it."""
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


class TrainingMeter:
    """One process's counts between logs, and the training time they took.

    The time of an interval is the wall time from the previous log (the first: from the first training
    forward) to this one: data loading, forward, backward, optimizer step and logging, on every process alike.
    Evaluations are taken out: an evaluation's log subtracts the time since the last moment known to be training
    (the previous log when the evaluation follows a logged step, as it does with eval_steps a multiple of
    logging_steps; otherwise the last training forward's start, so that one micro-batch's forward, backward and
    step are taken out with it). Checkpoint saves are not taken out: a log interval with a save includes it."""

    def __init__(self, state=None, *, cuda: CudaProbe | None = None, clock=time.perf_counter):
        self.state = state  # the TrainerState of the train() call it measures
        self.cuda = cuda
        self.clock = clock
        self.start: float | None = None  # the interval's start: the first training forward, then each log
        self.mark: float | None = None  # the last moment known to be training time
        self.paused = 0.0  # evaluation time inside the interval
        self.tokens = self.pairs = 0
        self.padding: int | torch.Tensor = 0
        self._flops: tuple[float, float] | None | bool = False  # (flops per token, peak FLOP/s), None: no MFU

    def count(self, batch: dict) -> None:
        now = self.clock()
        if self.start is None:
            self.start = now
            if self.cuda is not None:
                self.cuda.reset_peak()  # model loading and the reference pass are not training's peak
        self.mark = now
        tokens, padding = forward_tokens(batch)
        self.tokens += tokens
        self.padding = self.padding + padding
        self.pairs += batch_pairs(batch)

    def evaluation_ended(self) -> None:
        if self.start is None:
            return
        now = self.clock()
        self.paused += now - self.mark
        self.mark = now

    def take(self) -> dict:
        """This process's sums since the last log (plain numbers, to gather), and a new interval begins."""
        now = self.clock()
        part = {"tokens": self.tokens, "padding": int(self.padding), "pairs": self.pairs,
                "seconds": 0.0 if self.start is None else now - self.start - self.paused,
                "peak_bytes": None if self.cuda is None or self.start is None else self.cuda.take_peak()}
        self.tokens = self.pairs = 0
        self.padding = 0
        self.paused = 0.0
        if self.start is not None:
            self.start = self.mark = now
        return part

    def metrics(self, parts: list[dict], trainer) -> dict:
        if self._flops is False:
            self._flops = self._model_flops(trainer) if self.cuda is not None else None
        flops_per_token, peak = self._flops or (None, None)
        return summarize(parts, flops_per_token=flops_per_token, peak_flops_per_device=peak)

    def _model_flops(self, trainer) -> tuple[float, float] | None:
        """(training FLOPs per token, the GPU's dense bf16 peak FLOP/s), said once; None, said once, without."""
        say = log.info if trainer.is_world_process_zero() else log.debug
        name = self.cuda.name()
        tflops = bf16_peak_tflops(name)
        if tflops is None:
            (log.warning if trainer.is_world_process_zero() else log.debug)(
                "no MFU (%s): %s is not in prefalign's table of dense bf16 peaks (training/telemetry.py)", MFU, name)
            return None
        if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
            say("no MFU (%s): FSDP1's flat sharded parameters do not give the model's size here", MFU)
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = list(model.parameters())  # DTensors (FSDP2) count their whole size
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        half = (torch.bfloat16, torch.float16)
        low = not (trainer.args.bf16 or trainer.args.fp16) and bool(params) and params[0].dtype not in half
        say("%s (model FLOPs utilization) is against %s's dense bf16 peak, %g TFLOP/s per GPU (vendor datasheet), "
            "times %d processes; %.3g FLOPs per non-padding token (%d parameters, %d trainable)%s", MFU, name, tflops,
            trainer.accelerator.num_processes, train_flops_per_token(total, trainable), total, trainable,
            "; this run computes in float32, so the bf16 peak is above what it can reach" if low else "")
        return train_flops_per_token(total, trainable), tflops * 1e12


def meter(trainer) -> TrainingMeter:
    """The trainer's meter for its current train() call (transformers makes a new TrainerState for each)."""
    current = getattr(trainer, "_telemetry", None)
    if current is None or current.state is not trainer.state:
        current = trainer._telemetry = TrainingMeter(trainer.state, cuda=CudaProbe.of(trainer.args.device))
    return current
