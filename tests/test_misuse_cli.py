"""Records survive misuse, through the command line as a user types it (issue 27, points 7, 10 and 11; issue
26's last point): outputs are replaced only when asked, a write into a run folder waits for no one and is
refused while another process holds the run, edge inputs are one line naming what is wrong (never a
traceback), and `eval` on a run folder keeps the run's lengths unless a new max_length leaves them no room.

The model is the tiny real stories260K from ../shared; a "run folder" is a copy of it with a
prefalign_config.json, which is what `prefalign eval`, `bench` and `generate` read from a run."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.run_files import LOCK_FILE

ERROR = "prefalign: error: "
PROMPTS = ["Once upon a time there was a cat.", "Tom had a red ball.", "The dog was sad.", "Mom made a cake.",
           "Lily saw a bird."]
GOOD = [" The cat played in the sun.", " He threw it to Sam and they laughed.", " A girl gave him a hug.",
        " It was sweet and warm.", " It sang a happy song."]
BAD = [" Sun cat the.", " Ball ball.", " Sad.", " It was a car.", " Bird bird bird bird."]
STYLES = [lambda t: t, lambda t: t + " It was a long and happy day.", lambda t: t + "\n\n**The end.**"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir():
    return shared_path("models", "stories260K")


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": g, "rejected": b}
                                                  for p, g, b in zip(PROMPTS, GOOD, BAD)])


def make_run(model_dir, folder, **config):
    """A run folder as eval/bench/generate see one: the model's files and its prefalign_config.json."""
    shutil.copytree(model_dir, folder)
    for f in folder.iterdir():
        f.chmod(0o644)  # ../shared is read-only; the copy is ours
    (folder / "prefalign_config.json").write_text(json.dumps({"loss_type": "dpo", **config}))
    return folder


def one_line_error(capsys, argv) -> str:
    """Exit status 2 and, as the last line on stderr (progress bars may come before it), one error line."""
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(ERROR), err
    return last[len(ERROR):]


