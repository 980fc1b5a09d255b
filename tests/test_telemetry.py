"""Training telemetry (training/telemetry.py): tokens the forward ran on and the padding among them, counted by
hand for known batches in every layout and against the tensor the model is given; the metrics.jsonl rows and
the console line of a short run; the interval's time without evaluations; MFU and the GPU table in closed
form; the CUDA branch through a stand-in probe (no GPU here); and two processes summed."""

from __future__ import annotations

import inspect
import logging
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import shared_path, write_hh_pairs

from prefalign.data.collate import PairCollator, pad_sequences
from prefalign.modeling.packing import PrefixSharedCollator
from prefalign.run_files import (
    INTERVAL_SECONDS,
    MFU,
    PADDING_SHARE,
    PAIRS_PER_SECOND,
    PEAK_ALLOCATED_GIB,
    TOKENS_PADDING,
    TOKENS_PER_SECOND,
    TOKENS_PROCESSED,
    read_metrics,
)
from prefalign.training.telemetry import (
    GIB,
    TrainingMeter,
    bf16_peak_tflops,
    forward_tokens,
    meter,
    model_flops_utilization,
    summarize,
    train_flops_per_token,
)

PAD_ID = 0


def _pair(i: int, prompt: int, chosen: int, rejected: int, **extra) -> dict:
    ids = iter(range(1, 1000))
    return {"row_index": i, "prompt_input_ids": [next(ids) for _ in range(prompt)],
            "chosen_input_ids": [next(ids) for _ in range(chosen)],
            "rejected_input_ids": [next(ids) for _ in range(rejected)], **extra}


# pair 0: prompt 3, chosen 2, rejected 4; pair 1: prompt 5, chosen 1, rejected 1
ROWS = [_pair(0, 3, 2, 4), _pair(1, 5, 1, 1)]


def _counts(batch) -> tuple[int, int]:
    tokens, padding = forward_tokens(batch)
    return int(tokens), int(padding)


# -- exact counts, by hand -----------------------------------------------------------------------------------
def test_unshared_layout_counts_2b_rows_by_hand():
    """2B rows prompt+completion: 3+2=5, 5+1=6 (chosen), 3+4=7, 5+1=6 (rejected), padded to 7: 4 x 7 = 28
    tokens, 24 real, 4 padding."""
    batch = PairCollator(PAD_ID)(ROWS)
    assert tuple(batch["input_ids"].shape) == (4, 7)
    assert _counts(batch) == (28, 4)


def test_prefix_shared_layout_counts_packed_rows_by_hand():
    """One row per pair, prompt + chosen + rejected: 3+2+4=9 and 5+1+1=7, padded to 9: 2 x 9 = 18 tokens, 2
    padding. The unshared keys the batch also carries (for the reference pass) are not what the model runs."""
    batch = PrefixSharedCollator(PAD_ID)(ROWS)
    assert "input_ids" in batch and tuple(batch["packed_input_ids"].shape) == (2, 9)
    assert _counts(batch) == (18, 2)


def test_padding_free_rows_count_by_hand():
    """Several pairs per row (padding_free): 9, 4 and 5 tokens into rows of at most the longest pair, 9:
    [pair 0] and [pair 2, pair 1] -> 2 x 9 = 18 tokens, no padding (one pair per row would be 3 x 9, 9 padding)."""
    if "padding_free" not in inspect.signature(PrefixSharedCollator).parameters:
        pytest.skip("PrefixSharedCollator has no padding_free yet")
    rows = [_pair(0, 3, 2, 4), _pair(1, 2, 1, 1), _pair(2, 2, 1, 2)]
    assert _counts(PrefixSharedCollator(PAD_ID)(rows)) == (27, 9)
    assert _counts(PrefixSharedCollator(PAD_ID, padding_free=True)(rows)) == (18, 0)


def test_spo_degraded_rows_count_in_both_layouts():
    """Unshared: SPO's degraded rows (prompt 3 + 1, 3 + 3, 5 + 4) join the 4 pair rows in one forward, padded
    to the wider: 7 rows x 9 = 63 tokens, 24 + 4 + 6 + 9 = 43 real, 20 padding. Packed: the degraded
    completions are segments of their pair's row: 3+2+4+1+3 = 13 and 7, 2 x 13 = 26 tokens, 6 padding."""
    batch = PairCollator(PAD_ID)(ROWS)
    spo = pad_sequences([([1, 2, 3], [9]), ([1, 2, 3], [9, 9, 9]), ([1, 2, 3, 4, 5], [9, 9, 9, 9])], PAD_ID)
    batch.update(spo_input_ids=spo["input_ids"], spo_attention_mask=spo["attention_mask"], spo_labels=spo["labels"],
                 spo_source=torch.tensor([0, 2, 1]), spo_degrees=torch.tensor([1, 2, 1]))
    assert _counts(batch) == (63, 20)
    packed = PrefixSharedCollator(PAD_ID)([{**ROWS[0], "extra_completion_ids": [[9], [9, 9, 9]]}, ROWS[1]])
    assert tuple(packed["packed_input_ids"].shape) == (2, 13)
    assert _counts(packed) == (26, 6)


