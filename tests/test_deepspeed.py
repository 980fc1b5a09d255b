"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` (2 CPU processes over gloo) train as one process does.

Each run is compared with the same run on one process without DeepSpeed, 4 pairs per step (2 processes x 2):
SGD at a constant rate, so the weights differ only by float rounding (tolerance below). The launches run one
after another in a background thread while the one-process runs run here. The first launch on a machine
JIT-compiles DeepSpeed's shm_comm op (cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from prefalign.run_files import LOSS_STATE_FILE, SPO_OPTIMIZER_FILE, read_jsonl, read_metrics

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'prefalign[deepspeed]'")
pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent
TIMEOUT = 420
ATOL = 2e-6  # SGD steps at lr 0.05 on fp32 weights of order 0.1: a few float32 ulps of the step

FLAGS = ["--report_to", "none", "--max_steps", "3", "--save_strategy", "no", "--logging_steps", "1", "--optim", "sgd",
         "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--max_length", "96", "--max_prompt_length",
         "48", "--seed", "0", "--disable_tqdm", "true"]
# name -> (ZeRO stage, flags). "checkpointed" saves at step 2 of 4 and is resumed from there ("resumed").
RUNS = {
    "checkpointed": (3, ["--loss_type", "beta_dpo", "--use_spo", "--spo_weight", "0.5", "--max_steps", "4",
                         "--save_strategy", "steps", "--save_steps", "2"]),
    "live_reference": (3, ["--loss_type", "dpo", "--precompute_ref_log_probs", "false"]),
    "lora": (3, ["--loss_type", "dpo", "--use_peft", "--lora_r", "4"]),
    "amapo_spo_zero2": (2, ["--loss_type", "amapo", "--use_spo", "--spo_weight", "0.5"]),
}
DS_CONFIG = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {file}
  zero3_init_flag: {init}
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(work: Path, stage: int) -> Path:
    ds = work / f"ds_zero{stage}.json"
    ds.write_text(json.dumps({**DS_CONFIG, "zero_optimization": {**DS_CONFIG["zero_optimization"], "stage": stage}}))
    path = work / f"accelerate_zero{stage}.yaml"
    path.write_text(ACCELERATE_CONFIG.format(file=ds, init=str(stage == 3).lower()))
    return path


def _launch(work: Path, stage: int, out: Path, args: list[str], log: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(work, stage)),
           "--main_process_port", str(_free_port()), "-m", "prefalign.cli", "train", *args,
           "--output_dir", str(out), "--per_device_train_batch_size", "2", "--ddp_backend", "gloo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent, timeout=TIMEOUT)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from prefalign.cli import main as cli_main

    work = tmp_path_factory.mktemp("deepspeed")
    model = shared_path("models", "stories260K")
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(60)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:26]))
    common = ["--model_name_or_path", str(model), "--dataset", str(work / "train.jsonl"), "--ref_cache_dir",
              str(work / "ref_cache"), *FLAGS]
    argv = {name: [*common, *flags] for name, (_, flags) in RUNS.items()}
    argv["checkpointed"] += ["--eval_dataset", str(work / "heldout.jsonl")]
    results: dict[str, tuple[int, str]] = {}

    def launch_all():
        for name, (stage, _) in RUNS.items():
            results[name] = _launch(work, stage, work / name / "two", argv[name], work / f"{name}.log")
        # as if the job had died after step 2's checkpoint: resumed from it, it must end where the whole run did
        whole, cut = work / "checkpointed" / "two", work / "resumed" / "two"
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "checkpoint-4")
        for later in ("model.safetensors", "train_summary.json", "spo_head.safetensors"):
            (cut / later).unlink()
        results["resumed"] = _launch(work, 3, cut, [*argv["checkpointed"], "--resume_from_checkpoint", "latest"],
                                     work / "resumed.log")

    thread = threading.Thread(target=launch_all)
    thread.start()
    try:  # the one-process runs, here, while the launched ones run
        for name in RUNS:
            code = cli_main(["train", *argv[name], "--output_dir", str(work / name / "one"), "--use_cpu",
                             "--per_device_train_batch_size", "4"])
            assert code == 0, name
    finally:
        thread.join()
    return {"work": work, "results": results, "model": model}


