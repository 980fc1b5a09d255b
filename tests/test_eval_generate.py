"""`prefalign eval --generate` and `online.evaluation.evaluate_answers`: greedy answers to a dataset's prompts,
scored with a reward, outside an online run — on the tiny real stories260K (skipped when ../shared is absent).

The toy checkers live in a module written to tmp and put on sys.path, as a user's would be imported (named apart
from test_online.py's toy_rewards: a module once imported stays in sys.modules for the whole session)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from prefalign.cli import main as cli_main
from prefalign.errors import ConfigError, PrefalignError
from prefalign.online.evaluation import EXACT_ANSWER, evaluate_answers
from prefalign.run_files import read_jsonl

PROMPTS = ["Once upon a time", "Tom had a ball", "The sun was", "Lily went to the", "One day, a cat"]
CHOSEN = [" there was a cat.", " and he played.", " warm and bright.", " park to play.", " sat on a mat."]
REJECTED = [" cat cat.", " ball.", " sun.", " the the.", " mat mat mat."]
NEW = 12  # tokens per answer: short, so the file stays fast
ROW_KEYS = ["prompt_index", "row_index", "prompt", "response", "tokens", "stopped_at_eos", "reward", "skip"]
ERROR = "prefalign: error: "

TOY = '''
def n_words(prompt, response):
    return float(len(response.split()))

def picky(prompt, response):
    """Raises for prompts starting with T: those answers get no reward."""
    if prompt.startswith("T"):
        raise ValueError("no T please")
    return float(len(response))
'''


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "answer_checkers.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


@pytest.fixture
def pairs_file(tmp_path):
    # the first prompt twice: its answer is generated once
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    return write_jsonl(tmp_path / "pairs.jsonl", [rows[0], {**rows[0], "chosen": " a dog ran."}, *rows[1:]])


@pytest.fixture
def task_file(tmp_path):
    from prefalign.demo_task import make_demo_pairs

    questions = [p["prompt"][0]["content"] for p in make_demo_pairs("test", 8, seed=0)]
    return write_jsonl(tmp_path / "task.jsonl", [{"prompt": q} for q in questions])


def greedy(model_dir, texts: list[str], max_new_tokens: int) -> list[dict]:
    """Each prompt alone through transformers' own greedy `generate`: the text beyond the prompt's, the tokens up
    to and including the EOS, and whether an EOS stopped it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        new = generated[0, ids.shape[1]:].tolist()
        stopped = tok.eos_token_id in new
        kept = new[: new.index(tok.eos_token_id) + 1] if stopped else new
        body = kept[:-1] if stopped else kept
        prompt_ids = ids[0].tolist()
        before = tok.decode(prompt_ids, skip_special_tokens=True)
        whole = tok.decode(prompt_ids + body, skip_special_tokens=True)
        assert whole.startswith(before)
        out.append({"response": whole[len(before):], "tokens": len(kept), "stopped_at_eos": stopped})
    return out


def one_line_error(capsys, argv) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(ERROR), err
    return last[len(ERROR):]


# -- evaluate_answers ---------------------------------------------------------------------------------------------