# -- the count is what the model is given ---------------------------------------------------------------------
COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "4",
          "--max_length", "96", "--max_prompt_length", "48", "--seed", "0", "--disable_tqdm", "true",
          "--loss_type", "simpo"]


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    return write_hh_pairs(tmp_path_factory.mktemp("telemetry"), 20)


def _trainer(data, out, *extra):
    from prefalign.config import load_config
    from prefalign.training.pipeline import build_trainer, load_policy, prepare_data

    cfg = load_config(None, ["--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset", str(data),
                             "--output_dir", str(out), *COMMON, *extra])
    model, tok = load_policy(cfg)
    return build_trainer(cfg, model, tok, prepare_data(cfg, tok))


class ForwardRecorder:
    """What the model's forward is given, in training mode: (step, input_ids rows x columns, padding when the
    mask is 2-D)."""

    def __init__(self, model, state=lambda: None):
        self.calls: list[tuple] = []
        self.state = state
        self.on = False
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.on or not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        padding = int((mask == 0).sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.calls.append((self.state(), ids.numel(), padding))


@pytest.mark.parametrize("layout", [["--prefix_sharing", "false"], ["--prefix_sharing", "true"],
                                    ["--prefix_sharing", "false", "--use_spo"], ["--prefix_sharing", "true", "--use_spo"]],
                         ids=["unshared", "packed", "spo-unshared", "spo-packed"])
def test_counted_tokens_are_the_tensor_the_model_is_given(layout, hh_file, tmp_path):
    """Through the trainer's compute_loss, in each layout it builds: the counted tokens equal rows x columns of
    input_ids as the model's forward receives them (SPO's degraded rows included), and where the forward
    takes a 2-D mask its zeros equal the counted padding. Whatever layout the collator makes next, this holds
    or fails here."""
    trainer = _trainer(hh_file, tmp_path / "run", "--max_train_samples", "8", *layout)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    if "--use_spo" in layout:
        assert len(batch["spo_degrees"]) > 0
    recorder = ForwardRecorder(trainer.model)
    recorder.on = True
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    part = meter(trainer).take()
    assert len(recorder.calls) == 1
    _, numel, padding = recorder.calls[0]
    assert part["tokens"] == numel and part["pairs"] == 4
    if padding is not None:
        assert part["padding"] == padding
    else:
        assert part["padding"] == int((batch["packed_segment_ids"] < 0).sum())
    assert 0 <= part["padding"] < part["tokens"]


# -- a short run: metrics.jsonl and the console -------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["false", "true"])
def test_two_step_run_logs_telemetry(sharing, hh_file, tmp_path, capsys, monkeypatch):
    """2 steps, logged every step, an evaluation after each that takes at least 1 s: every train row carries
    the tokens the training forwards were given (and only those: evaluation runs forwards too), the padding
    share, pairs/s over an interval that leaves the evaluation out, and on a CPU no memory or MFU."""
    from prefalign.training.trainer import PreferenceTrainer

    score = PreferenceTrainer.score

    def slow_score(self, *args, **kwargs):
        time.sleep(1.0)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceTrainer, "score", slow_score)
    trainer = _trainer(hh_file, tmp_path / "run", "--max_steps", "2", "--logging_steps", "1", "--prefix_sharing",
                       sharing, "--per_device_train_batch_size", "2", "--eval_dataset", str(hh_file),
                       "--max_eval_samples", "4", "--eval_strategy", "steps", "--eval_steps", "1")
    recorder = ForwardRecorder(trainer.model, lambda: trainer.state.global_step)
    recorder.on = True
    trainer.train()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        step = [c for c in recorder.calls if c[0] == row["step"] - 1]  # the forwards of this step
        assert len(step) == 1
        assert row[TOKENS_PROCESSED] == step[0][1]
        if sharing == "false":
            assert row[TOKENS_PADDING] == step[0][2]
        assert 0 <= row[PADDING_SHARE] <= 1 and row[PADDING_SHARE] == row[TOKENS_PADDING] / row[TOKENS_PROCESSED]
        assert row[INTERVAL_SECONDS] > 0 and row[PAIRS_PER_SECOND] > 0
        assert row[PAIRS_PER_SECOND] == pytest.approx(2 / row[INTERVAL_SECONDS])
        assert row[TOKENS_PER_SECOND] == pytest.approx(row[TOKENS_PROCESSED] / row[INTERVAL_SECONDS])
        assert PEAK_ALLOCATED_GIB not in row and MFU not in row  # no GPU: no numbers
    # the evaluation after step 1 (>= 1 s) is not in step 2's interval
    assert rows[1][INTERVAL_SECONDS] < rows[1]["time_s"] - rows[0]["time_s"] - 0.9
    assert sum(1 for r in read_metrics(tmp_path / "run") if "eval_ranking_accuracy" in r) == 2
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(lines) == 2 and all("pairs/s " in line and " pad " in line and "%" in line for line in lines)


