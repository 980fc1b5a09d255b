"""Malformed data and configs through the real command line: exit status 2 and one line that names the file,
row or key and the problem (or, for degenerate rows, a counted skip); never a traceback unless --debug.

The loaders' own tests (test_data_*.py, test_config.py) check the messages in detail; here every case goes
through `python -m prefalign.cli` in its own process, and we look at what a user sees: the exit status and
stderr. Importing torch + transformers + datasets costs 5-15 s per process on this machine, so the processes
are forked from one warm parent that has imported them (see `CliProcesses`); each child then runs the module
`prefalign.cli` as `__main__` exactly as `python -m prefalign.cli ARGS` does, with its own stdout, stderr
and exit status. Set PREFALIGN_TEST_FRESH_CLI=1 to start a fresh interpreter for every case instead.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import shared_path

ERROR = "prefalign: error: "

# Runs in the warm parent: import the slow libraries once, then fork one child per request read from stdin.
ZYGOTE = textwrap.dedent(
    """
    import importlib, json, os, runpy, sys, traceback
    for name in sys.argv[1:]:
        importlib.import_module(name)
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(job["cwd"])
                for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                sys.argv = ["prefalign", *job["argv"]]
                try:  # what `python -m prefalign.cli ARGS` does, uncaught exceptions included
                    runpy.run_module("prefalign.cli", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\\n")
        sys.stdout.flush()
    """
)
PRELOAD = [
    "torch",
    "transformers",
    "datasets",
    "peft",
    "transformers.models.llama.modeling_llama",
    "prefalign.config",
    "prefalign.training.pipeline",
    "prefalign.training.trainer",
    "prefalign.data.load",
    "prefalign.data.tokenize",
]
TIMEOUT = 180


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


class CliProcesses:
    """`run(argv)` = `python -m prefalign.cli *argv` in a new process (forked from a warm parent when possible)."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env, self.count = workdir, env, 0
        self.fresh = os.environ.get("PREFALIGN_TEST_FRESH_CLI") == "1" or not hasattr(os, "fork")
        self.zygote = None
        if not self.fresh:
            self.zygote = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE, *PRELOAD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                cwd=workdir,
                text=True,
            )
            assert self._reply() == "ready"

    def _reply(self) -> str:
        ready, _, _ = select.select([self.zygote.stdout], [], [], TIMEOUT)
        if not ready:
            self.close()
            raise TimeoutError(f"the CLI did not finish within {TIMEOUT} s")
        return self.zygote.stdout.readline().strip()

    def run(self, *argv: str) -> Result:
        argv = [str(a) for a in argv]
        if self.fresh:
            p = subprocess.run([sys.executable, "-m", "prefalign.cli", *argv], capture_output=True, text=True,
                               env=self.env, cwd=self.workdir, timeout=TIMEOUT)
            return Result(p.returncode, p.stdout, p.stderr)
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        job = {"argv": argv, "cwd": str(self.workdir), "stdout": str(out), "stderr": str(err)}
        self.zygote.stdin.write(json.dumps(job) + "\n")
        self.zygote.stdin.flush()
        code = int(self._reply())
        return Result(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.stdin.close()
            try:
                self.zygote.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # tiny model; on a shared CPU more threads only wait for each other
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets"),  # throw-away files stay out of the user's cache
        "TQDM_DISABLE": "1",  # progress bars are not what these tests look at
        "TRANSFORMERS_VERBOSITY": "error",
    }
    runner = CliProcesses(work, env)
    yield runner
    runner.close()