# -- 27.7: an existing output is replaced only with --overwrite ------------------------------------------------
def test_eval_per_pair_keeps_a_runs_own_record_unless_overwrite(model_dir, pairs, tmp_path, capsys):
    run = make_run(model_dir, tmp_path / "run")
    record = run / "eval_per_pair.jsonl"
    record.write_text('{"index": 0, "correct": true}\n')  # the run's own held-out records (eval_results.json agrees)
    argv = ["eval", "--model", str(run), "--dataset", str(pairs), "--per-pair", str(record)]
    err = one_line_error(capsys, argv)
    assert err == f"{record} exists: pass --overwrite to replace it, or --per-pair another file"
    assert record.read_text() == '{"index": 0, "correct": true}\n'
    elsewhere = tmp_path / "mine.jsonl"  # any file, not only a run's
    elsewhere.write_text("notes\n")
    assert "exists: pass --overwrite" in one_line_error(capsys, [*argv[:-1], str(elsewhere)])
    assert elsewhere.read_text() == "notes\n"
    assert cli_main([*argv, "--overwrite", "--json"]) == 0  # asked for: replaced
    assert json.loads(capsys.readouterr().out)["n_pairs"] == 5
    assert [json.loads(line)["index"] for line in record.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert not (run / LOCK_FILE).exists()  # the run's lock was held for the write and released after it


def test_compare_keeps_an_earlier_report_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "prefalign_config.json").write_text(json.dumps({"loss_type": "dpo"}))
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}])
    out = tmp_path / "report"
    assert cli_main(["compare", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "report.md").write_text("my edited report\n")
    err = one_line_error(capsys, ["compare", str(run), "--out", str(out)])
    assert err == f"{out / 'report.md'} exists: pass --overwrite to replace it, or --out another folder"
    assert (out / "report.md").read_text() == "my edited report\n"
    assert cli_main(["compare", str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.md").read_text().startswith("# Comparison of 1 training run")


# -- one writer per run folder --------------------------------------------------------------------------------
@pytest.fixture
def held_run(model_dir, tmp_path):
    """A run folder whose lock is held by another live process on this host (a `sleep`)."""
    run = make_run(model_dir, tmp_path / "run")
    holder = subprocess.Popen(["sleep", "600"])
    lock = {"pid": holder.pid, "host": socket.gethostname(), "purpose": "train", "since": "2026-12-05T10:00:00+00:00"}
    (run / LOCK_FILE).write_text(json.dumps(lock) + "\n")
    yield run, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command", ["eval", "bench", "generate"])
def test_a_write_into_a_run_held_by_another_process_is_refused_naming_it(command, held_run, pairs, tmp_path,
                                                                         capsys):
    run, pid = held_run
    lock_before, names_before = (run / LOCK_FILE).read_text(), sorted(p.name for p in run.iterdir())
    rm = tmp_path / "rm"
    rm.mkdir()
    write_jsonl(rm / "chat_filtered.jsonl", [{"prompt": PROMPTS[0], "chosen": [f(GOOD[0]) for f in STYLES],
                                              "rejected": [f(BAD[0]) for f in STYLES]}])
    argv = {"eval": ["eval", "--model", str(run), "--dataset", str(pairs), "--per-pair", str(run / "new.jsonl")],
            "bench": ["bench", "rm-bench", "--model", str(run), "--dataset", str(rm)],  # writes run/bench/…
            "generate": ["generate", "--model", str(run), "--dataset", str(pairs)]}[command]  # run/generations.jsonl
    err = one_line_error(capsys, argv)
    assert err.startswith(f"{run} is in use by prefalign train (pid {pid} on {socket.gethostname()}")
    assert f"delete {run / LOCK_FILE}" in err
    assert sorted(p.name for p in run.iterdir()) == names_before  # nothing written
    assert (run / LOCK_FILE).read_text() == lock_before  # the holder's lock is untouched


# -- 27.10: edge inputs are one line, not a traceback ---------------------------------------------------------
@pytest.mark.parametrize(("flags", "message"), [
    (["--limit", "0"], "--limit 0: must be at least 1 (leave it out to evaluate every pair)"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_eval_counts_of_zero_are_one_line(flags, message, model_dir, pairs, capsys):
    assert one_line_error(capsys, ["eval", "--model", str(model_dir), "--dataset", str(pairs), *flags]) == message


def test_eval_on_a_file_whose_every_pair_is_skipped_is_one_line(model_dir, tmp_path, capsys):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": p, "chosen": g, "rejected": g}
                                                 for p, g in zip(PROMPTS, GOOD)])
    err = one_line_error(capsys, ["eval", "--model", str(model_dir), "--dataset", str(same)])
    assert err == f"{same}: no pair left to evaluate: every one was skipped (identical 5)"


@pytest.mark.parametrize("temperature", ["0", "nan"])
def test_generate_sampling_at_a_temperature_that_cannot_sample_is_one_line(temperature, model_dir, pairs, tmp_path,
                                                                           capsys):
    out = tmp_path / "gen.jsonl"
    err = one_line_error(capsys, ["generate", "--model", str(model_dir), "--dataset", str(pairs), "--sample",
                                  "--temperature", temperature, "--out", str(out)])
    assert err.startswith(f"--temperature {float(temperature)}: sampling needs a positive number")
    assert not out.exists()


def test_a_truncated_model_safetensors_is_one_line_naming_it_in_eval_and_train(model_dir, pairs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:  # a copy cut short (a full disk, a killed transfer)
        f.truncate(weights.stat().st_size // 2)
    expected = f"cannot load model {broken}: {weights} is incomplete or corrupt ("
    err = one_line_error(capsys, ["eval", "--model", str(broken), "--dataset", str(pairs)])
    assert err.startswith(expected) and err.endswith("); copy or save it again")
    err = one_line_error(capsys, ["train", "--model_name_or_path", str(broken), "--dataset", str(pairs),
                                  "--output_dir", str(tmp_path / "out"), "--loss_type", "dpo", "--use_cpu",
                                  "--report_to", "none", "--max_steps", "1", "--per_device_train_batch_size", "2",
                                  "--max_length", "64", "--disable_tqdm", "true"])
    assert err.startswith(expected)


# -- 27.11: messages that say what is wrong ---------------------------------------------------------------------
def test_rm_bench_with_missing_domains_says_so_beside_the_score(model_dir, tmp_path, capsys):
    folder = tmp_path / "rm"
    folder.mkdir()
    rows = [{"id": i, "prompt": PROMPTS[i], "chosen": [f(GOOD[i]) for f in STYLES],
             "rejected": [f(BAD[i]) for f in STYLES]} for i in range(2)]
    (folder / "chat_filtered.json").write_text(json.dumps(rows))  # one domain of four
    assert cli_main(["bench", "rm-bench", "--model", str(model_dir), "--dataset", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    score = next(line for line in lines if line.startswith("  score "))
    assert score.endswith("(mean of 1 of 4 domains, chat: no prompt scored in math, code, safety; not RM-Bench's "
                          "score)")
    assert any(line.startswith("  mean of 1 ") for line in lines)  # the total row is not called "total"


@pytest.mark.parametrize("benchmark", ["rewardbench", "rm-bench"])
def test_bench_limit_zero_is_one_line_about_the_limit(benchmark, model_dir, tmp_path, capsys):
    data = tmp_path / "rm"
    data.mkdir()
    write_jsonl(data / "chat_filtered.jsonl", [{"prompt": p, "chosen": [g] * 3, "rejected": [b] * 3, "subset": "x"}
                                               for p, g, b in zip(PROMPTS, GOOD, BAD)])
    if benchmark == "rewardbench":
        data = write_jsonl(tmp_path / "rb.jsonl", [{"prompt": p, "chosen": g, "rejected": b, "subset": "hep-go"}
                                                   for p, g, b in zip(PROMPTS, GOOD, BAD)])
    err = one_line_error(capsys, ["bench", benchmark, "--model", str(model_dir), "--dataset", str(data),
                                  "--limit", "0"])
    part = "subset" if benchmark == "rewardbench" else "domain"
    assert err == f"--limit 0: must be at least 1 (the first N rows of each {part}; leave it out for all)"


def test_eval_lengths_that_drop_every_pair_are_one_line(model_dir, tmp_path, capsys):
    # chosen and rejected share their first words: cut to a few tokens they are the same response
    prefix = write_jsonl(tmp_path / "prefix.jsonl", [
        {"prompt": p, "chosen": " The cat played in the sun all day.", "rejected": " The cat played in the sun and then "
         "slept."} for p in PROMPTS[:3]])
    err = one_line_error(capsys, ["eval", "--model", str(model_dir), "--dataset", str(prefix), "--max-length", "6"])
    assert err == (f"{prefix}: every one of its 3 pairs was dropped by truncation to max_length 6 (derived per pair): "
                   "identical_after_truncation 3; raise --max-length")
    err = one_line_error(capsys, ["eval", "--model", str(model_dir), "--dataset", str(prefix), "--max-length", "1"])
    assert err == "--max-length 1: must be at least 2 (a completion token is scored from the tokens before it)"


def test_rm_bench_row_with_a_null_domain(model_dir, tmp_path, capsys):
    """A row whose `domain` is null takes its file's name as the rows without the column do — one such row
    used to put a null domain in every row of the file and fail at row 1; where neither names a domain, the
    message names that row."""
    folder = tmp_path / "rm"
    folder.mkdir()
    rows = [{"id": i, "prompt": PROMPTS[i], "chosen": [f(GOOD[i]) for f in STYLES],
             "rejected": [f(BAD[i]) for f in STYLES]} for i in range(4)]
    rows[2]["domain"] = None
    (folder / "chat_filtered.json").write_text(json.dumps(rows))
    assert cli_main(["bench", "rm-bench", "--model", str(model_dir), "--dataset", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["domains"]) == ["chat"] and result["n_prompts"] == 4
    misc = tmp_path / "misc.json"  # a file name that is no domain: the null row is the one named
    misc.write_text(json.dumps([{**r, "domain": None if i == 2 else "code"} for i, r in enumerate(rows)]))
    err = one_line_error(capsys, ["bench", "rm-bench", "--model", str(model_dir), "--dataset", str(misc)])
    assert err.startswith(f"{misc}: row 3: no domain: 'misc.json' (the row's 'domain', else its file's name)")


def test_a_tokenizer_that_cannot_load_is_the_whole_message(model_dir, pairs, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer-file"
    shutil.copytree(model_dir, folder)
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    err = one_line_error(capsys, ["eval", "--model", str(folder), "--dataset", str(pairs)])
    assert err.startswith(f"cannot load tokenizer {folder}: Couldn't instantiate the backend tokenizer from one of: "
                          "(1) a `tokenizers` library serialization file, (2)")
    assert err.endswith("to a fast one.")


# -- 26: eval on a run folder keeps its lengths, unless a new max_length leaves them no room --------------------
def test_eval_on_a_run_derives_the_prompt_share_when_a_new_max_length_leaves_it_no_room(model_dir, tmp_path, capsys,
                                                                                       caplog):
    run = make_run(model_dir, tmp_path / "run", max_length=64, max_prompt_length=32)
    # prompts of 12, 47, 9, 52 and 9 tokens: the run's max_prompt_length 32 cuts two of them to 32 tokens
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": (p + " ") * (1 + 4 * (i % 2)), "chosen": g, "rejected": b}
                                                 for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))])

    def evaluate(model, *flags):
        assert cli_main(["eval", "--model", str(model), "--dataset", str(data), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    kept = evaluate(run)  # the run's own lengths
    assert kept["settings"]["max_length"] == 64 and kept["settings"]["max_prompt_length"] == 32
    assert kept["n_pairs"] == 5
    with caplog.at_level(logging.WARNING, logger="prefalign.evaluate"):
        derived = evaluate(run, "--max_length", "32")  # the run's 32-token prompts would leave nothing
    assert derived["n_pairs"] == 5 and derived["skipped"] == {}  # was 3, with truncated_to_nothing 2
    assert derived["settings"]["max_length"] == 32 and derived["settings"]["max_prompt_length"] is None
    notes = [r.getMessage() for r in caplog.records if r.name == "prefalign.evaluate"]
    assert notes == [f"{run}: its max_prompt_length 32 leaves no room for completions within max_length 32, so the "
                     "prompt's share is derived per pair as train derives it from max_length alone "
                     "(--max-prompt-length sets it)"]
    # derived as train derives it: the same numbers as the model evaluated with max_length 32 and nothing else
    plain = evaluate(model_dir, "--max_length", "32")
    assert derived["mean_delta"] == pytest.approx(plain["mean_delta"], abs=1e-6)
    assert derived["chosen_len_mean"] == plain["chosen_len_mean"]
    # asked for explicitly, a prompt share that leaves no room is refused as train refuses it
    err = one_line_error(capsys, ["eval", "--model", str(run), "--dataset", str(data), "--max_length", "32",
                                  "--max_prompt_length", "32"])
    assert err.startswith("--max-prompt-length 32 must be smaller than --max-length 32")