def test_answers_are_greedy_decodes_scored_with_the_checker(stories260k, prompts_file, toy):
    summary, rows = evaluate_answers(str(stories260k), str(prompts_file), "answer_checkers:n_words",
                                     max_new_tokens=NEW, batch_size=2, use_cpu=True)
    assert [list(r) for r in rows] == [ROW_KEYS] * len(PROMPTS)
    assert [r["prompt_index"] for r in rows] == list(range(5)) and [r["row_index"] for r in rows] == list(range(5))
    assert [r["prompt"] for r in rows] == PROMPTS
    # batched and left-padded, the same text as each prompt alone through transformers' greedy generate
    assert [{k: r[k] for k in ("response", "tokens", "stopped_at_eos")} for r in rows] == \
        greedy(stories260k, PROMPTS, NEW)
    assert [r["reward"] for r in rows] == [float(len(r["response"].split())) for r in rows]
    assert all(r["skip"] is None for r in rows)
    assert summary["model"] == str(stories260k) and summary["dataset"] == str(prompts_file)
    assert summary["reward"] == "answer_checkers:n_words"
    assert summary["prompts"] == summary["scored"] == 5 and summary["skipped"] == {}
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 5)
    assert summary["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in rows) / 5)
    assert "accuracy" not in summary  # only the checkable task's checker has an exact answer

    # the first `limit` prompts: the same answers
    limited, first = evaluate_answers(str(stories260k), str(prompts_file), "answer_checkers:n_words", limit=2,
                                      max_new_tokens=NEW, use_cpu=True)
    assert first == rows[:2] and limited["prompts"] == 2


def test_a_checker_that_raises_gives_counted_skips(stories260k, prompts_file, toy):
    summary, rows = evaluate_answers(str(stories260k), str(prompts_file), "answer_checkers:picky", max_new_tokens=NEW,
                                     use_cpu=True)
    skipped = [r for r in rows if r["prompt"].startswith("T")]
    assert len(skipped) == 2 and all(r["reward"] is None and r["skip"] == "reward_raised" for r in skipped)
    assert summary["skipped"] == {"reward_raised": 2}
    assert "ValueError: no T please" in summary["skip_examples"]["reward_raised"]
    assert summary["prompts"] == 5 and summary["scored"] == 3
    scored = [r["reward"] for r in rows if r["reward"] is not None]
    assert scored == [float(len(r["response"])) for r in rows if not r["prompt"].startswith("T")]
    assert summary["mean_reward"] == pytest.approx(sum(scored) / 3)


def test_exact_answer_accuracy_is_over_all_prompts_with_its_wilson_interval(stories260k, task_file):
    from prefalign.online.rewards import exact_answer
    from prefalign.stats import wilson_interval

    summary, rows = evaluate_answers(str(stories260k), str(task_file), EXACT_ANSWER, max_new_tokens=NEW,
                                     use_cpu=True)
    assert [r["reward"] for r in rows] == [exact_answer(r["prompt"], r["response"]) for r in rows]
    correct = sum(1 for r in rows if r["reward"] == 1.0)
    assert summary["prompts"] == len(rows) == 8
    assert summary["accuracy"] == correct / 8  # stories260K tells stories: most likely 0 of 8
    assert summary["accuracy_interval"] == list(wilson_interval(correct, 8))


def test_a_run_folder_is_read_with_its_own_settings_and_an_adapter_folder_loads(stories260k, tmp_path, toy):
    # a run folder whose prefalign_config.json maps the prompt column: the answers read the data as the run did
    run = tmp_path / "run"
    shutil.copytree(stories260k, run)
    for f in run.iterdir():
        f.chmod(0o644)
    (run / "prefalign_config.json").write_text(json.dumps({"loss_type": "dpo", "columns": "prompt=question"}))
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": p} for p in PROMPTS[:3]])
    summary, rows = evaluate_answers(str(run), str(questions), "answer_checkers:n_words", max_new_tokens=NEW,
                                     use_cpu=True)
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    assert [r["response"] for r in rows] == [g["response"] for g in greedy(stories260k, PROMPTS[:3], NEW)]

    # a LoRA adapter folder (a use_peft run's output_dir) loads on its base: a fresh adapter changes nothing
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(stories260k))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adapter))
    _, adapted = evaluate_answers(str(adapter), str(questions), "answer_checkers:n_words", columns="prompt=question",
                                  max_new_tokens=NEW, use_cpu=True)
    assert [r["response"] for r in adapted] == [r["response"] for r in rows]


def test_what_cannot_work_is_refused_before_generating(stories260k, prompts_file, tmp_path, toy):
    with pytest.raises(ConfigError, match=r"^--reward judge_file: a judge file holds rewards for the samples"):
        evaluate_answers(str(stories260k), str(prompts_file), "judge_file", use_cpu=True)
    with pytest.raises(ConfigError, match=r"cannot import no_such_module"):
        evaluate_answers(str(stories260k), str(prompts_file), "no_such_module:f", use_cpu=True)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": " "}])
    with pytest.raises(PrefalignError, match=r"no prompts to answer \(empty_prompt 1\)"):
        evaluate_answers(str(stories260k), str(empty), "answer_checkers:n_words", use_cpu=True)
    with pytest.raises(ConfigError, match=r"^--limit 0: must be at least 1"):
        evaluate_answers(str(stories260k), str(prompts_file), "answer_checkers:n_words", limit=0)


