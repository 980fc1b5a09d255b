"""The scripts in examples/ run as written, on the tiny real model and local data instead of the hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_path

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def run_example(script: str, *argv: str, out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_CACHE": str(out.parent / "hf-datasets")}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), *argv, "--output_dir", str(out),
                           "--max_steps", "2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_dpo_with_reference_and_lora(tmp_path):
    out = tmp_path / "dpo"
    stdout = run_example("dpo_reference_lora.py", "--model", str(shared_path("models", "stories260K")),
                         "--dataset", str(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")), out=out)
    assert "eval_ranking_accuracy" in stdout
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_amapo_on_conversational_data(tmp_path):
    out = tmp_path / "amapo"
    stdout = run_example("amapo_conversational.py", "--model", str(shared_path("models", "stories260K")),
                         "--dataset", str(shared_path("data", "ultrafeedback", "test_prefs_500.jsonl")),
                         "--chat_template", TEMPLATE, out=out)
    assert "eval_ranking_accuracy" in stdout
    assert (out / "model.safetensors").is_file()
