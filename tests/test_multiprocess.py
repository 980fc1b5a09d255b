"""Two processes (gloo on CPU) give what one process gives on the same global batch, and the CLI trains there.

Both launches start when the module's first test asks for them and run side by side (4 processes on a small
CPU); each process uses one thread. accelerate's `--multi_gpu` is what starts one process per rank; without a
GPU they run on the CPU over gloo (`--cpu` would start only one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from prefalign.run_files import read_jsonl, read_metrics

HERE = Path(__file__).resolve().parent
TIMEOUT = 240

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:  # other jobs on this machine may hold accelerate's default port 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*argv: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(log.parent / "hf-datasets"), "TQDM_DISABLE": "1",
           "ACCELERATE_USE_CPU": "true"}
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"timed out:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    model = shared_path("models", "stories260K")
    work = tmp_path_factory.mktemp("multiprocess")
    data = work / "pairs.jsonl"
    from multiprocess_worker import PAIRS

    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    worker = accelerate_launch(str(HERE / "multiprocess_worker.py"), str(model), str(work / "worker"),
                               log=work / "worker.log")
    cli = accelerate_launch(
        "-m", "prefalign.cli", "train", "--model_name_or_path", str(model), "--dataset", str(data), "--use_cpu",
        "--report_to", "none", "--max_steps", "2", "--output_dir", str(work / "run"), "--logging_steps", "1",
        "--save_steps", "1", "--save_total_limit", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
        "--max_prompt_length", "32", "--disable_tqdm", "true", "--seed", "0", "--loss_type", "amapo",
        log=work / "cli.log",
    )
    yield {"model": model, "work": work, "worker": worker, "cli": cli}
    for proc in (worker, cli):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def one_process_reference(model_dir: Path):
    """The whole batch of 8 pairs on one process, no gather: per-pair outputs and the mean-loss gradient."""
    from multiprocess_worker import PAIRS, amapo_outputs, record, tokenized_rows

    from prefalign.data import PairCollator
    from prefalign.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    model.train()
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(tokenized_rows(tokenizer, PAIRS))
    out, delta = amapo_outputs(model, batch)
    out.losses.mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return record(out, delta), grads


def test_amapo_on_two_processes_equals_one_process(launches):
    """Tolerances. The two halves are padded to their own widths, and matmuls of other shapes round
    differently; DDP's gradient is the mean of two half-batch means, summed in another order than the
    one-process mean over 8 pairs. So equality is up to float32 rounding, not bit for bit. Measured on this
    CPU: Δ within 1e-6 (|Δ| ≤ 5.5), losses/logits/margins within 1.5e-5 at values up to 35 (a few ulp, the
    exp in M amplifies Δ's rounding), μ and s identical, gradients within 1.4e-6 (|g| ≤ 0.74). Asserted:
    atol 1e-5 + rtol 1e-5 per pair, atol 1e-5 + rtol 1e-4 on gradients — far below any real discrepancy
    (a rank using only its local μ, s changes margins by O(1))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes
    try:
        expected, expected_grads = one_process_reference(launches["model"])
    finally:
        torch.set_num_threads(threads)
    finish(launches["worker"], launches["work"] / "worker.log")
    ranks = [load_file(launches["work"] / "worker" / f"rank{r}.safetensors") for r in (0, 1)]

    for key in ("losses", "logits", "delta", "margins"):
        got = torch.cat([ranks[0][key], ranks[1][key]])
        torch.testing.assert_close(got, expected[key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    for key in ("mu", "std"):  # μ and s come from Δ gathered over both processes: the global batch's
        for rank in ranks:
            torch.testing.assert_close(rank[key], expected[key], atol=1e-5, rtol=1e-5)
    assert (expected["margins"] > 0).any() and (expected["margins"] == 0).any()  # both sides of μ are covered
    # Sanity: with μ and s of its own half only, a rank would get other margins, so the check above has teeth.
    from prefalign.losses import adaptive_margin

    local = torch.cat([adaptive_margin(h, h, beta=2.0)[0] for h in expected["delta"].split(4)])
    assert (local - expected["margins"]).abs().max() > 0.1

    got_grads = {k[len("grad.") :]: v for k, v in ranks[0].items() if k.startswith("grad.")}
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_cli_trains_under_accelerate_launch(launches):
    work = launches["work"]
    text = finish(launches["cli"], work / "cli.log")
    assert "Traceback" not in text
    run = work / "run"
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["epoch"] == 0.5  # 8 pairs / (2 processes × 2 per device): 2 steps per epoch, so 2 ranks ran
    assert {"amapo/mu", "amapo/std"} <= set(rows[0])
    assert (run / "model.safetensors").is_file()
    # one checkpoint-N (save_total_limit=1) holding both ranks' RNG states; no staging folder left over
    entries = sorted(p.name for p in run.iterdir() if "checkpoint" in p.name)
    assert entries == ["checkpoint-2"], entries
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(os.listdir(run / "checkpoint-2"))
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 2
    assert text.count(f"run: {run}") == 1  # the summary is printed once, by the main process


# -- training on two processes = one process with the same global batch ----------------------------------

TRAIN = ["--use_cpu", "--report_to", "none", "--max_steps", "3", "--save_strategy", "no", "--logging_steps", "1",
         "--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--max_length", "96",
         "--max_prompt_length", "48", "--seed", "0", "--disable_tqdm", "true", "--per_device_eval_batch_size", "2"]


class Run(NamedTuple):
    flags: list[str]
    poison: str | None = None  # "RANK:STEP": that process's loss NaN at that optimizer step (two-process run)
    per_device: int = 2  # pairs per process per step; the one-process run takes both processes' at once
    data: str = "hh.jsonl"  # written by the training_runs fixture


RUNS = {
    "amapo_spo_packed": Run(["--loss_type", "amapo", "--use_spo", "--spo_weight", "0.5"]),
    "amapo_spo_unshared": Run(["--loss_type", "amapo", "--use_spo", "--spo_weight", "0.5", "--prefix_sharing", "false"]),
    "dpo_rank1_skipped": Run(["--loss_type", "dpo", "--on_nonfinite", "skip"], poison="1:2"),
    # gathered EMA statistics, a data filter drawn over the global batch, WPO weights and LD-DPO sums
    "beta_dpo_wpo_ld": Run(["--loss_type", "beta_dpo", "--rho", "0.5", "--use_weighting", "true", "--ld_alpha", "0.5"]),
    # padding-free packing (on by default) with several pairs in a row: the rows are at most the micro-batch's
    # longest pair, so two pairs share one only beside a longer one; short stories mixed with long HH dialogues,
    # 4 per process. The FSDP-config launch (accelerate's FSDP2 config, trained as DDP on a CPU) runs it too.
    "amapo_padding_free": Run(["--loss_type", "amapo"], per_device=4, data="mixed.jsonl"),
}


def _single_process_run(work: Path, model: Path, out: Path, run: Run) -> None:
    """The same run on one process, both processes' pairs per step; a poisoned step poisons it whole."""
    from multiprocess_train import poison as poison_step

    from prefalign.cli import main as cli_main
    from prefalign.training.trainer import PreferenceTrainer

    original = PreferenceTrainer.pair_loss
    if run.poison:
        poison_step(0, int(run.poison.split(":")[1]))
    try:
        code = cli_main(["train", "--model_name_or_path", str(model), "--dataset", str(work / run.data), "--output_dir",
                         str(out), *TRAIN, "--per_device_train_batch_size", str(2 * run.per_device), *run.flags])
    finally:
        PreferenceTrainer.pair_loss = original
    assert code == 0


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    import gzip

    model = shared_path("models", "stories260K")
    work = tmp_path_factory.mktemp("training")
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]][:16]
    (work / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed_pairs(rows)))
    procs = {}
    for name, run in RUNS.items():
        argv = ["--poison", run.poison] if run.poison else []
        procs[name] = accelerate_launch(
            str(HERE / "multiprocess_train.py"), *argv, "--model_name_or_path", str(model), "--dataset",
            str(work / run.data), "--output_dir", str(work / name / "two"), *TRAIN, "--per_device_train_batch_size",
            str(run.per_device), *run.flags, log=work / f"{name}.log",
        )
    # accelerate's FSDP2 config on a CPU, and no --use_cpu: what a user of FSDP on GPUs types on this machine.
    fsdp_config = work / "accelerate_fsdp2.yaml"
    fsdp_config.write_text(ACCELERATE_FSDP2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    same = RUNS[FSDP_CONFIG_AS]  # the DDP run it must equal
    with (work / "fsdp_config_cli.log").open("w") as f:
        procs["fsdp_config_cli"] = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp_config),
             "--main_process_port", str(_free_port()), "-m", "prefalign.cli", "train", "--model_name_or_path",
             str(model), "--dataset", str(work / same.data), "--output_dir", str(work / "fsdp_config_cli"),
             *[t for t in TRAIN if t != "--use_cpu"], "--per_device_train_batch_size", str(same.per_device),
             *same.flags],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    fsdp_log = work / "fsdp2.log"
    with fsdp_log.open("w") as f:
        procs["fsdp2"] = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
             str(HERE / "fsdp2_worker.py"), str(model), str(work / "fsdp2")],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the one-process runs, here, while the launched ones run
        for name, run in RUNS.items():
            _single_process_run(work, model, work / name / "one", run)
    finally:
        torch.set_num_threads(threads)
    yield {"work": work, "procs": procs, "model": model}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def mixed_pairs(hh_rows: list[dict]) -> list[dict]:
    """PAIRS (short stories, 30-51 tokens a pair) and 8 HH dialogues (up to 144 at the run's lengths) as explicit
    prompt / chosen / rejected: a micro-batch holding a long pair packs short ones two or three to a row."""
    from multiprocess_worker import PAIRS

    turn = "\n\nAssistant:"
    long = []
    for r in hh_rows:
        cut = r["chosen"].rfind(turn) + len(turn)
        prompt = r["chosen"][:cut]
        if r["rejected"].startswith(prompt) and r["chosen"][cut:].strip() and r["rejected"][cut:].strip():
            long.append({"prompt": prompt, "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    assert len(long) >= 8, len(long)
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] + long[:8]


FSDP_CONFIG_AS = "amapo_padding_free"  # the RUNS entry the FSDP-config launch repeats

ACCELERATE_FSDP2 = """\
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


def _step_metrics(folder: Path) -> list[dict]:
    """metrics.jsonl's training rows without the wall-clock values."""
    return [{k: v for k, v in r.items() if k != "time_s" and not k.startswith("throughput/")}
            for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]


def test_accelerate_fsdp_config_on_cpu_trains_as_ddp_and_says_so(training_runs):
    """Without use_cpu transformers ran each of the two processes alone, both writing every step to the same
    metrics.jsonl; now they train together (set for them, and said), and the FSDP-on-CPU fallback is said.
    The fallback trains exactly as DDP: the weights of the same run launched with --multi_gpu, bit for bit, and
    the same metrics step by step (same processes, same batches, same ops; nothing of FSDP is applied)."""
    work = training_runs["work"]
    text = finish(training_runs["procs"]["fsdp_config_cli"], work / "fsdp_config_cli.log")
    assert "launched as 2 processes without a GPU: use_cpu set" in text
    assert "this CPU run trains as DDP" in text
    assert "started one process" not in text  # said where accelerate's CPU launcher started one, not 2
    rows = _step_metrics(work / "fsdp_config_cli")
    assert [r["step"] for r in rows] == [1, 2, 3]
    per_device = RUNS[FSDP_CONFIG_AS].per_device
    assert rows[0]["epoch"] == 2 * per_device / 16  # 16 pairs, 2 x 4 a step: both processes ran (alone: 0.25)
    ddp = work / FSDP_CONFIG_AS / "two"
    finish(training_runs["procs"][FSDP_CONFIG_AS], work / f"{FSDP_CONFIG_AS}.log")
    assert rows == _step_metrics(ddp)
    assert read_jsonl(work / "fsdp_config_cli" / "trained_pairs.jsonl") == read_jsonl(ddp / "trained_pairs.jsonl")
    got, expected = _weights(work / "fsdp_config_cli"), _weights(ddp)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_to_the_weights_of_one(training_runs, name):
    """DDP over gloo with SPO on, prefix sharing on and off, a rank whose batch turns non-finite, and packed rows
    holding several pairs: the same weights as one process on the same global batches (SGD, so float rounding
    stays at rounding size)."""
    work = training_runs["work"]
    text = finish(training_runs["procs"][name], work / f"{name}.log")
    assert "Traceback" not in text
    two, one = _weights(work / name / "two"), _weights(work / name / "one")
    start = load_file(training_runs["model"] / "model.safetensors")
    assert two.keys() == one.keys()
    for key in two:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    assert any(not torch.equal(one[k], start[k]) for k in one)  # the runs did train
    rows = [r for r in read_metrics(work / name / "two" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process
    # The pairs each step trained on, gathered from both processes: the one-process run's, step by step.
    trained = {k: [(r["step"], sorted(r["rows"])) for r in read_jsonl(work / name / k / "trained_pairs.jsonl")]
               for k in ("two", "one")}
    assert trained["two"] == trained["one"] and [s for s, _ in trained["two"]] == [1, 2, 3]
    run = RUNS[name]
    sizes = [len(rows) for _, rows in trained["two"]]  # 2 processes x per_device pairs; a dropped step: none
    assert sizes == [0 if s == 0 and run.poison else 2 * run.per_device for s in sizes]
    assert sizes.count(0) == (1 if run.poison else 0)
    if "spo" in name:
        assert all("spo/loss" in r for r in rows)
    if name == "beta_dpo_wpo_ld":
        assert all(r["beta_dpo/kept_fraction"] == 0.5 and "wpo/weight" in r for r in rows)
    if name == "dpo_rank1_skipped":
        assert rows[-1]["skipped/nonfinite_grad_steps"] == 1 and rows[-1]["skipped/nonfinite_loss_batches"] == 1
        assert abs(rows[0]["loss"] - 0.6931471805599453) < 1e-6  # reference pass on the sharded batches
    if name == "amapo_padding_free":
        _assert_packed(training_runs, run, read_jsonl(work / name / "two" / "trained_pairs.jsonl"), rows)


def _assert_packed(training_runs, run: Run, trained: list[dict], rows: list[dict]) -> None:
    """The two-process run's forwards ran on packed rows holding several pairs: tokens/processed (rows x
    columns of every micro-batch's packed input, over both processes) is, step by step, what first-fit
    decreasing packing of each process's pairs into rows no longer than its longest pair gives, and on some
    steps fewer than one pair per row would take. Every row is at least as long as the longest pair, so fewer
    tokens than pairs x longest pair means fewer rows than pairs."""
    from prefalign.config import load_config
    from prefalign.modeling.rows import first_fit_decreasing
    from prefalign.training.pipeline import load_tokenizer_for, prepare_data

    work = training_runs["work"]
    cfg = load_config(None, ["--model_name_or_path", str(training_runs["model"]), "--dataset", str(work / run.data),
                             "--output_dir", str(work / "lengths"), *TRAIN])
    data = prepare_data(cfg, load_tokenizer_for(cfg)).train
    length = {r["row_index"]: len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
              for r in data}

    def packed_tokens(lengths: list[int]) -> int:  # rows x width of one micro-batch's packed input
        rows_ = first_fit_decreasing(lengths)
        return len(rows_) * max(sum(lengths[i] for i in row) for row in rows_)

    packed, one_per_row = [], []
    for step in trained:  # the pairs gathered in process order: process 0's micro-batch, then process 1's
        per_process = [[length[i] for i in step["rows"][p * run.per_device : (p + 1) * run.per_device]]
                       for p in range(2)]
        packed.append(sum(packed_tokens(b) for b in per_process))
        one_per_row.append(sum(len(b) * max(b) for b in per_process))
    assert [r["tokens/processed"] for r in rows] == packed
    assert all(p <= o for p, o in zip(packed, one_per_row)) and packed != one_per_row, (packed, one_per_row)


def test_spo_runs_packed_and_unshared_reach_the_same_weights(training_runs):
    work = training_runs["work"]
    for name in ("amapo_spo_packed", "amapo_spo_unshared"):
        finish(training_runs["procs"][name], work / f"{name}.log")
    packed, unshared = _weights(work / "amapo_spo_packed" / "two"), _weights(work / "amapo_spo_unshared" / "two")
    for key in packed:
        torch.testing.assert_close(packed[key], unshared[key], atol=2e-5, rtol=1e-4)


def test_fsdp2_sharded_forward_path_trains_like_one_process(training_runs):
    """torch's FSDP2 (fully_shard, as accelerate's FSDP2 plugin applies it on GPUs) around prefalign's forward
    path: three SGD steps (padding-free packed, several pairs to a row; one pair per row; unshared) give one
    process's weights. The worker asserts that its packed rows are fewer than its pairs."""
    from fsdp2_worker import three_steps
    from multiprocess_worker import PAIRS, tokenized_rows

    from prefalign.models import load_model, load_tokenizer

    work = training_runs["work"]
    finish(training_runs["procs"]["fsdp2"], work / "fsdp2.log")
    got = load_file(work / "fsdp2" / "weights.safetensors")
    model_dir = training_runs["model"]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).train()
    three_steps(model, tokenized_rows(tokenizer, PAIRS), tokenizer.pad_token_id)
    expected = dict(model.named_parameters())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.detach(), atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
