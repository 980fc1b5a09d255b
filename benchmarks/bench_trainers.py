"""Throughput and peak memory of prefalign's trainer against TRL's, on the same model, data, batches and lengths.

    pip install trl            # the peer measured against; this script installs nothing
    python benchmarks/bench_trainers.py                    # the full run (see benchmarks/README.md)
    python benchmarks/bench_trainers.py --quick            # tiny model, fp32, a few steps: a smoke test
    python benchmarks/bench_trainers.py --cases smollm2-uf1024:fp32,smollm2-uf1024:bf16   # the long case

Every trainer runs in its own fresh process (peak RSS = that process's ru_maxrss), on the same pairs in the
same order (sequential sampling), tokenized once by prefalign so both see identical token ids and lengths.
Step time = the gap between consecutive `on_step_end` callbacks (data, forward, backward, optimizer, all of
it); pairs/s = batch pairs / median step time over the timed steps after the warm-up steps. The loss of every
step is recorded unrounded (around `compute_loss`) so the losses of the two implementations can be compared.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"
UF = SHARED / "data" / "ultrafeedback" / "train_prefs_500.jsonl"
STORIES = SHARED / "models" / "stories260K"
RESULT = "BENCH_RESULT "

# Case name (before ":precision") -> model, data and its own defaults for the flags left unset. The short cases
# are the ones measured since 2026-11 (HH-RLHF, batch 2, 256 tokens); smollm2-uf1024 is issue 29's long case,
# at the lengths users train (UltraFeedback, batch 8, 1024 tokens, prompt cut to 512).
CASES = {
    "smollm2": {"model": "smollm2-135m-instruct", "data": HH, "comparisons": "short", "batch": 2,
                "max_length": 256, "max_prompt_length": 128, "warmup": 1, "steps": 3},
    "tiny": {"model": str(STORIES), "data": HH, "comparisons": "short", "batch": 2, "max_length": 256,
             "max_prompt_length": 128, "warmup": 1, "steps": 8},
    "smollm2-uf1024": {"model": "smollm2-135m-instruct", "data": UF, "comparisons": "long", "batch": 8,
                       "max_length": 1024, "max_prompt_length": 512, "warmup": 1, "steps": 3},
}

# name -> (implementation, prefalign loss or TRL trainer, use_spo, prefix sharing, other config settings).
# prefalign's plain names run its defaults (prefix sharing and padding-free packing on wherever they are exact
# for the model: both models here); "-unshared" turns prefix sharing off (and with it padding-free packing),
# "-no-padding-free" keeps prefix sharing with one pair per row, "-gc" turns on gradient checkpointing. TRL's
# trainers run with gradient checkpointing off (TRL's default is on) unless named "-gc".
TRAINERS = {
    "trl-dpo": ("trl", "dpo", False, False, {}),
    "trl-dpo-gc": ("trl", "dpo", False, False, {"gradient_checkpointing": True}),
    "trl-dpo-precomputed": ("trl", "dpo-precomputed", False, False, {}),
    "prefalign-dpo": ("prefalign", "dpo", False, None, {}),
    "prefalign-dpo-no-padding-free": ("prefalign", "dpo", False, None, {"padding_free": False}),
    "prefalign-dpo-unshared": ("prefalign", "dpo", False, False, {}),
    "prefalign-dpo-gc": ("prefalign", "dpo", False, None, {"gradient_checkpointing": True}),
    # the layouts' effect where the variants without gradient checkpointing do not fit in memory (the long case)
    "prefalign-dpo-gc-no-padding-free": ("prefalign", "dpo", False, None,
                                         {"gradient_checkpointing": True, "padding_free": False}),
    "prefalign-dpo-gc-unshared": ("prefalign", "dpo", False, False, {"gradient_checkpointing": True}),
    "trl-cpo-simpo": ("trl", "cpo-simpo", False, False, {}),
    "trl-cpo-simpo-gc": ("trl", "cpo-simpo", False, False, {"gradient_checkpointing": True}),
    "prefalign-simpo": ("prefalign", "simpo", False, None, {}),
    "prefalign-simpo-no-padding-free": ("prefalign", "simpo", False, None, {"padding_free": False}),
    "prefalign-simpo-unshared": ("prefalign", "simpo", False, False, {}),
    "prefalign-amapo": ("prefalign", "amapo", False, None, {}),
    "prefalign-amapo-unshared": ("prefalign", "amapo", False, False, {}),
    "prefalign-amapo+spo": ("prefalign", "amapo", True, None, {}),
    "prefalign-amapo+spo-unshared": ("prefalign", "amapo", True, False, {}),
}
# Per case kind: (prefalign trainer, TRL trainer it is compared with, speed target, memory target, whether the
# losses must agree). A None target is shown without a verdict (the row shows what a variant changes).
MEMORY_TARGET = 0.75  # the short cases' memory target
COMPARISONS = {
    "short": [
        ("prefalign-dpo", "trl-dpo", 1.5, MEMORY_TARGET, True),
        ("prefalign-dpo-unshared", "trl-dpo", 1.5, MEMORY_TARGET, True),
        ("prefalign-dpo", "trl-dpo-precomputed", None, MEMORY_TARGET, True),
        ("prefalign-simpo", "trl-cpo-simpo", 2.0, MEMORY_TARGET, True),
        ("prefalign-simpo-unshared", "trl-cpo-simpo", 2.0, MEMORY_TARGET, True),
        ("prefalign-amapo", "trl-cpo-simpo", 2.0, MEMORY_TARGET, False),
        ("prefalign-amapo-unshared", "trl-cpo-simpo", 2.0, MEMORY_TARGET, False),
        ("prefalign-amapo+spo", "trl-cpo-simpo", 2.0, MEMORY_TARGET, False),
        ("prefalign-amapo+spo-unshared", "trl-cpo-simpo", 2.0, MEMORY_TARGET, False),
    ],
    "long": [  # issue 29: at the lengths users train, >= 2.5x DPOTrainer and >= 2x CPOTrainer at <= 0.6x memory
        ("prefalign-dpo", "trl-dpo", 2.5, 0.6, True),
        ("prefalign-dpo-no-padding-free", "trl-dpo", None, None, True),
        ("prefalign-dpo-unshared", "trl-dpo", None, None, True),
        ("prefalign-dpo-gc", "trl-dpo", None, None, True),
        # TRL at its own default (gradient checkpointing on), where it fits in memory only that way
        ("prefalign-dpo", "trl-dpo-gc", 2.5, 0.6, True),
        ("prefalign-dpo-gc", "trl-dpo-gc", None, None, True),
        ("prefalign-dpo-gc-no-padding-free", "trl-dpo-gc", None, None, True),
        ("prefalign-dpo-gc-unshared", "trl-dpo-gc", None, None, True),
        ("prefalign-simpo", "trl-cpo-simpo", 2.0, 0.6, True),
        ("prefalign-simpo-no-padding-free", "trl-cpo-simpo", None, None, True),
        ("prefalign-simpo-unshared", "trl-cpo-simpo", None, None, True),
        ("prefalign-amapo", "trl-cpo-simpo", 2.0, 0.6, False),
        ("prefalign-simpo", "trl-cpo-simpo-gc", 2.0, 0.6, True),
        ("prefalign-amapo", "trl-cpo-simpo-gc", 2.0, 0.6, False),
    ],
}
# What one setting changes against prefalign's defaults, same loss: (variant, default)
VARIANTS = [("prefalign-dpo-no-padding-free", "prefalign-dpo"), ("prefalign-dpo-unshared", "prefalign-dpo"),
            ("prefalign-dpo-gc", "prefalign-dpo"), ("prefalign-dpo-gc-no-padding-free", "prefalign-dpo-gc"),
            ("prefalign-dpo-gc-unshared", "prefalign-dpo-gc"), ("prefalign-simpo-no-padding-free", "prefalign-simpo"),
            ("prefalign-simpo-unshared", "prefalign-simpo")]
# SPO's step-time overhead over its base loss in the same layout (issue 5's target: at most 1.6x)
SPO_OVERHEAD = [("prefalign-amapo+spo", "prefalign-amapo"), ("prefalign-amapo+spo-unshared", "prefalign-amapo-unshared")]
SPO_OVERHEAD_TARGET = 1.6
BETAS = {"dpo": 0.1, "simpo": 2.0}  # prefalign's defaults, given to TRL explicitly
SIMPO_GAMMA = 0.5


# ---------------------------------------------------------------------------------------------------------
# Child process: one trainer, a few steps
# ---------------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Recorder:
    """Step timestamps (a TrainerCallback), unrounded per-step losses and per-batch token counts."""

    def __init__(self):
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []  # non-padding tokens the model runs on (policy forward+backward)
        self.padded: list[int] = []  # the same with padding: rows x width
        self.start = self.cpu_start = None
        self.rss_phases: dict[str, float] = {}  # peak RSS (MB) at the end of each phase, in order

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                rec.start, rec.cpu_start = time.perf_counter(), time.process_time()
                rec.rss_phases["train begins"] = _rss_mb()  # after prefalign's reference pass (a callback before)

            def on_step_end(self, args, state, control, **kwargs):
                rec.ends.append(time.perf_counter())
                rec.cpu_ends.append(time.process_time())
                # step 1 runs before AdamW's states exist: the second step's peak is higher by their size
                rec.rss_phases["step 1" if state.global_step == 1 else "last step"] = _rss_mb()

        return StepClock()

    def wrap_loss(self, trainer):
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

        trainer.compute_loss = compute_loss

    def wrap_collator(self, trainer, count):
        rec = self

        class Counted:  # the trainer's collator, counting; its attributes (the reference pass reads them) kept
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                if name == "inner":  # not set yet (unpickling in a dataloader worker)
                    raise AttributeError(name)
                return getattr(self.inner, name)

            def __call__(self, rows):
                batch = self.inner(rows)
                real, padded = count(batch)
                rec.tokens.append(int(real))
                rec.padded.append(int(padded))
                return batch

        trainer.data_collator = Counted(trainer.data_collator)


def _mask_tokens(*masks):
    return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)


def _prefalign_tokens(batch):
    """(real, computed) tokens of the forward, as the layout counts them (SPO's unshared extra rows are padded
    to the pair rows' width: they run in the same forward)."""
    from prefalign.modeling.layout import forward_tokens

    tokens, padding = forward_tokens(batch)
    return tokens - int(padding), tokens


def _child_prefalign(spec: dict, rec: _Recorder):
    import torch

    from prefalign.config import load_config
    from prefalign.models import load_model, load_tokenizer
    from prefalign.training import reference as reference_cache
    from prefalign.training.pipeline import build_trainer, prepare_data

    _, loss, spo, ps, extra = TRAINERS[spec["trainer"]]
    overrides = {
        "model_name_or_path": spec["model"], "dataset": spec["data"], "output_dir": spec["workdir"],
        "loss_type": loss, "use_spo": spo, "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "logging_steps": 10_000, "disable_tqdm": True, "seed": 0,
        "per_device_train_batch_size": spec["batch"], "per_device_eval_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": spec["lr"], "max_steps": spec["warmup"] + spec["steps"],
        "max_length": spec["max_length"], "max_prompt_length": spec["max_prompt_length"],
        "bf16": spec["precision"] == "bf16", "train_sampling_strategy": "sequential",
        "ref_cache_dir": str(Path(spec["workdir"]) / "ref-cache"),
    }
    if ps is not None:
        overrides["prefix_sharing"] = ps
    overrides.update(extra)
    cfg = load_config(None, overrides)
    tok = load_tokenizer(spec["model"])
    model = load_model(spec["model"], dtype=torch.float32)
    rec.rss_phases["model loaded"] = _rss_mb()
    data = prepare_data(cfg, tok)

    timing = {"reference_s": 0.0}
    compute = reference_cache.score_missing

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return compute(*args, **kwargs)
        finally:
            timing["reference_s"] += time.perf_counter() - t

    reference_cache.score_missing = timed
    trainer = build_trainer(cfg, model, tok, data)
    return trainer, model, len(data.train), timing, _prefalign_tokens  # the pass runs when training begins


def _trl_args(spec: dict, cls, **extra):
    gc = TRAINERS[spec["trainer"]][4].get("gradient_checkpointing", False)
    return cls(
        output_dir=spec["workdir"], use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10_000, disable_tqdm=True, seed=0, per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], max_steps=spec["warmup"] + spec["steps"],
        bf16=spec["precision"] == "bf16", train_sampling_strategy="sequential",
        gradient_checkpointing=gc,  # TRL's default is True; prefalign's (transformers') is False
        max_length=spec["max_length"], **extra,
    )