def _finished(runs, name: str) -> str:
    code, text = runs["results"][name]
    assert code == 0, text[-6000:]
    return text


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_under_zero_train_to_the_weights_of_one(runs, name):
    text = _finished(runs, name)
    assert "Traceback" not in text
    folder = runs["work"] / name
    weights = "adapter_model.safetensors" if name == "lora" else "model.safetensors"
    two, one = load_file(folder / "two" / weights), load_file(folder / "one" / weights)
    if name == "amapo_spo_zero2":  # ZeRO-2 saves the tied output head under its own name too: the same tensor
        torch.testing.assert_close(two.pop("lm_head.weight"), two["model.embed_tokens.weight"], atol=0, rtol=0)
    _close(two, one)
    start = load_file(runs["model"] / "model.safetensors")
    if name != "lora":
        assert any(not torch.equal(one[k], start[k]) for k in one)  # the runs did train
    if "spo" in name or name == "checkpointed":  # the SPO head has its own optimizer under DeepSpeed
        _close(load_file(folder / "two" / "spo_head.safetensors"), load_file(folder / "one" / "spo_head.safetensors"))
    rows = {k: [r for r in read_metrics(folder / k / "metrics.jsonl") if "loss" in r] for k in ("two", "one")}
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]]  # written once, by rank 0
    assert [r["loss"] for r in rows["two"]] == pytest.approx([r["loss"] for r in rows["one"]], abs=1e-5)
    trained = {k: [sorted(r["rows"]) for r in read_jsonl(folder / k / "trained_pairs.jsonl")] for k in ("two", "one")}
    assert trained["two"] == trained["one"]
    if name == "live_reference":  # the reference engine is the policy's starting point: DPO's first loss is log 2
        assert rows["two"][0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_a_run_resumed_from_a_zero3_checkpoint_ends_where_the_whole_run_ended(runs):
    _finished(runs, "checkpointed")
    text = _finished(runs, "resumed")
    work = runs["work"]
    checkpoint = work / "checkpointed" / "two" / "checkpoint-2"
    assert (checkpoint / LOSS_STATE_FILE).is_file() and (checkpoint / SPO_OPTIMIZER_FILE).is_file()
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's partitioned optimizer state
    for weights in ("model.safetensors", "spo_head.safetensors"):
        whole, resumed = load_file(work / "checkpointed" / "two" / weights), load_file(work / "resumed" / "two" / weights)
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), f"{weights} {key}"
    assert "step 3/4" in text and "step 1/4" not in text  # continued, not restarted
    steps = [r["step"] for r in read_metrics(work / "resumed" / "two" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_the_final_zero3_model_loads_in_transformers_and_scores_as_in_training(runs):
    """16-bit gather on save: a plain from_pretrained reads it whole, and scores the held-out pairs as the
    in-memory model did at the end of training (eval_per_pair.jsonl, written under ZeRO-3)."""
    from transformers import AutoModelForCausalLM

    from prefalign.cli import main as cli_main

    _finished(runs, "checkpointed")
    work = runs["work"]
    folder = work / "checkpointed" / "two"
    model = AutoModelForCausalLM.from_pretrained(folder)
    saved = load_file(folder / "model.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name if name in saved else "model.embed_tokens.weight"]), name
    per_pair = work / "rescored.jsonl"
    assert cli_main(["eval", "--model", str(folder), "--dataset", str(work / "heldout.jsonl"), "--per-pair",
                     str(per_pair), "--max-length", "96", "--max-prompt-length", "48"]) == 0
    in_training = {r["index"]: r for r in read_jsonl(folder / "eval_per_pair.jsonl")}
    rescored = {r["index"]: r for r in read_jsonl(per_pair)}
    assert in_training.keys() == rescored.keys() and len(rescored) == 10
    for i, r in rescored.items():
        for key in ("chosen_logp_sum", "rejected_logp_sum", "chosen_logp_mean", "rejected_logp_mean"):
            assert r[key] == pytest.approx(in_training[i][key], abs=1e-4), (i, key)