def check_one_line_error(result: Result, pattern: str, *, alone: bool = True) -> None:
    """Exit status 2, no traceback, and the error is one line, matching `pattern` (a regex), at the end of
    stderr; `alone`: nothing else on stderr (not even INFO lines, which come once the data has loaded)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or (not alone and not any(line.startswith(ERROR) for line in lines[:-1])), result.stderr
    assert lines[-1].startswith(ERROR), lines[-1]
    assert re.fullmatch(pattern, lines[-1][len(ERROR) :]), lines[-1]


def train_argv(dataset, out, *extra) -> list[str]:
    return ["train", "--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset", str(dataset),
            "--use_cpu", "--report_to", "none", "--max_steps", "1", "--output_dir", str(out),
            "--save_strategy", "no", "--disable_tqdm", "true", "--max_length", "64", "--max_prompt_length", "32",
            *extra]


GOOD = [
    {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " dog dog dog"},
    {"prompt": "The sun", "chosen": " was warm and bright.", "rejected": " the the the"},
    {"prompt": "Lily had a ball", "chosen": " and she liked to play.", "rejected": " ball ball"},
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# name: (file name, bytes, regex of the message after the path)
DATA_CASES = {
    "invalid_json_line": (
        "p.jsonl", jsonl(GOOD[:1]) + b'{"prompt": "Q", "chosen": "a" "rejected": "b"}\n',
        r"line 2: invalid JSON: Expecting ',' delimiter \(character 31\)",
    ),
    "invalid_json_document": (
        "p.json", b'[\n {"prompt": "Q", "chosen": "a", "rejected": "b"},\n {"prompt": "Q",, "chosen": "a"}\n]',
        r"line 3: invalid JSON: Expecting property name enclosed in double quotes \(character 17\)",
    ),
    "json_line_not_an_object": ("p.jsonl", jsonl(GOOD[:1]) + b"[1, 2]\n", r"line 2: expected a JSON object, found an array"),
    "missing_column": (
        "p.jsonl", jsonl([{"prompt": "Q", "chosen": "a"}]),
        r"row 1: missing column 'rejected' \(found: prompt, chosen\); map another column with --columns rejected=NAME",
    ),
    "misspelled_column": (
        "p.jsonl", jsonl([{"prompt": "Q", "chosen": "a", "rejectd": "b"}]),
        r"row 1: missing column 'rejected' \(found: prompt, chosen, rejectd\); "
        r"did you mean 'rejectd'\? Map it with --columns rejected=rejectd",
    ),
    "wrong_type_in_one_row": (
        "p.jsonl", jsonl([GOOD[0], {"prompt": "Q", "chosen": 5, "rejected": "b"}]),
        r"row 2: column 'chosen' is a number, expected a string",
    ),
    "wrong_type_in_every_row": (
        "p.jsonl", jsonl([{"prompt": "Q", "chosen": [1, 2], "rejected": [3]}]),
        r"row 1: column 'chosen' is a list, expected a string or a list of \{role, content\} messages",
    ),
    "null_value": (
        "p.jsonl", jsonl([GOOD[0], {"prompt": "Q", "chosen": "a", "rejected": None}]),
        r"row 2: column 'rejected' is missing or null, expected a string",
    ),
    "non_utf8_bytes": (
        "p.jsonl", jsonl(GOOD[:1]) + jsonl(GOOD[1:2]).replace(b"The sun", b"The s\xffn"),
        r"line 2: not valid UTF-8 \(byte 0xff at character 18\)",
    ),
    "non_utf8_csv": (
        "p.csv", b"prompt,chosen,rejected\nQ1,a,b\nQ2,c\xfe,d\n", r"line 3: not valid UTF-8 \(byte 0xfe at character 5\)",
    ),
    "empty_file": ("p.jsonl", b"", r"empty file \(no rows\)"),
    "blank_lines_only": ("p.jsonl", b"\n\n  \n", r"empty file \(no rows\)"),
    "csv_header_only": ("p.csv", b"prompt,chosen,rejected\n", r"empty file \(no rows\)"),
    "unsupported_file_type": (
        "p.txt", b"hello\n", r"unsupported file type \(expected \.jsonl\.gz, \.jsonl, \.json, \.parquet, \.csv\)",
    ),
}


def write_case(folder: Path, name: str) -> tuple[Path, str]:
    file_name, content, message = DATA_CASES[name]
    path = folder / name / file_name
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path, f"{re.escape(str(path))}: {message}"


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_malformed_data_file(cli, tmp_path, case, command):
    path, pattern = write_case(tmp_path, case)
    argv = train_argv(path, tmp_path / "run") if command == "train" else ["data", "inspect", path]
    check_one_line_error(cli.run(*argv), pattern)


def test_missing_dataset(cli, tmp_path):
    missing = tmp_path / "nope.jsonl"
    check_one_line_error(cli.run(*train_argv(missing, tmp_path / "run")), f"{re.escape(str(missing))}: no such file or folder")


# -- degenerate rows: counted and skipped; an error only when asked for, or when nothing is left ----------

DEGENERATE = [
    *GOOD,
    {"prompt": "Q", "chosen": " same", "rejected": " same"},  # row 4
    {"prompt": "Q", "chosen": "   ", "rejected": " an answer"},  # row 5
    {"prompt": "Q", "chosen": " an answer", "rejected": ""},  # row 6
]


def test_degenerate_rows_are_counted_and_skipped(cli, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(DEGENERATE))
    result = cli.run(*train_argv(path, tmp_path / "run", "--loss_type", "amapo"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert (report["n_rows"], report["n_pairs"]) == (6, 3)
    assert report["skipped"] == {"empty_completion": 2, "identical": 1}
    assert "skipped: empty_completion 2, identical 1" in result.stderr  # the loader's INFO line

    inspected = cli.run("data", "inspect", path, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["skipped"] == {"empty_completion": 2, "identical": 1}


def test_degenerate_row_is_an_error_when_asked(cli, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(DEGENERATE))
    result = cli.run(*train_argv(path, tmp_path / "run", "--on_bad_row", "error"))
    check_one_line_error(
        result,
        rf"{re.escape(str(path))}: row 4: chosen and rejected are identical "
        r"\(on_bad_row='error'; 'skip' drops and counts such pairs\)",
    )


def test_only_degenerate_rows(cli, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(DEGENERATE[3:]))
    result = cli.run(*train_argv(path, tmp_path / "run"))
    check_one_line_error(
        result,
        rf"{re.escape(str(path))}: no usable pairs \(skipped: empty_completion: 2, identical: 1\)",
        alone=False,  # the loader's INFO line (rows read, skips) comes first
    )


def over_long_rows() -> list[dict]:
    long_prompt = "Once upon a time there was a big red ball. " * 4000  # ~170k characters, ~40k tokens
    shared = " The cat sat on the mat and looked at the sky." * 200  # far past max_length
    return [
        *GOOD,
        {"prompt": long_prompt, "chosen": " A happy end.", "rejected": " sad sad sad"},  # row 4: truncated, kept
        {"prompt": "Q", "chosen": shared + " Yes.", "rejected": shared + " No."},  # row 5: equal within max_length
    ]


def test_over_long_rows_are_truncated_or_counted(cli, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(over_long_rows()))
    result = cli.run(*train_argv(path, tmp_path / "run", "--loss_type", "amapo"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert (report["n_rows"], report["n_pairs"], report["skipped"]) == (5, 4, {"identical_after_truncation": 1})

    result = cli.run(*train_argv(path, tmp_path / "run2", "--on_bad_row", "error"))
    # The tokenizer stage names the row by its 0-based row_index (the file stage says "FILE: row N").
    check_one_line_error(
        result,
        r"row_index 4: chosen and rejected are identical once truncated to max_length "
        r"\(on_bad_row='error'; 'skip' drops and counts such pairs\)",
        alone=False,  # the file itself was fine: its INFO line (rows read) comes first
    )


# -- configs ----------------------------------------------------------------------------------------------

# name: (extra flags, regex of the whole message). The later cases were tracebacks once; their patterns
# ask only that the one line name the key.
CONFIG_CASES = {
    "unknown_flag": (["--learning_rat", "1e-4"], r"command line: unknown key 'learning_rat'; did you mean 'learning_rate'\?"),
    "unknown_loss": (["--loss_type", "dpoo"], r"loss_type: unknown loss 'dpoo' \(did you mean 'dpo'\?\); valid: .*"),
    "negative_beta": (["--beta", "-0.1"], r"beta: must be > 0 and finite, got -0\.1"),
    "zero_beta": (["--beta=0"], r"beta: must be > 0 and finite, got 0\.0"),
    "nan_beta": (["--beta", "nan"], r"beta: must be > 0 and finite, got nan"),
    "label_smoothing_half": (["--loss_type", "dpo", "--label_smoothing", "0.5"], r"label_smoothing: must be in \[0, 0\.5\), got 0\.5"),
    "negative_label_smoothing": (["--label_smoothing", "-0.1"], r"label_smoothing: must be in \[0, 0\.5\), got -0\.1"),
    "negative_sft_weight": (["--sft_weight", "-1"], r"sft_weight: must be >= 0, got -1\.0"),
    "prompt_longer_than_max_length": (
        ["--max_length", "32", "--max_prompt_length", "64"],
        r"max_prompt_length: 64 must be smaller than max_length \(32\), which leaves no room for the completions",
    ),
    "max_length_null": (["--max_length", "null"], r"max_length: must be an integer of at least 2 tokens, got None"),
    "bad_choice": (["--on_bad_row", "ignore"], r"on_bad_row: must be one of skip, error, got 'ignore'"),
    "not_a_number": (["--max_steps", "ten"], r"command line: max_steps='ten': invalid literal for int\(\) with base 10: 'ten'"),
    "not_a_bool": (["--use_peft", "maybe"], r"command line: use_peft='maybe': expected true or false"),
    "bad_transformers_value": (["--lr_scheduler_type", "foo"], r"foo is not a valid SchedulerType, .*"),
    "stray_argument": (["extra"], r"command line: unexpected argument 'extra' \(options look like --key value\)"),
    "negative_learning_rate": (["--learning_rate", "-1"], r".*learning_rate.*"),
    "zero_batch_size": (["--per_device_train_batch_size", "0"], r".*per_device_train_batch_size.*"),
    "zero_gradient_accumulation": (["--gradient_accumulation_steps", "0"], r".*gradient_accumulation_steps.*"),
    "infinite_beta": (["--beta", "inf"], r".*beta.*"),
    "negative_max_train_samples": (["--max_train_samples", "-1"], r".*max_train_samples.*"),
    "zero_lora_rank": (["--use_peft", "--lora_r", "0"], r".*lora_r.*"),
    "unknown_lora_module": (["--use_peft", "--lora_target_modules", "nonexistent_proj"], r".*(lora_target_modules|nonexistent_proj).*"),
    "reporter_not_installed": (["--report_to", "wandb"], r".*(report_to|wandb).*"),
    "resume_without_checkpoint": (["--resume_from_checkpoint", "latest"], r".*checkpoint.*"),
}


@pytest.mark.parametrize(("flags", "pattern"), list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_impossible_config(cli, tmp_path, flags, pattern):
    good = tmp_path / "p.jsonl"
    good.write_bytes(jsonl(GOOD))
    # A bad LoRA target is found once the model is built, after the loader's INFO line (rows read).
    after_loading = "--lora_target_modules" in flags
    check_one_line_error(cli.run(*train_argv(good, tmp_path / "run", *flags)), pattern, alone=not after_loading)


def test_output_dir_is_a_file(cli, tmp_path):
    good, out = tmp_path / "p.jsonl", tmp_path / "taken"
    good.write_bytes(jsonl(GOOD))
    out.write_text("not a folder")
    check_one_line_error(cli.run(*train_argv(good, out)), rf".*{re.escape(str(out))}.*")


RECIPES = {
    "unknown_key": ("learning_rate: 1.0e-4\nlerning_rate: 2\n", r"{path}: unknown key 'lerning_rate'; did you mean 'learning_rate'\?"),
    "impossible_value": ("beta: -2\n", r"beta: must be > 0 and finite, got -2\.0"),
    "string_for_a_number": ("beta: abc\n", r"{path}: beta='abc': could not convert string to float: 'abc'"),
    "invalid_yaml": ("beta: 0.1\n  loss_type: [dpo\n", r"{path}:\d+: invalid YAML \(.*\)"),
    "python_object_tag": (
        "beta: !!python/object/apply:os.system ['touch pwned']\n",
        r"{path}:1: invalid YAML \(could not determine a constructor for the tag "
        r"'tag:yaml.org,2002:python/object/apply:os.system'\)",
    ),
    "not_a_mapping": ("- beta\n- 0.1\n", r"{path}: a recipe must be a mapping of key: value"),
    "no_dataset": ("loss_type: simpo\n", r"no dataset: set `dataset` in the recipe or pass --dataset PATH_OR_HUB_ID"),
    "list_for_an_int": ("max_steps: [1, 2]\n", r".*max_steps.*"),
    "list_for_a_float": ("beta: [1]\n", r".*beta.*"),
}


@pytest.mark.parametrize(("text", "pattern"), list(RECIPES.values()), ids=list(RECIPES))
def test_bad_recipe(cli, tmp_path, text, pattern):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    good = tmp_path / "p.jsonl"
    good.write_bytes(jsonl(GOOD))
    argv = train_argv(good, tmp_path / "run")
    if "no dataset" in pattern:
        argv.remove("--dataset")
        argv.remove(str(good))
    result = cli.run(argv[0], recipe, *argv[1:])
    check_one_line_error(result, pattern.format(path=re.escape(str(recipe))))
    assert not (tmp_path / "pwned").exists()


def test_debug_flag_shows_the_traceback(cli, tmp_path):
    path, _ = write_case(tmp_path, "invalid_json_line")
    result = cli.run("--debug", *train_argv(path, tmp_path / "run"))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "DataError" in result.stderr and "line 2: invalid JSON" in result.stderr
