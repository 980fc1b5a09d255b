"""prefalign under accelerate's FSDP2, sharded, on 2 CPU processes (tests/accelerate_fsdp_cpu.py lets
accelerate take its GPU branch on a CPU): a run trains to a DDP run's weights, its checkpoints are sharded
(torch.distributed.checkpoint, nothing gathered on one process) and a run killed after its first checkpoint
resumes to the uninterrupted run's weights bit for bit, and gradient checkpointing trains to the same
weights — with β-DPO, whose running statistics are the loss state a checkpoint must carry, its reference log-probs
precomputed inside the trainer, and SPO (its head and the head's optimizer live outside the sharded model); AMaPO + SPO and DPO with LoRA train as under DDP. The final model
is gathered whole and loads with plain transformers.

Found by this test and fixed: the output head applied after the model's forward ran FSDP's hooks a second
time for accelerate's (norm, embeddings, head) group, and backward crashed (a segfault); the non-finite
gradient check all-reduced DTensor shards (NotImplementedError); the reference cache's fingerprint read
DTensors with .numpy(); the SPO head's parameters in the model's optimizer stopped accelerate's FSDP2
preparation (KeyError)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

HERE = Path(__file__).resolve().parent
TIMEOUT = 600

FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: true
"""

TRAIN = ["--loss_type", "beta_dpo", "--use_spo", "true", "--max_steps", "4", "--per_device_train_batch_size", "2", "--max_length", "96",
         "--report_to", "none", "--logging_steps", "1", "--learning_rate", "1e-3", "--ddp_backend", "gloo",
         "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "3"]


# Besides β-DPO: what lives outside the sharded model or changes what is trained, 2 steps each.
SHORT = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "96", "--report_to", "none",
         "--logging_steps", "1", "--ddp_backend", "gloo", "--use_cpu", "true", "--disable_tqdm", "true",
         "--save_strategy", "no", "--seed", "3"]
PAIRED = {
    # the SPO head is outside the model: under FSDP2 it has its own optimizer (accelerate swaps every
    # optimizer parameter for its shard); AMaPO's batch statistics are gathered over the processes
    "amapo_spo": ["--loss_type", "amapo", "--use_spo", "true", "--learning_rate", "1e-3", *SHORT],
    # LoRA: only the adapters train, the reference is the model with them disabled (precomputed)
    "dpo_lora": ["--loss_type", "dpo", "--use_peft", "true", "--learning_rate", "1e-2", *SHORT],
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, name: str, head: list[str], *argv: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets"), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), *head,
           *argv]
    log = work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent, timeout=TIMEOUT)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = shared_path("models", "stories260K")
    work = tmp_path_factory.mktemp("fsdp_accelerate")
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]][:16]
    (work / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "fsdp2.yaml").write_text(FSDP2_CONFIG)
    fsdp = ["--config_file", str(work / "fsdp2.yaml"), str(HERE / "accelerate_fsdp_cpu.py")]
    common = ["train", "--model_name_or_path", str(model), "--dataset", str(work / "hh.jsonl"), *TRAIN]
    logs = {"whole": _launch(work, "whole", fsdp, *common, "--output_dir", str(work / "whole"),
                             "--save_strategy", "steps", "--save_steps", "2")}
    # killed after its first checkpoint: the folder as it was then (the later checkpoint and the final save gone)
    shutil.copytree(work / "whole", work / "resumed", ignore=shutil.ignore_patterns("checkpoint-4"))
    for name in ("model.safetensors", "train_summary.json"):
        (work / "resumed" / name).unlink()
    logs["resumed"] = _launch(work, "resumed", fsdp, *common, "--output_dir", str(work / "resumed"),
                              "--save_strategy", "steps", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    logs["checkpointed"] = _launch(work, "checkpointed", fsdp, *common, "--output_dir", str(work / "checkpointed"),
                                   "--save_strategy", "no", "--gradient_checkpointing", "true")
    ddp = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "prefalign.cli"]
    logs["ddp"] = _launch(work, "ddp", ddp, *common, "--output_dir", str(work / "ddp"), "--save_strategy", "no")
    for name, flags in PAIRED.items():  # each under FSDP2 and under DDP
        argv = ["train", "--model_name_or_path", str(model), "--dataset", str(work / "hh.jsonl"), *flags]
        logs[name] = _launch(work, name, fsdp, *argv, "--output_dir", str(work / name))
        logs[f"{name}_ddp"] = _launch(work, f"{name}_ddp", ddp, *argv, "--output_dir", str(work / f"{name}_ddp"))
    return work, logs


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_fsdp2_trains_to_the_weights_of_ddp(runs):
    work, logs = runs
    assert "accelerate shards only on GPUs" not in logs["whole"]  # FSDP itself ran, not the DDP fallback
    fsdp, ddp = _weights(work / "whole"), _weights(work / "ddp")
    assert set(ddp) <= set(fsdp)  # the gathered save writes the tied head's weight too, equal to the embeddings
    for name, tensor in ddp.items():
        torch.testing.assert_close(fsdp[name], tensor, rtol=0, atol=1e-6, msg=name)
    if "lm_head.weight" in fsdp:
        assert torch.equal(fsdp["lm_head.weight"], fsdp["model.embed_tokens.weight"])


