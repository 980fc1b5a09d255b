"""benchmarks/device_check.py in its CI mode (`--device cpu --tiny`), so that the GPU check never rots: every part
runs or says why it cannot, the fast and packed paths agree with the naive one on every family, the trainers
step, the sharded steps equal the unsharded one, and the records are written once and kept."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
TIMEOUT = 600  # ~25 s of CPU; minutes of wall time on a loaded 2-core machine
FAMILIES = 12


def _run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "device_check.json").read_text())


def test_every_part_runs_or_says_why_not(check):
    _, record = check
    assert record["ok"] is True and record["environment"]["versions"]["torch"]
    parts = record["parts"]
    assert list(parts) == ["conformance", "training", "fsdp2", "deepspeed_zero3", "conformance_flex"]
    for name, part in parts.items():
        assert part["ok"] and part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name
    assert parts["conformance"]["status"] == parts["training"]["status"] == parts["fsdp2"]["status"] == "ok"
    assert "CUDA only" in parts["conformance_flex"]["reason"]  # the CPU compiles nothing


def test_conformance_covers_every_family_in_fp32_and_bf16(check):
    rows = check[1]["parts"]["conformance"]["rows"]
    assert len(rows) == 2 * FAMILIES and all(r["status"] == "ok" for r in rows)
    assert {r["family"] for r in rows} >= {"llama", "gemma2", "qwen2", "mixtral", "gpt2"}
    for r in rows:
        assert r["fast_vs_naive"] <= r["tolerance"]
        if r["family"] == "gpt2":  # absolute positions: prefix sharing refused, in one line
            assert r["packed_layout"] is None and "absolute" in r["packed_refused"]
        else:
            assert r["packed_layout"] == "packed" and r["packed_vs_naive"] <= r["tolerance"]
        if r["dtype"] == "fp32":
            assert r["fast_grad_rel"] < 1e-3 and (r["packed_grad_rel"] is None or r["packed_grad_rel"] < 1e-3)


def test_training_steps_are_timed_and_the_losses_match_trl(check):
    training = check[1]["parts"]["training"]
    trainers = training["trainers"]
    steps = training["shape"]["warmup"] + training["shape"]["timed_steps"]
    for name, r in trainers.items():
        if name.startswith("trl") and r["status"] == "skipped":
            assert "trl" in r["reason"]  # TRL is the peer, not a dependency
            continue
        assert r["status"] == "ok", (name, r)
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak on the CPU
    assert trainers["prefalign-dpo"]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    for c in training["comparisons"]:  # present where TRL ran
        assert c["max_abs_loss_diff"] < 2e-3, c


def test_sharded_steps_equal_the_unsharded_step(check):
    parts = check[1]["parts"]
    for name in ("fsdp2", "deepspeed_zero3"):
        r = parts[name]
        if r["status"] == "skipped":
            assert name == "deepspeed_zero3" and "deepspeed" in r["reason"]
            continue
        assert r["loss_diff"] <= r["atol"] and r["max_weight_diff"] <= r["atol"], (name, r)


def test_markdown_table_and_records_are_kept(check):
    out, record = check
    md = (out / "device_check.md").read_text()
    for heading in ("| part | status |", "## Conformance", "## Training steps", "## One sharded step"):
        assert heading in md
    assert md.count("| sdpa |") + md.count("| eager |") == 2 * FAMILIES
    before = (out / "device_check.json").read_bytes()
    again = _run(out)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a record is never replaced silently
    assert (out / "device_check.json").read_bytes() == before