def test_console_line_shows_pairs_per_second_and_padding():
    from prefalign.training.console import train_line

    line = train_line({"loss": 0.5, PAIRS_PER_SECOND: 0.3314, PADDING_SHARE: 0.123}, 3, 10)
    assert line.endswith("pairs/s 0.331  pad 12%")
    assert "pairs/s 1234 " in train_line({"loss": 0.5, PAIRS_PER_SECOND: 1234.4, PADDING_SHARE: 0.0}, 3, 10)


# -- the interval's time -------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interval_time_leaves_evaluations_out():
    """From the first forward to the log; then from log to log, less each evaluation: one that follows a log
    exactly, one after an unlogged step from the last forward's start."""
    clock = Clock()
    m = TrainingMeter(clock=clock)
    batch = PairCollator(PAD_ID)(ROWS)
    clock.now = 5.0
    m.evaluation_ended()  # an evaluation before training: nothing to take out
    clock.now = 10.0
    m.count(batch)
    clock.now = 12.0
    m.count(batch)
    clock.now = 16.0
    first = m.take()  # log at 16
    assert first["seconds"] == 6.0 and first["tokens"] == 56 and first["padding"] == 8 and first["pairs"] == 4
    clock.now = 19.0
    m.evaluation_ended()  # evaluation right after the log: 3 s
    clock.now = 20.0
    m.count(batch)
    clock.now = 23.0
    m.evaluation_ended()  # evaluation after an unlogged step: from the forward at 20
    clock.now = 24.0
    m.count(batch)
    clock.now = 26.0
    second = m.take()
    assert second["seconds"] == (26.0 - 16.0) - 3.0 - 3.0 and second["pairs"] == 4
    assert m.take()["tokens"] == 0


# -- MFU and the GPU table, in closed form ------------------------------------------------------------------
def test_flops_per_token_and_mfu_in_closed_form():
    assert train_flops_per_token(1_000_000_000) == 6e9  # 6·N: every parameter trains
    assert train_flops_per_token(1_000_000_000, 4_000_000) == 4e9 + 8e6  # LoRA: frozen weights get no gradient
    # 8 H200s at their 989 TFLOP/s, a 7B model, 94,200 non-padding tokens/s: 6·7e9·94200 / (8·989e12)
    assert model_flops_utilization(94_200 * 10, 10.0, 6 * 7e9, 8 * 989e12) == pytest.approx(0.5, rel=1e-3)
    parts = [{"tokens": 600, "padding": 100, "pairs": 3, "seconds": 1.5, "peak_bytes": 3 * GIB},
             {"tokens": 400, "padding": 0, "pairs": 3, "seconds": 2.0, "peak_bytes": 5 * GIB}]
    out = summarize(parts, flops_per_token=6e9, peak_flops_per_device=989e12)
    assert out == {TOKENS_PROCESSED: 1000, TOKENS_PADDING: 100, PADDING_SHARE: 0.1, INTERVAL_SECONDS: 2.0,
                   PAIRS_PER_SECOND: 3.0, TOKENS_PER_SECOND: 500.0, PEAK_ALLOCATED_GIB: 5.0,
                   MFU: pytest.approx(900 / 2.0 * 6e9 / (2 * 989e12))}
    cpu = summarize([{**p, "peak_bytes": None} for p in parts])  # no probe: neither memory nor MFU
    assert PEAK_ALLOCATED_GIB not in cpu and MFU not in cpu


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA B200", 2250.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("NVIDIA L40", None), ("Tesla V100-SXM2-16GB", None), ("Tesla T4", None),
])
def test_gpu_table_matches_the_names_torch_reports(name, tflops):
    assert bf16_peak_tflops(name) == tflops


