"""A sweep's records survive misuse (issue 27, points 5, 6 and 11): a killed sweep leaves no cell training
behind and its rerun resumes the cell without writing a step twice; a second sweep on the same folder is
refused; a cell whose settings changed since it ran is never reused as the edited file's result; every cell
is checked before the first trains, and a cell that fails while training is reported and skipped."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.run_files import read_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread (tests/conftest.py)


def _data(tmp_path: Path) -> None:
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:28]))


def _sweep_file(tmp_path: Path, base_extra: str = ", learning_rate: 0.001",
                rest: str = "grid: {loss_type: [dpo], seed: [1]}\n", max_steps: int = 3) -> str:
    """A sweep on stories260K; loss_type is always given (the default loss is changing)."""
    if not (tmp_path / "train.jsonl").is_file():
        _data(tmp_path)
    model = shared_path("models", "stories260K")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"base: {{model_name_or_path: {model}, dataset: ./train.jsonl, eval_dataset: ./test.jsonl,\n"
        f"       max_steps: {max_steps}, per_device_train_batch_size: 2, max_length: 96, use_cpu: true,\n"
        f"       report_to: none, save_strategy: 'no', disable_tqdm: true{base_extra}}}\n"
        + rest + "output_dir: runs/sweep\n")
    return str(path)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; it only waits for its parent to read its status


def _wait_for(what, timeout: float = 120.0, every: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    return None


def _steps(rows: list[dict], key: str) -> list[int]:
    return [r["step"] for r in rows if key in r]


def _logged_steps(run_dir: Path) -> list[int]:
    """Training steps in metrics.jsonl so far (a line being written is not one yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return _steps(rows, "loss")


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")


@needs_proc
def test_sigterm_to_a_sweep_stops_its_training_cell_and_a_rerun_resumes_it_without_repeating_a_step(tmp_path):
    """27.5: the signal is passed to the cell's `prefalign train` (which saves a checkpoint), the sweep waits
    for it and exits 143 saying so; no process is left training, and the rerun resumes the cell."""
    path = _sweep_file(tmp_path, ", learning_rate: 0.001, logging_steps: 1, gradient_accumulation_steps: 4",
                       max_steps=16)
    run_dir = tmp_path / "runs" / "sweep" / "dpo" / "seed1"
    sweep = subprocess.Popen([sys.executable, "-m", "prefalign.cli", "sweep", path], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        child = _wait_for(lambda: next(iter(_children(sweep.pid)), None))
        assert child is not None, "the sweep never started its cell"
        # once the cell trains (a logged step): SIGTERM to the sweep alone, as a scheduler or `kill` sends it
        assert _wait_for(lambda: _logged_steps(run_dir)), "the cell never logged a step"
        sweep.send_signal(signal.SIGTERM)
        out, err = sweep.communicate(timeout=120)
        assert not _alive(child), "the sweep left its cell training (an orphan)"
        assert sweep.returncode == 143, err
        assert "interrupted by SIGTERM: dpo/seed1 saved a checkpoint and stopped" in err
        assert any(p.name.startswith("checkpoint-") for p in run_dir.iterdir())
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert cli_main(["sweep", path]) == 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("loss", "eval_ranking_accuracy"):
        steps = _steps(rows, key)
        assert len(steps) == len(set(steps)), f"steps written twice: {sorted(steps)}"
    assert max(_steps(rows, "loss")) == 16
    assert json.loads((run_dir / "train_summary.json").read_text())["global_step"] == 16


FAKE_LAUNCHER = """
import os, signal, sys, time
out = sys.argv[1]
def stop(signum, frame):
    with open(out, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
with open(out, "a") as f:
    f.write("started\\n")
time.sleep(120)
"""


@needs_proc
def test_ctrl_c_reaches_the_sweep_only_which_asks_its_cell_to_checkpoint_with_sigterm(tmp_path):
    """27.5 with SIGINT to the sweep's whole process group (a Ctrl-C at the terminal): the cell is not hit by
    the SIGINT (a KeyboardInterrupt would lose its steps) but asked with SIGTERM, and waited for."""
    got = tmp_path / "signals.txt"
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    path = _sweep_file(tmp_path, rest=f"grid: {{loss_type: [dpo], seed: [1]}}\n"
                                      f"launcher: {sys.executable} {tmp_path / 'launcher.py'} {got}\n")
    # As a shell starts a foreground job: SIGINT at its default. A test run started in the background by a
    # script (`pytest ... &`) inherits it ignored, and the sweep rightly leaves an ignored SIGINT alone.
    sweep = subprocess.Popen([sys.executable, "-m", "prefalign.cli", "sweep", path], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child = None
    try:
        assert _wait_for(lambda: got.is_file() and "started" in got.read_text())
        child = next(iter(_children(sweep.pid)), None)
        os.killpg(sweep.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the foreground group
        try:
            out, err = sweep.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sweep.kill()
            out, err = sweep.communicate()
            pytest.fail(f"the sweep did not stop; its cell got {got.read_text().split()}: {err[-3000:]}")
        assert got.read_text().split() == ["started", "SIGTERM"]
        assert child is not None and not _alive(child)
        assert sweep.returncode == 130, err
        assert "interrupted by SIGINT: dpo/seed1 saved a checkpoint and stopped" in err
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_second_sweep_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    """27.5: the sweep folder is locked; a second `prefalign sweep` gets one line naming the holder and
    trains nothing. --dry-run only reads, and still works."""
    path = _sweep_file(tmp_path)
    out_dir = tmp_path / "runs" / "sweep"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prefalign.run_lock import RunLock; "
         "RunLock(sys.argv[1], 'sweep').acquire(); print('locked', flush=True); time.sleep(120)", str(out_dir)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(["sweep", path]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by prefalign sweep (pid {holder.pid} " in err and err.count("\n") == 0, err
        assert not (out_dir / "dpo").exists()
        assert cli_main(["sweep", path, "--dry-run"]) == 0
        assert capsys.readouterr().out.startswith("dpo/seed1: to run")
    finally:
        holder.kill()
        holder.wait()


def test_an_edited_sweep_file_never_reuses_cells_trained_with_other_settings(tmp_path, capsys):
    """27.6: each cell's settings are recorded; after the file changes, the sweep refuses in one line naming
    the cells and keys, the report leaves the old cells out, and --rerun-changed trains them again with the
    old run kept beside."""
    rest = ("methods: {dpo: {loss_type: dpo}, ipo: {loss_type: ipo}}\ngrid: {seed: [1]}\nbaseline: dpo\n")
    path = _sweep_file(tmp_path, ", learning_rate: 0.0005", rest=rest)
    out_dir = tmp_path / "runs" / "sweep"
    assert cli_main(["sweep", path, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first["methods"]) == {"dpo", "ipo"} and "missing" not in first
    metrics = (out_dir / "dpo" / "seed1" / "metrics.jsonl").read_text()

    # A learning_rate added to base (the case): every cell changed, refused before anything trains.
    _sweep_file(tmp_path, ", learning_rate: 0.001, lr_scheduler_type: constant", rest=rest)
    assert cli_main(["sweep", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 of 2 cells were trained with other settings" in err
    assert "dpo/seed1, ipo/seed1: learning_rate 0.0005 -> 0.001, lr_scheduler_type linear -> constant" in err, err
    assert "--rerun-changed" in err and "finished before" not in err
    assert json.loads((out_dir / "cells" / "dpo-seed1.settings.json").read_text())["settings"]["learning_rate"] == 0.0005
    assert (out_dir / "dpo" / "seed1" / "metrics.jsonl").read_text() == metrics
    assert cli_main(["sweep", path, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("dpo/seed1: changed since it ran: learning_rate 0.0005 -> 0.001")

    # Only ipo changed: the report presents dpo alone and says why ipo is not in it.
    _sweep_file(tmp_path, ", learning_rate: 0.0005",
                rest=rest.replace("ipo: {loss_type: ipo}", "ipo: {loss_type: ipo, beta: 0.5}"))
    assert cli_main(["sweep", path]) == 2
    assert "1 of 2 cells were trained with other settings" in capsys.readouterr().err
    assert cli_main(["sweep", path, "--report-only", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got["methods"]) == {"dpo"} and got["methods"]["dpo"] == first["methods"]["dpo"]
    assert got["paired"] == {} and list(got["missing"]) == ["ipo/seed1"]
    assert "trained with other settings than the file gives now (beta unset -> 0.5)" in got["missing"]["ipo/seed1"]
    report = (out_dir / "report" / "sweep_report.md").read_text()
    assert "1 of 2 runs (1 not in this report" in report and "| ipo |" not in report
    assert "- ipo/seed1: trained with other settings" in report

    # --rerun-changed: ipo trains again, its old run kept; the report has both methods again.
    assert cli_main(["sweep", path, "--rerun-changed", "--json"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["methods"]) == {"dpo", "ipo"}
    assert "dpo/seed1: finished before, skipped" in captured.err
    assert (out_dir / "ipo" / "seed1.replaced-1" / "train_summary.json").is_file()
    assert json.loads((out_dir / "ipo" / "seed1" / "prefalign_config.json").read_text())["beta"] == 0.5
    assert cli_main(["sweep", path, "--dry-run"]) == 0
    assert capsys.readouterr().out.count(": finished ->") == 2


def test_every_cell_is_checked_before_the_first_trains(tmp_path, capsys):
    """27.11: a bad grid value is one line naming the cells and the error, before any cell trains."""
    path = _sweep_file(tmp_path, rest="grid: {loss_type: [dpo], beta: [0.1, -1], seed: [1, 2]}\n")
    assert cli_main(["sweep", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert ("2 of 4 cells cannot run, nothing was trained: beta=-1/seed1, beta=-1/seed2: beta: must be > 0"
            in err), err
    assert not (tmp_path / "runs" / "sweep" / "beta=0.1").exists()
    path = _sweep_file(tmp_path, rest="grid: {loss_type: [dpo], learning_rate: [0.001, abc]}\n")
    assert cli_main(["sweep", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "learning_rate='abc'" in err, err


def test_a_cell_that_fails_while_training_is_reported_and_skipped_and_the_report_marks_it(tmp_path, capsys):
    """27.11: the other cells still run, the report (and --report-only, and a rerun) marks the failed cell
    missing; the sweep's exit status says it is not complete."""
    rest = ("methods: {broken: {loss_type: dpo, dataset: ./no-such-file.jsonl}, dpo: {loss_type: dpo}}\n"
            "grid: {seed: [1]}\nbaseline: dpo\n")
    path = _sweep_file(tmp_path, rest=rest)
    out_dir = tmp_path / "runs" / "sweep"
    assert cli_main(["sweep", path, "--json"]) == 1
    captured = capsys.readouterr()
    assert "[1/2] broken/seed1: failed (exit 2: " in captured.err and "skipped, the other cells go on" in captured.err
    assert "1 of 2 cells failed (broken/seed1)" in captured.err
    got = json.loads(captured.out)
    assert set(got["methods"]) == {"dpo"} and list(got["missing"]) == ["broken/seed1"]
    assert (out_dir / "dpo" / "seed1" / "eval_results.json").is_file()
    assert got["missing"]["broken/seed1"].startswith("not finished (its log ends: prefalign: error: ")
    assert "no-such-file.jsonl" in got["missing"]["broken/seed1"]
    assert "- broken/seed1: not finished" in (out_dir / "report" / "sweep_report.md").read_text()
    assert cli_main(["sweep", path, "--report-only", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == got["missing"]
    assert cli_main(["sweep", path, "--json"]) == 1  # rerun: fails the same way, the finished cell is kept
    captured = capsys.readouterr()
    assert "dpo/seed1: finished before, skipped" in captured.err and json.loads(captured.out) == got