def test_fsdp2_checkpoints_are_sharded_and_resume_bit_for_bit(runs):
    work, logs = runs
    checkpoint = work / "whole" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "model.safetensors").exists()  # nothing gathered on one process
    assert (checkpoint / "loss_state.safetensors").is_file()  # β-DPO's running statistics
    assert (checkpoint / "spo_head.safetensors").is_file() and (checkpoint / "spo_head_optimizer.pt").is_file()
    assert "step 3/4" in logs["resumed"] and "step 1/4" not in logs["resumed"]
    from safetensors.torch import load_file

    for file in ("model.safetensors", "spo_head.safetensors"):
        whole, resumed = load_file(str(work / "whole" / file)), load_file(str(work / "resumed" / file))
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), f"{file}: {name}"
    rows = lambda run: [r for r in (json.loads(line) for line in (work / run / "metrics.jsonl").open())  # noqa: E731
                        if "loss" in r and r["step"] >= 3]
    assert [r["loss"] for r in rows("resumed")] == [r["loss"] for r in rows("whole")]


def test_gradient_checkpointing_under_fsdp2_changes_nothing_but_memory(runs):
    work, logs = runs
    plain, checkpointed = _weights(work / "whole"), _weights(work / "checkpointed")
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    losses = lambda run: [r["loss"] for r in (json.loads(line) for line in (work / run / "metrics.jsonl").open())  # noqa: E731
                          if "loss" in r]
    assert losses("checkpointed") == pytest.approx(losses("whole"), abs=1e-6)


@pytest.mark.parametrize(("name", "files"), [("amapo_spo", ("model.safetensors", "spo_head.safetensors")),
                                             ("dpo_lora", ("adapter_model.safetensors",))])
def test_spo_and_lora_under_fsdp2_train_as_under_ddp(runs, name, files):
    from safetensors.torch import load_file

    work, logs = runs
    for file in files:
        fsdp, ddp = load_file(str(work / name / file)), load_file(str(work / f"{name}_ddp" / file))
        assert set(ddp) <= set(fsdp) and ddp, file
        for key, tensor in ddp.items():
            torch.testing.assert_close(fsdp[key], tensor, rtol=0, atol=2e-6, msg=f"{file}: {key}")


def test_the_fsdp2_final_model_loads_with_transformers(runs):
    from transformers import AutoModelForCausalLM

    work, _ = runs
    model = AutoModelForCausalLM.from_pretrained(work / "whole")
    ddp = _weights(work / "ddp")
    for name, param in model.state_dict().items():
        if name in ddp:
            torch.testing.assert_close(param, ddp[name], rtol=0, atol=1e-6, msg=name)