def _child_trl(spec: dict, rec: _Recorder):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from prefalign.data import load_preference_data, tokenize_pairs
    from prefalign.models import load_tokenizer, resolve_model_path

    kind = TRAINERS[spec["trainer"]][1]
    tok = load_tokenizer(spec["model"])
    pairs = load_preference_data(spec["data"], tokenizer=tok)
    tokenized, _ = tokenize_pairs(pairs.dataset, tok, max_length=spec["max_length"],
                                  max_prompt_length=spec["max_prompt_length"])
    prompts, chosens, rejecteds = (tokenized[c] for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec["model"]), dtype=torch.float32)
    rec.rss_phases["model loaded"] = _rss_mb()
    t0 = time.perf_counter()
    if kind.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPO(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids, from prefalign's tokenizer

        args = _trl_args(spec, DPOConfig, beta=BETAS["dpo"], loss_type=["sigmoid"],
                         precompute_ref_log_probs=kind == "dpo-precomputed")
        train = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosens, "rejected_ids": rejecteds})
        trainer = PretokenizedDPO(model=model, args=args, train_dataset=train, processing_class=tok)

        def count(batch):
            return _mask_tokens(batch["attention_mask"])
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        class PretokenizedCPO(CPOTrainer):
            def tokenize_row(self, feature, model=None):
                p, c, r = feature["p_ids"], feature["c_ids"], feature["r_ids"]
                out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
                for side, comp in (("chosen", c), ("rejected", r)):
                    out[f"{side}_input_ids"] = p + comp
                    out[f"{side}_attention_mask"] = [1] * (len(p) + len(comp))
                    out[f"{side}_labels"] = [-100] * len(p) + comp
                return out

        args = _trl_args(spec, CPOConfig, loss_type="simpo", cpo_alpha=0.0, beta=BETAS["simpo"],
                         simpo_gamma=SIMPO_GAMMA)
        n = len(prompts)
        train = Dataset.from_dict({"prompt": [""] * n, "chosen": [""] * n, "rejected": [""] * n,
                                   "p_ids": prompts, "c_ids": chosens, "r_ids": rejecteds})
        trainer = PretokenizedCPO(model=model, args=args, train_dataset=train, processing_class=tok)

        def count(batch):
            return _mask_tokens(batch["chosen_attention_mask"], batch["rejected_attention_mask"])

    reference_s = time.perf_counter() - t0 if kind == "dpo-precomputed" else 0.0
    return trainer, model, len(prompts), {"reference_s": reference_s}, count


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rec = _Recorder()
    run = _child_trl if spec["trainer"].startswith("trl") else _child_prefalign
    trainer, model, n_pairs, timing, count = run(spec, rec)
    trainer.add_callback(rec.callback())
    rec.wrap_loss(trainer)
    rec.wrap_collator(trainer, count)
    setup_rss = rec.rss_phases["trainer built"] = _rss_mb()
    trainer.train()
    ends, cpu_ends = [rec.start, *rec.ends], [rec.cpu_start, *rec.cpu_ends]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    cpu_steps = [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    out = {
        "trainer": spec["trainer"], "step_s": steps, "cpu_step_s": cpu_steps, "losses": rec.losses, "tokens": rec.tokens,
        "padded_tokens": rec.padded, "peak_rss_mb": _rss_mb(), "setup_rss_mb": setup_rss, "params": params,
        "n_pairs": n_pairs, "reference_s": timing["reference_s"], "threads": torch.get_num_threads(),
        "rss_phases_mb": rec.rss_phases,
    }
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Parent: data, machine peak, the runs, the report
# ---------------------------------------------------------------------------------------------------------


def matmul_peak(threads: int, n: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """Best FLOP per CPU-second of an n x n torch.matmul in fp32 and bf16, and of a SmolLM2-sized linear layer
    under bf16 autocast (CPUs without bf16 instructions run the two bf16 paths at very different rates)."""
    import torch

    torch.set_num_threads(threads)

    def best(fn, flops):
        fn()
        top, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t = time.process_time()
            fn()
            top = max(top, flops / max(time.process_time() - t, 1e-9))
        return top

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out[f"matmul_{name}"] = best(lambda a=a, b=b: torch.matmul(a, b), 2 * n**3)
    x, layer = torch.randn(2048, 576), torch.nn.Linear(576, 1536, bias=False)

    def autocast_linear():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)

    out["linear_bf16_autocast"] = best(autocast_linear, 2 * 2048 * 576 * 1536)
    out["fp32"] = out["matmul_fp32"]
    out["bf16"] = max(out["matmul_bf16"], out["linear_bf16_autocast"])
    return out


def prepare_pairs(model: str, n_pairs: int, max_length: int, max_prompt_length: int, out: Path,
                  source: Path = HH) -> dict:
    """Write the first `n_pairs` pairs of `source` (a .jsonl or .jsonl.gz file: HH-RLHF transcripts or
    UltraFeedback's chat-message lists) that survive prefalign's tokenization (raw lines, so that every child
    reads and tokenizes them itself) and return the token lengths of all usable pairs."""
    from prefalign.data import load_preference_data, tokenize_pairs
    from prefalign.models import load_tokenizer

    tok = load_tokenizer(model)
    pairs = load_preference_data(str(source), tokenizer=tok)
    tokenized, _ = tokenize_pairs(pairs.dataset, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    keep = tokenized["row_index"][:n_pairs]
    if len(keep) < n_pairs:
        raise SystemExit(f"only {len(keep)} usable pairs, {n_pairs} needed")
    with (gzip.open if source.suffix == ".gz" else open)(source, "rt", encoding="utf-8") as f:
        lines = [ln for ln in f.readlines() if ln.strip()]  # row_index counts the file's rows from 0
    out.write_text("".join(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in keep))
    return {"lengths": [(len(p), len(c), len(r)) for p, c, r in zip(
        tokenized["prompt_input_ids"], tokenized["chosen_input_ids"], tokenized["rejected_input_ids"])]}


def padding_study(lengths: list[tuple[int, int, int]], batch: int, seed: int = 0) -> dict[str, dict]:
    """Tokens the model runs on per pair over one epoch: unshared (2 rows of prompt+completion) or packed
    (1 row prompt+chosen+rejected), in random batches or in transformers' LengthGroupedSampler order."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    unshared = [max(p + c, p + r) for p, c, r in lengths]
    packed = [p + c + r for p, c, r in lengths]
    real = {"unshared": sum(2 * p + c + r for p, c, r in lengths), "packed": sum(packed)}
    out = {}
    for layout, key, rows in (("unshared", unshared, 2), ("packed", packed, 1)):
        for order in ("random", "grouped"):
            g = torch.Generator().manual_seed(seed)
            if order == "random":
                idx = torch.randperm(len(lengths), generator=g).tolist()
            else:
                idx = get_length_grouped_indices(key, batch, generator=g)
            computed = sum(rows * len(idx[i : i + batch]) * max(key[j] for j in idx[i : i + batch])
                           for i in range(0, len(idx), batch))
            out[f"{layout}/{order}"] = {
                "tokens_per_pair": computed / len(lengths),
                "real_tokens_per_pair": real[layout] / len(lengths),
                "padding_fraction": 1 - real[layout] / computed,
            }
    return out


def _resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def run_child(spec: dict, timeout: float, max_rss_mb: float | None = None, min_free_mb: float | None = None) -> dict:
    """One trainer in a fresh process (PYTHONPATH and the rest of the environment inherited). Killed, and
    recorded as failed, when it runs past `timeout`, its resident memory passes `max_rss_mb` or the machine's
    available memory falls below `min_free_mb` (read every 0.2 s from /proc: a trainer that needs more than
    the machine has fails alone instead of taking it down)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        t_end, error = time.perf_counter() + timeout, None
        while proc.poll() is None:
            if time.perf_counter() > t_end:
                error = f"timed out after {timeout:.0f} s"
            elif max_rss_mb and (rss := _resident_mb(proc.pid)) > max_rss_mb:
                error = f"stopped: resident memory reached {rss:.0f} MB, over the {max_rss_mb:.0f} MB limit"
            elif min_free_mb and (free := _available_mb()) < min_free_mb:
                error = (f"stopped: the machine's available memory fell to {free:.0f} MB (limit {min_free_mb:.0f} MB) "
                         f"with the trainer at {_resident_mb(proc.pid):.0f} MB resident")
            if error:
                proc.kill()
                proc.wait()
                return {"trainer": spec["trainer"], "error": error}
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = "\n".join((stdout + stderr).strip().splitlines()[-25:])
    return {"trainer": spec["trainer"], "error": f"exit {proc.returncode}:\n{tail}"}


def summarize(r: dict, spec: dict, peak: dict[str, float]) -> dict:
    if "error" in r:
        return r
    w = spec["warmup"]
    wall, cpu = r["step_s"][w:], r["cpu_step_s"][w:]
    # The last entries are the training batches (prefalign's reference pass collates the same batches first)
    n = len(r["step_s"])
    real, padded = r["tokens"][-n:][w:], r["padded_tokens"][-n:][w:]
    tokens = statistics.median(real)
    live_reference = TRAINERS[r["trainer"]][:2] == ("trl", "dpo")
    flops = (6 + (2 if live_reference else 0)) * r["params"] * tokens  # + a live reference forward
    s = dict(r)
    s.update(
        wall_s=statistics.median(wall),
        cpu_s=statistics.median(cpu),
        tokens_per_step=tokens,
        # Over all timed steps: tokens the policy's forward ran on (rows x width, padding in, as the training
        # telemetry counts them) per CPU-second, the padding among them, and pairs per CPU-second of the total.
        tokens_per_cpu_s=sum(padded) / sum(cpu),
        padding_share=1 - sum(real) / sum(padded),
        pairs_per_cpu_s_total=spec["batch"] * len(cpu) / sum(cpu),
    )
    s.update(
        pairs_per_s=spec["batch"] / s["wall_s"],
        pairs_per_cpu_s=spec["batch"] / s["cpu_s"],
        achieved_flops=flops / s["cpu_s"],
        peak_fraction=flops / s["cpu_s"] / peak[spec["precision"]],
    )
    if r["reference_s"]:
        # A reference pass before training (wall time): its cost per pair, spread over one epoch of training.
        s["pairs_per_s_with_reference_pass"] = 1 / (1 / s["pairs_per_s"] + r["reference_s"] / r["n_pairs"])
    return s


def report(case: str, spec: dict, results: dict[str, dict]) -> list[dict]:
    print(f"\n=== {case}: batch {spec['batch']} pairs, max_length {spec['max_length']} (prompt "
          f"{spec['max_prompt_length']}), {spec['threads']} thread(s); medians of {spec['steps']} steps after "
          f"{spec['warmup']} warm-up ===")
    print(f"{'trainer':30} {'pairs/cpu-s':>11} {'pairs/s':>8} {'cpu s':>6} {'wall s':>6} {'tok/step':>8} "
          f"{'tok/cpu-s':>9} {'pad %':>5} {'peak RSS MB':>11} {'setup MB':>8} {'GFLOP/s':>7} {'%peak':>5}  "
          "per-step losses")
    for name, s in results.items():
        if "error" in s:
            print(f"{name:30} FAILED {s['error']}")
            continue
        losses = " ".join(f"{x:.6f}" for x in s["losses"])
        print(f"{name:30} {s['pairs_per_cpu_s']:11.3f} {s['pairs_per_s']:8.3f} {s['cpu_s']:6.2f} {s['wall_s']:6.2f} "
              f"{s['tokens_per_step']:8.0f} {s['tokens_per_cpu_s']:9.1f} {100 * s['padding_share']:5.1f} "
              f"{s['peak_rss_mb']:11.0f} {s['setup_rss_mb']:8.0f} "
              f"{s['achieved_flops'] / 1e9:7.2f} {100 * s['peak_fraction']:5.1f}  {losses}")
        if s.get("rss_phases_mb"):  # where the peak was reached, so a regression shows in its phase
            print(f"{'':30} peak RSS MB by phase: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in s["rss_phases_mb"].items()))
        print(f"{'':30} timed steps, cpu s: {' '.join(f'{x:.2f}' for x in s['cpu_step_s'][spec['warmup']:])}; "
              f"{s['pairs_per_cpu_s_total']:.3f} pairs per cpu-s over their total")
        if "pairs_per_s_with_reference_pass" in s:
            print(f"{'':30} reference pass before training: {s['reference_s']:.1f} s for {s['n_pairs']} pairs "
                  f"-> {s['pairs_per_s_with_reference_pass']:.3f} pairs/s (wall) if paid once per epoch")
    rows = []
    print(f"{'prefalign / TRL':48} {'speed(cpu)':>10} {'(total)':>7} {'speed(wall)':>11} {'target':>6} "
          f"{'memory':>6} {'target':>6} {'max|loss diff|':>14}")
    for ours, theirs, target, memory_target, same_loss in COMPARISONS[spec["comparisons"]]:
        a, b = results.get(ours), results.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        speed = a["pairs_per_cpu_s"] / b["pairs_per_cpu_s"]
        total = a["pairs_per_cpu_s_total"] / b["pairs_per_cpu_s_total"]
        wall = a["pairs_per_s"] / b["pairs_per_s"]
        memory = a["peak_rss_mb"] / b["peak_rss_mb"]
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) if same_loss else None
        judged = target is not None or memory_target is not None
        ok = (target is None or speed >= target) and (memory_target is None or memory <= memory_target)
        print(f"{ours + ' / ' + theirs:48} {speed:9.2f}x {total:6.2f}x {wall:10.2f}x "
              f"{'' if target is None else f'{target:.1f}x':>6} {memory:5.2f}x "
              f"{'' if memory_target is None else f'{memory_target:.2f}x':>6} "
              f"{'' if diff is None else f'{diff:.1e}':>14}  {('meets' if ok else 'MISSES') if judged else ''}")
        rows.append({"case": case, "ours": ours, "theirs": theirs, "speed_cpu": speed, "speed_cpu_total": total,
                     "speed_wall": wall, "memory": memory, "speed_target": target, "memory_target": memory_target,
                     "loss_diff": diff, "meets": ok if judged else None})
    for variant, base in VARIANTS:
        a, b = results.get(variant), results.get(base)
        if a and b and "error" not in a and "error" not in b:
            diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
            print(f"{base} / {variant}: {a['cpu_s'] / b['cpu_s']:.2f}x speed (cpu), "
                  f"{b['pairs_per_cpu_s_total'] / a['pairs_per_cpu_s_total']:.2f}x "
                  f"(total); memory {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x; padding "
                  f"{100 * b['padding_share']:.1f}% vs {100 * a['padding_share']:.1f}%; max|loss diff| {diff:.1e}")
    for spo, base in SPO_OVERHEAD:
        a, b = results.get(spo), results.get(base)
        if a and b and "error" not in a and "error" not in b:
            overhead = b["pairs_per_cpu_s"] / a["pairs_per_cpu_s"]
            print(f"SPO overhead {spo} / {base}: {overhead:.2f}x cpu time per step "
                  f"(target <= {SPO_OVERHEAD_TARGET}x: {'meets' if overhead <= SPO_OVERHEAD_TARGET else 'MISSES'}), "
                  f"memory {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    return rows


# Which trainers each case runs by default. SmolLM2 steps are expensive on a 2-core machine, so its plan leaves
# out what the tiny model already measures (TRL's precomputed-reference DPO, AMaPO without prefix sharing). The
# long case runs TRL both ways (without gradient checkpointing, like prefalign's default, and at TRL's default);
# its bf16 plan leaves out the variants that only show a layout's effect (measured in fp32).
LONG = ["trl-dpo", "trl-dpo-gc", "prefalign-dpo", "trl-cpo-simpo", "trl-cpo-simpo-gc", "prefalign-simpo",
        "prefalign-amapo"]
PLAN = {
    "smollm2-uf1024:fp32": [*LONG, "prefalign-dpo-no-padding-free", "prefalign-dpo-unshared", "prefalign-dpo-gc"],
    "smollm2-uf1024:bf16": LONG,
    "smollm2:fp32": ["trl-dpo", "prefalign-dpo", "trl-cpo-simpo", "prefalign-simpo", "prefalign-amapo",
                     "prefalign-amapo+spo"],
    "smollm2:bf16": ["trl-dpo", "prefalign-dpo", "trl-cpo-simpo", "prefalign-simpo", "prefalign-amapo"],
    "tiny:fp32": list(TRAINERS),
    "tiny:bf16": ["trl-dpo", "prefalign-dpo", "trl-cpo-simpo", "prefalign-simpo"],
}
DEFAULT_CASES = "smollm2:fp32,tiny:fp32,tiny:bf16"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model, fp32, 3 trainers, few steps: a smoke test")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from: {', '.join(PLAN)}")
    ap.add_argument("--trainers", help="comma-separated, for every case (default: each case's plan), from: "
                    + ", ".join(TRAINERS))
    # Left unset, these take each case's own value (CASES: batch 2, 256 / 128 tokens, 3 SmolLM2 or 8 tiny steps
    # for the short cases; batch 8, 1024 / 512 tokens, 3 steps for smollm2-uf1024); given, they apply to every case.
    ap.add_argument("--batch", type=int, help="pairs per step (default: the case's)")
    ap.add_argument("--max-length", type=int, help="default: the case's")
    ap.add_argument("--max-prompt-length", type=int, help="default: the case's")
    ap.add_argument("--warmup", type=int, help="default: the case's (1)")
    ap.add_argument("--steps", type=int, help="timed steps per trainer, SmolLM2 cases (default: the case's, 3)")
    ap.add_argument("--tiny-steps", type=int, help="timed steps per trainer, tiny model (default 8)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads, for every trainer")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per trainer process")
    ap.add_argument("--max-rss-gb", type=float, default=18.0,
                    help="stop a trainer whose resident memory passes this (recorded as failed); 0: no limit")
    ap.add_argument("--min-available-gb", type=float, default=1.5,
                    help="stop a trainer when the machine's available memory falls below this; 0: no limit")
    ap.add_argument("--json", help="write every raw and summarised number here")
    ap.add_argument("--report", metavar="JSON[,JSON...]",
                    help="measure nothing: print the reports of earlier --json files, their cases' trainers merged "
                         "(a trainer measured in several files: the last one's)")
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if args.report:
        merged: dict[str, dict] = {}
        for path in args.report.split(","):
            for case, entry in json.loads(Path(path).read_text())["cases"].items():
                merged.setdefault(case, {"spec": entry["spec"], "results": {}})["results"].update(entry["results"])
        for case, entry in merged.items():
            report(case, entry["spec"], entry["results"])
        return
    cases = [c.strip() for c in ("tiny:fp32" if args.quick else args.cases).split(",") if c.strip()]
    if set(cases) - set(PLAN):
        raise SystemExit(f"unknown cases {sorted(set(cases) - set(PLAN))}; choose from {', '.join(PLAN)}")
    needed = {CASES[c.split(":")[0]]["data"] for c in cases} | {STORIES}
    if any(not path.exists() for path in needed):
        raise SystemExit(f"{SHARED} (the cases' data and stories260K) is needed; see shared/README.md")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is the peer measured against: pip install trl") from None
    if args.quick:
        args.trainers = args.trainers or "trl-cpo-simpo,prefalign-simpo,prefalign-simpo-unshared"
        args.tiny_steps = args.tiny_steps or 3
    chosen = [t.strip() for t in args.trainers.split(",")] if args.trainers else None
    if chosen and set(chosen) - set(TRAINERS):
        raise SystemExit(f"unknown trainers {sorted(set(chosen) - set(TRAINERS))}; choose from {', '.join(TRAINERS)}")

    import platform

    import torch
    import transformers

    t_start = time.time()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} thread(s) per trainer")
    peak = matmul_peak(args.threads)
    print("peak per CPU-second: matmul fp32 {:.1f}, matmul bf16 {:.1f}, linear under bf16 autocast {:.1f} GFLOP/s"
          .format(peak["matmul_fp32"] / 1e9, peak["matmul_bf16"] / 1e9, peak["linear_bf16_autocast"] / 1e9))

    def setting(key: str, name: str):
        given = getattr(args, "tiny_steps" if (key, name) == ("tiny", "steps") else name)
        return CASES[key][name] if given is None else given

    everything = {"machine": cpu, "peak": peak, "args": vars(args), "cases": {}, "comparisons": [], "padding": {}}
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-") as tmp:
        data_files, shapes = {}, {}
        for case in cases:
            key = case.split(":")[0]
            if key in data_files:
                continue
            shape = shapes[key] = {k: setting(key, k) for k in ("batch", "max_length", "max_prompt_length",
                                                                 "warmup", "steps")}
            source = CASES[key]["data"]
            path = Path(tmp) / f"pairs-{key}.jsonl"
            info = prepare_pairs(CASES[key]["model"], (shape["warmup"] + shape["steps"]) * shape["batch"],
                                 shape["max_length"], shape["max_prompt_length"], path, source=source)
            data_files[key] = str(path)
            study = everything["padding"][key] = padding_study(info["lengths"], shape["batch"])
            print(f"\npadding over one epoch of {len(info['lengths'])} pairs of {source.name} ({key}: "
                  f"{Path(CASES[key]['model']).name} tokenizer, max_length {shape['max_length']}, prompt "
                  f"{shape['max_prompt_length']}, batch {shape['batch']}): tokens the model runs on per pair")
            for k, v in study.items():
                print(f"  {k:18} {v['tokens_per_pair']:7.1f}  (real {v['real_tokens_per_pair']:6.1f}, "
                      f"padding {100 * v['padding_fraction']:4.1f}%)")
        for case in cases:
            key, precision = case.split(":")
            spec = {
                "model": CASES[key]["model"], "precision": precision, **shapes[key], "lr": args.lr,
                "threads": args.threads, "data": data_files[key], "comparisons": CASES[key]["comparisons"],
            }
            results = {}
            everything["cases"][case] = {"spec": spec, "results": results}
            for name in chosen or PLAN[case]:
                workdir = Path(tmp) / f"{case.replace(':', '-')}-{name}"
                workdir.mkdir()
                t = time.time()
                raw = run_child({**spec, "trainer": name, "workdir": str(workdir)}, args.timeout,
                                args.max_rss_gb * 1024 or None, args.min_available_gb * 1024 or None)
                results[name] = summarize(raw, spec, peak)
                status = "FAILED" if "error" in raw else f"{results[name]['pairs_per_cpu_s']:.3f} pairs/cpu-s"
                print(f"  [{case}] {name}: {status} ({time.time() - t:.0f} s, load {os.getloadavg()[0]:.1f})",
                      flush=True)
                if args.json:  # after every trainer, so that a long run stopped midway keeps what it measured
                    Path(args.json).write_text(json.dumps(everything, indent=1))
            everything["comparisons"] += report(case, spec, results)
    print(f"\nwall time {time.time() - t_start:.0f} s; load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