# -- the CUDA branch, through a stand-in probe ------------------------------------------------------------------
class FakeProbe:
    def __init__(self, name, peaks):
        self._name, self.peaks, self.resets = name, list(peaks), 0

    def name(self):
        return self._name

    def reset_peak(self):
        self.resets += 1

    def take_peak(self):
        return self.peaks.pop(0)


def _fake_trainer(model, *, bf16=True):
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, num_processes=1, is_fsdp2=False)
    return SimpleNamespace(is_world_process_zero=lambda: True, is_fsdp_enabled=False, accelerator=accelerator,
                           model=model, args=SimpleNamespace(bf16=bf16, fp16=False))


def test_cuda_branch_logs_peak_memory_and_mfu_naming_the_gpu_once(caplog):
    model = torch.nn.Linear(10, 10)  # 110 parameters
    model.bias.requires_grad_(False)  # 100 trainable: 4·110 + 2·100 = 640 FLOPs per token
    clock = Clock()
    m = TrainingMeter(cuda=FakeProbe("NVIDIA H200", [2 * GIB, GIB // 2]), clock=clock)
    batch = PairCollator(PAD_ID)(ROWS)  # 28 tokens, 4 padding
    trainer = _fake_trainer(model)
    with caplog.at_level(logging.INFO, logger="prefalign.training.telemetry"):
        m.count(batch)
        assert m.cuda.resets == 1  # the peak since training began, not since the model loaded
        clock.now = 2.0
        first = m.metrics([m.take()], trainer)
        m.count(batch)
        clock.now = 3.0
        second = m.metrics([m.take()], trainer)
    assert first[PEAK_ALLOCATED_GIB] == 2.0 and second[PEAK_ALLOCATED_GIB] == 0.5
    assert first[MFU] == pytest.approx(24 / 2.0 * 640 / 989e12)
    assert second[MFU] == pytest.approx(24 / 1.0 * 640 / 989e12)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "NVIDIA H200" in said[0] and "989 TFLOP/s" in said[0] and MFU in said[0]


def test_unknown_gpu_gets_memory_but_no_mfu_and_says_so_once(caplog):
    m = TrainingMeter(cuda=FakeProbe("Tesla V100-SXM2-16GB", [GIB, GIB]), clock=Clock())
    batch = PairCollator(PAD_ID)(ROWS)
    trainer = _fake_trainer(torch.nn.Linear(2, 2))
    with caplog.at_level(logging.INFO, logger="prefalign.training.telemetry"):
        for _ in range(2):
            m.count(batch)
            m.clock.now += 1.0
            out = m.metrics([m.take()], trainer)
            assert out[PEAK_ALLOCATED_GIB] == 1.0 and MFU not in out
    said = [r for r in caplog.records]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "Tesla V100-SXM2-16GB" in said[0].getMessage()


def test_fp32_run_is_told_the_bf16_peak_is_out_of_reach(caplog):
    m = TrainingMeter(cuda=FakeProbe("NVIDIA A100-SXM4-80GB", [GIB]), clock=Clock())
    m.count(PairCollator(PAD_ID)(ROWS))
    m.clock.now = 1.0
    with caplog.at_level(logging.INFO, logger="prefalign.training.telemetry"):
        out = m.metrics([m.take()], _fake_trainer(torch.nn.Linear(2, 2), bf16=False))
    assert MFU in out and "float32" in caplog.records[0].getMessage()


# -- two processes -------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_two_processes_sum_their_tokens_and_pairs(hh_file, tmp_path):
    """2 processes x 2 pairs against 1 process x 2 pairs x 2 accumulation steps: the same micro-batches (the
    seeded sampler's batches 2k and 2k+1 go to rank 0 and 1, or to the two micro-batches of step k), so every
    logged step has the same tokens and padding, and 4 pairs over its interval, in both."""
    from test_multiprocess import accelerate_launch, finish

    from prefalign.cli import main as cli_main

    model = shared_path("models", "stories260K")
    flags = ["--model_name_or_path", str(model), "--dataset", str(hh_file), *COMMON, "--max_steps", "2",
             "--logging_steps", "1", "--per_device_train_batch_size", "2"]
    proc = accelerate_launch("-m", "prefalign.cli", "train", *flags, "--output_dir", str(tmp_path / "two"),
                             log=tmp_path / "two.log")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["train", *flags, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    finish(proc, tmp_path / "two.log")
    two, one = ([r for r in read_metrics(tmp_path / k) if "loss" in r] for k in ("two", "one"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        assert a[TOKENS_PROCESSED] == b[TOKENS_PROCESSED] and a[TOKENS_PADDING] == b[TOKENS_PADDING]
        for row in (a, b):
            assert row[PAIRS_PER_SECOND] * row[INTERVAL_SECONDS] == pytest.approx(4)