def test_evaluate_policy_reports_the_same_eval_keys_and_answers(stories260k, task_file, tmp_path):
    """An online run's eval (rounds.jsonl's eval_ keys, eval_samples.jsonl) shares the core: unchanged keys, and
    the same answers as evaluate_answers gives."""
    from prefalign.data.prompts import load_prompts
    from prefalign.online import load_online
    from prefalign.online.evaluation import evaluate_policy
    from prefalign.online.rounds import policy_config
    from prefalign.online.scoring import load_reward

    settings = load_online(None, ["--model_name_or_path", str(stories260k), "--dataset", str(task_file),
                                  "--output_dir", str(tmp_path / "run"), "--use_cpu", "--report_to", "none",
                                  "--reward", EXACT_ANSWER, "--max_new_tokens", str(NEW)])
    prompts = load_prompts(str(task_file))
    path = tmp_path / "eval_samples.jsonl"
    summary = evaluate_policy(settings, policy_config(settings, str(stories260k)), prompts,
                              load_reward(EXACT_ANSWER), path)
    assert list(summary) == ["eval_prompts", "eval_scored", "eval_mean_reward", "eval_mean_tokens", "eval_accuracy",
                             "eval_accuracy_interval"]
    written = read_jsonl(path)
    assert [list(r) for r in written] == [ROW_KEYS] * 8
    answers, rows = evaluate_answers(str(stories260k), str(task_file), EXACT_ANSWER, max_new_tokens=NEW,
                                     use_cpu=True)
    assert rows == written
    assert {f"eval_{k}": answers[k] for k in ("prompts", "scored", "mean_reward", "mean_tokens", "accuracy",
                                               "accuracy_interval")} == summary


# -- the command line ---------------------------------------------------------------------------------------------

def test_cli_on_pairs_prints_ranking_accuracy_and_the_answers(stories260k, pairs_file, toy, tmp_path, capsys):
    answers_file = tmp_path / "answers.jsonl"
    argv = ["eval", "--model", str(stories260k), "--dataset", str(pairs_file), "--generate", "--reward",
            "answer_checkers:n_words", "--max_new_tokens", str(NEW), "--limit", "4", "--answers", str(answers_file)]
    assert cli_main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_pairs"] == 4 and out["ranking_accuracy"] is not None  # the ranking part, as without --generate
    answers = out["answers"]
    assert answers["prompts"] == 4 and answers["data"]["prompts_available"] == 5  # distinct prompts, the first 4
    rows = read_jsonl(answers_file)
    assert [r["prompt"] for r in rows] == PROMPTS[:4]
    assert answers["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 4)

    # the file is not replaced without --overwrite (one line, before any work), and is with it
    assert one_line_error(capsys, argv) == (f"{answers_file} exists: pass --overwrite to replace it, or --answers "
                                            "another file")
    assert cli_main([*argv, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "ranking accuracy:" in text and "answers (greedy, at most 12 new tokens): 4 prompts" in text
    assert "mean reward:" in text
    assert read_jsonl(answers_file) == rows


def test_cli_on_prompts_measures_the_answers_alone(stories260k, prompts_file, toy, capsys):
    argv = ["eval", "--model", str(stories260k), "--dataset", str(prompts_file), "--generate", "--reward",
            "answer_checkers:picky", "--max-new-tokens", str(NEW), "--json"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert list(out) == ["answers"] and out["answers"]["prompts"] == 5
    assert out["answers"]["skipped"] == {"reward_raised": 2}
    assert (f"{prompts_file} holds prompts without chosen/rejected: ranking accuracy needs pairs, so only the "
            "answers are measured") in captured.err.splitlines()


def test_cli_generate_and_reward_go_together(stories260k, pairs_file, capsys):
    base = ["eval", "--model", str(stories260k), "--dataset", str(pairs_file)]
    assert one_line_error(capsys, [*base, "--generate"]).startswith("--generate needs --reward SPEC")
    assert one_line_error(capsys, [*base, "--reward", EXACT_ANSWER]).startswith(
        "--reward scores generated answers: add --generate")
    assert one_line_error(capsys, [*base, "--generate", "--reward", "judge_file"]).startswith(
        "--reward judge_file: a judge file holds rewards for the samples an online round writes")
    assert one_line_error(capsys, [*base, "--generate", "--reward", EXACT_ANSWER, "--winner-values", "a=0,b=1"]) \
        .startswith("--winner-values: --generate reads judged data's prompts with the usual verdicts only")
