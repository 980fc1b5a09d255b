"""prefalign online: rounds of sampling from the policy, scoring, pairing and training, on stories260K.

The toy checkers live in a module written to tmp and put on sys.path, as a user's would be imported."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from prefalign.errors import ConfigError, DataError, PrefalignError
from prefalign.online import load_online, run_online
from prefalign.run_files import read_jsonl

PROMPTS = ["Once upon a time", "Tom had a ball", "The sun was", "Lily went to the", "One day, a cat",
           "Ben and Mia", "The dog", "There was a big"]

TOY = '''
import math

def n_words(prompt, response):
    """More words in the same number of tokens: shorter tokens, shorter sentences."""
    return float(len(response.split()))

def moody(prompt, response):
    """Raises for a response with "Lily" in it, is not finite with "Tom", not a number with "mom"."""
    if "Lily" in response:
        raise ValueError("no Lily please")
    if "Tom" in response:
        return math.nan
    if "mom" in response:
        return "high"
    return float(len(response.split()))

def ties_on_t(prompt, response):
    """Every response to a prompt starting with T gets the same reward: those prompts tie."""
    return 1.0 if prompt.startswith("T") else float(len(response))
'''

COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
          "--disable_tqdm", "true", "--per_device_train_batch_size", "4", "--loss_type", "dpo", "--seed", "0",
          "--samples_per_prompt", "4", "--max_new_tokens", "24", "--learning_rate", "1e-3"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy_rewards.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out), *COMMON, *extra]


def values(rounds: list[dict]) -> list[dict]:
    """rounds.jsonl without the timings (the only thing a rerun may change)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# -- the loop ---------------------------------------------------------------------------------------------

def test_reward_rises_over_rounds(stories260k, prompts, toy, tmp_path):
    out = tmp_path / "run"
    summary = run_online(None, args(stories260k, prompts, out, "--reward", "toy_rewards:n_words", "--rounds", "4",
                                    "--steps_per_round", "4"))
    assert summary["status"] == "finished"
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["trained"] for r in rounds)
    means = [r["mean_reward"] for r in rounds]
    # each round's mean is the mean of its samples' rewards, as written
    for r in rounds:
        samples = read_jsonl(out / f"round-{r['round']}" / "samples.jsonl")
        assert len(samples) == 32 == r["samples"]
        assert r["mean_reward"] == pytest.approx(sum(s["reward"] for s in samples) / 32)
        assert r["pairs"] == len(read_jsonl(out / f"round-{r['round']}" / "pairs.jsonl")) == 8
    # rising: the last rounds' samples score clearly above the first's (a per-sample spread of ~3 words)
    assert means[-1] > means[0] + 1.5, means
    assert sum(means[2:]) / 2 > sum(means[:2]) / 2, means
    # each round trained from the previous round's model, against the start model as reference
    assert rounds[1]["policy_before"] == "round-1/train"
    config = json.loads((out / "round-2" / "train" / "prefalign_config.json").read_text())
    assert config["model_name_or_path"] == str(out / "round-1" / "train")
    assert config["ref_model_name_or_path"] == str(stories260k)
    assert summary["final_model"] == str(out / "round-4" / "train")


def test_pairs_are_best_against_worst(stories260k, prompts, toy, tmp_path):
    out = tmp_path / "run"
    run_online(None, args(stories260k, prompts, out, "--reward", "toy_rewards:n_words", "--rounds", "1",
                          "--steps_per_round", "1"))
    samples = read_jsonl(out / "round-1" / "samples.jsonl")
    pairs = read_jsonl(out / "round-1" / "pairs.jsonl")
    for pair in pairs:
        mine = [s for s in samples if s["prompt_index"] == pair["prompt_index"]]
        assert pair["chosen_reward"] == max(s["reward"] for s in mine)
        assert pair["rejected_reward"] == min(s["reward"] for s in mine)
        assert pair["chosen"] == mine[pair["chosen_sample"]]["response"]
        assert pair["prompt"] == mine[0]["prompt"]


def test_all_above_margin_makes_every_pair_far_enough_apart():
    from prefalign.online.pairs import pairs_of_prompt
    from prefalign.online.scoring import Skips

    samples = [{"sample": i, "response": f"r{i}", "reward": r} for i, r in enumerate([1.0, 3.0, 3.5, None, 0.0])]
    skips = Skips()
    pairs = pairs_of_prompt(samples, "all_above_margin", 0.75, skips, "p")
    got = {(p["chosen_sample"], p["rejected_sample"]) for p in pairs}
    want = {(a["sample"], b["sample"]) for a in samples for b in samples
            if a["reward"] is not None and b["reward"] is not None and a["reward"] - b["reward"] > 0.75}
    assert got == want == {(1, 0), (2, 0), (0, 4), (1, 4), (2, 4)}
    assert pairs_of_prompt(samples[:3], "best_vs_worst", 2.5, skips, "q") == []
    assert skips.counts == {"within_margin": 1}


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(stories260k, prompts, toy, tmp_path, monkeypatch):
    import prefalign.online.rounds as rounds_module
    import prefalign.online.run as online_run

    common = ("--reward", "toy_rewards:n_words", "--rounds", "3", "--steps_per_round", "3")
    whole = tmp_path / "whole"
    run_online(None, args(stories260k, prompts, whole, *common))

    # killed between rounds 1 and 2, and then inside round 3 after its samples and pairs were written
    killed = tmp_path / "killed"
    real_round, real_train = online_run._run_round, rounds_module.train_round

    def kill_at_round_2(settings, out, number, *rest):
        if number == 2:
            raise KeyboardInterrupt
        return real_round(settings, out, number, *rest)

    monkeypatch.setattr(online_run, "_run_round", kill_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_online(None, args(stories260k, prompts, killed, *common))
    assert [r["round"] for r in read_jsonl(killed / "rounds.jsonl")] == [1]
    monkeypatch.setattr(online_run, "_run_round", real_round)

    def kill_in_training_of_round_3(settings, number, *rest):
        if number == 3:
            raise KeyboardInterrupt
        return real_train(settings, number, *rest)

    monkeypatch.setattr(online_run, "train_round", kill_in_training_of_round_3)
    round_1 = killed / "round-1"
    stamps = {p: p.stat().st_mtime_ns for p in (round_1 / "samples.jsonl", round_1 / "train" / "train_summary.json")}
    with pytest.raises(KeyboardInterrupt):
        run_online(None, args(stories260k, prompts, killed, *common))
    assert (killed / "round-3" / "pairs.jsonl").is_file() and not (killed / "round-3" / "train").exists()
    monkeypatch.setattr(online_run, "train_round", real_train)
    samples_3 = (killed / "round-3" / "samples.jsonl").stat().st_mtime_ns
    summary = run_online(None, args(stories260k, prompts, killed, *common))

    assert summary["status"] == "finished"
    assert values(read_jsonl(killed / "rounds.jsonl")) == values(read_jsonl(whole / "rounds.jsonl"))
    for name in ("round-1", "round-3"):
        assert (killed / name / "samples.jsonl").read_text() == (whole / name / "samples.jsonl").read_text()
    a, b = weights(whole / "round-3" / "train"), weights(killed / "round-3" / "train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # nothing finished was done again: round 1's records and round 3's samples are the files first written
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (killed / "round-3" / "samples.jsonl").stat().st_mtime_ns == samples_3
    # and a finished run started again does nothing
    again = run_online(None, args(stories260k, prompts, killed, *common))
    assert values(again["rounds"]) == values(summary["rounds"])


def test_a_round_stopped_in_training_continues_from_its_checkpoint(stories260k, prompts, toy, tmp_path,
                                                                   monkeypatch):
    import os
    import signal

    from prefalign.training.trainer import PreferenceTrainer

    common = ("--reward", "toy_rewards:n_words", "--rounds", "2", "--steps_per_round", "4", "--save_strategy",
              "steps", "--save_steps", "2")
    whole = tmp_path / "whole"
    run_online(None, args(stories260k, prompts, whole, *common))

    stopped = tmp_path / "stopped"
    real_step = PreferenceTrainer.training_step

    def sigterm_in_round_2(self, *a, **k):  # as a scheduler's SIGTERM would arrive, during round 2's step 3
        if "round-2" in self.args.output_dir and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)

    monkeypatch.setattr(PreferenceTrainer, "training_step", sigterm_in_round_2)
    summary = run_online(None, args(stories260k, prompts, stopped, *common))
    assert summary["status"] == "interrupted" and summary["checkpoint"].endswith("round-2/train/checkpoint-3")
    assert [r["round"] for r in read_jsonl(stopped / "rounds.jsonl")] == [1]
    monkeypatch.setattr(PreferenceTrainer, "training_step", real_step)
    summary = run_online(None, args(stories260k, prompts, stopped, *common))
    assert summary["status"] == "finished"
    assert not (stopped / "round-2" / "train" / "resumed_settings.jsonl").exists()  # with the round's own settings
    # the same round, except train_loss: transformers averages a resumed run's loss over its own steps only
    got, want = values(read_jsonl(stopped / "rounds.jsonl")), values(read_jsonl(whole / "rounds.jsonl"))
    assert got[0] == want[0] and got[1].pop("train_loss") != want[1].pop("train_loss") and got[1] == want[1]
    metrics = [json.loads(line) for line in (stopped / "round-2" / "train" / "metrics.jsonl").read_text().splitlines()]
    whole_metrics = [json.loads(line) for line in (whole / "round-2" / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert losses == pytest.approx({m["step"]: m["loss"] for m in whole_metrics if "loss" in m}, abs=1e-6)
    a, b = weights(whole / "round-2" / "train"), weights(stopped / "round-2" / "train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- skips ------------------------------------------------------------------------------------------------

def test_a_reward_that_raises_or_is_not_a_number_is_a_counted_skip(stories260k, prompts, toy, tmp_path):
    out = tmp_path / "run"
    run_online(None, args(stories260k, prompts, out, "--reward", "toy_rewards:moody", "--rounds", "1",
                          "--steps_per_round", "1"))
    samples = read_jsonl(out / "round-1" / "samples.jsonl")
    expected = {"reward_raised": sum("Lily" in s["response"] for s in samples),
                "reward_not_finite": sum("Tom" in s["response"] and "Lily" not in s["response"] for s in samples),
                "reward_not_a_number": sum("mom" in s["response"] and "Lily" not in s["response"]
                                           and "Tom" not in s["response"] for s in samples)}
    assert expected["reward_raised"] > 0  # the test means something only when some response names Lily
    (entry,) = read_jsonl(out / "rounds.jsonl")
    assert {k: v for k, v in entry["skips"].items() if k.startswith("reward_")} == {k: v for k, v in expected.items()
                                                                                   if v}
    assert "ValueError: no Lily please" in entry["skip_examples"]["reward_raised"]
    assert "samples.jsonl:" in entry["skip_examples"]["reward_raised"]  # names the line
    assert entry["scored"] == 32 - sum(expected.values())
    skipped = [s for s in samples if s["skip"]]
    assert all(s["reward"] is None for s in skipped) and len(skipped) == sum(expected.values())


def test_prompts_whose_responses_all_tie_are_counted(stories260k, prompts, toy, tmp_path):
    out = tmp_path / "run"
    run_online(None, args(stories260k, prompts, out, "--reward", "toy_rewards:ties_on_t", "--rounds", "1",
                          "--steps_per_round", "1"))
    (entry,) = read_jsonl(out / "rounds.jsonl")
    tied = sum(p.startswith("T") for p in PROMPTS)
    assert entry["skips"]["tied"] == tied
    assert entry["pairs"] == len(PROMPTS) - tied == len(read_jsonl(out / "round-1" / "pairs.jsonl"))


def test_a_round_without_pairs_trains_nothing_and_keeps_the_policy(stories260k, prompts, tmp_path):
    out = tmp_path / "run"
    summary = run_online(None, args(stories260k, prompts, out, "--reward", "prefalign.online.rewards:exact_answer",
                                    "--rounds", "1", "--steps_per_round", "1"))
    (entry,) = summary["rounds"]
    # the checker cannot judge story prompts: every sample is a counted skip, with the reason shown
    assert entry["skips"] == {"reward_raised": 32, "too_few_rewards": 8}
    assert "asks none of the checkable task's questions" in entry["skip_examples"]["reward_raised"]
    assert entry["trained"] is False and entry["pairs"] == 0 and not (out / "round-1" / "train").exists()
    assert summary["final_model"] == str(stories260k)


# -- rewards ----------------------------------------------------------------------------------------------

def test_exact_answer_scores_the_task_answers():
    from prefalign.demo_task import make_demo_pairs
    from prefalign.online.rewards import exact_answer

    pairs = make_demo_pairs("train", 200, seed=1) + make_demo_pairs("test", 200, seed=2)
    for pair in pairs:
        question = pair["prompt"][0]["content"]
        rendered = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert exact_answer(rendered, pair["chosen"][0]["content"]) == 1.0, pair
        assert exact_answer(rendered, pair["rejected"][0]["content"]) == 0.0, pair
    assert exact_answer("What is double 34?", "It is 68") == 1.0
    assert exact_answer("What is double 34?", "I don't know") == 0.0
    assert exact_answer("How many grams are in 3 kilograms?", "3 kilograms is 3,000 grams.") == 1.0
    decimals = "Which is larger, 0.3 or 0.25?"
    assert exact_answer(decimals, "0.3 is greater than 0.25") == 1.0
    assert exact_answer(decimals, "The larger one is 0.3") == 1.0  # names only one
    assert exact_answer(decimals, "0.25 is bigger than 0.3") == 0.0
    assert exact_answer(decimals, "Which is larger, 0.3 or 0.25? Let us see") == 0.0  # repeating is no answer
    with pytest.raises(ValueError, match="none of the checkable task's questions"):
        exact_answer("Once upon a time", "there was a cat")


def test_a_reward_model_scores_prompt_and_response(stories260k, prompts, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(str(stories260k)).save_pretrained(rm_dir)
    out = tmp_path / "run"
    run_online(None, args(stories260k, prompts, out, "--reward", f"model:{rm_dir}", "--rounds", "1",
                          "--steps_per_round", "1"))
    samples = read_jsonl(out / "round-1" / "samples.jsonl")
    rm = LlamaForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    for s in samples[:4]:  # one at a time, no padding: what the batched scoring must agree with
        with torch.no_grad():
            want = rm(**tok(s["prompt"] + s["response"], return_tensors="pt")).logits[0, 0].item()
        assert s["reward"] == pytest.approx(want, abs=1e-4)
    assert len({s["reward"] for s in samples}) > 8

    two = tmp_path / "rm2"
    LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 2})).save_pretrained(two)
    tok.save_pretrained(two)
    with pytest.raises(ConfigError, match="2 outputs"):
        run_online(None, args(stories260k, prompts, tmp_path / "run2", "--reward", f"model:{two}"))
    assert not (tmp_path / "run2").exists()


def test_judge_file_flow(stories260k, prompts, tmp_path):
    out = tmp_path / "run"
    common = args(stories260k, prompts, out, "--reward", "judge_file", "--rounds", "1", "--steps_per_round", "1")
    first = run_online(None, common)
    path = out / "round-1" / "samples.jsonl"
    assert first["status"] == "awaiting_judge" and first["waiting_for"] == str(path)
    assert str(path) in first["message"] and "reward" in first["message"]
    rows = read_jsonl(path)
    assert len(rows) == 32 and all(r["reward"] is None for r in rows)
    assert not (out / "round-1" / "pairs.jsonl").exists() and not (out / "rounds.jsonl").exists()
    # still unfilled: the same answer, nothing else written
    assert run_online(None, common)["status"] == "awaiting_judge"

    for r in rows:
        r["reward"] = float(len(r["response"]))
    rows[0]["reward"], rows[1]["reward"] = None, "great"
    edited = [dict(r) for r in rows]
    edited[5]["response"] += " (edited)"
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(DataError, match=r"samples.jsonl:6: the prompt or response differs"):
        run_online(None, common)

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_online(None, common)
    assert done["status"] == "finished"
    (entry,) = done["rounds"]
    assert entry["skips"]["unjudged"] == 1 and entry["skips"]["reward_not_a_number"] == 1
    assert entry["scored"] == 30 and entry["trained"] is True
    assert entry["mean_reward"] == pytest.approx(sum(len(r["response"]) for r in rows[2:]) / 30)


def test_eval_prompts_score_greedy_answers_each_round(stories260k, prompts, tmp_path):
    questions = tmp_path / "questions.jsonl"
    texts = ["What is double 34?", "Round 147 to the nearest ten.", "How many grams are in 3 kilograms?"]
    questions.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in texts))
    out = tmp_path / "run"
    summary = run_online(None, args(stories260k, questions, out, "--reward", "prefalign.online.rewards:exact_answer",
                                    "--rounds", "1", "--steps_per_round", "1", "--eval_prompts", str(questions)))
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    from prefalign.online.rewards import exact_answer

    for r in rounds:
        answers = read_jsonl(out / f"round-{r['round']}" / "eval_samples.jsonl")
        assert [a["prompt"] for a in answers] == texts
        rewards = [exact_answer(a["prompt"], a["response"]) for a in answers]
        assert [a["reward"] for a in answers] == rewards
        assert r["eval_accuracy"] == sum(rewards) / 3 and r["eval_mean_reward"] == sum(rewards) / 3
        lo, hi = r["eval_accuracy_interval"]
        assert lo <= r["eval_accuracy"] <= hi


# -- sampling ---------------------------------------------------------------------------------------------

def test_each_response_depends_on_its_seed_alone(stories260k):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.online.sampling import generate_responses

    model = AutoModelForCausalLM.from_pretrained(str(stories260k))
    tok = AutoTokenizer.from_pretrained(str(stories260k))
    texts = ["Once upon a time", "The dog", "Tom had a ball"]
    seeds = [[11, 12], [21, 22], [31, 32]]

    def run(batch_size, prompts=texts, seeds=seeds):
        return generate_responses(model, tok, prompts, seeds, max_new_tokens=16, batch_size=batch_size, pad_id=0)

    whole = run(6)
    assert run(1) == whole == run(4)  # alone, or in other batches: the same responses
    assert run(2, texts[1:2], [[21, 22]]) == [whole[1]]
    assert whole[0][0] != whole[0][1]
    for row in whole:  # prompt text + response text is what was generated
        for r in row:
            assert r["tokens"] == 16 and not r["stopped_at_eos"]
    assert whole[0][0]["response"].startswith((",", " "))  # the leading space kept


def test_seeded_sampling_draws_from_the_tempered_nucleus():
    from prefalign.online.sampling import SeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    n = 4000
    counts = torch.zeros(5)
    for seed in range(n):
        counts[SeededSampling([seed], temperature=0.7, top_p=1.0)(None, logits).argmax()] += 1
    want = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts / n, want, atol=0.025), (counts / n, want)
    # top-p 0.8: only the smallest set of tokens holding 80 % of the mass is ever drawn
    nucleus = torch.zeros(5)
    for seed in range(500):
        nucleus[SeededSampling([seed], temperature=1.0, top_p=0.8)(None, logits).argmax()] += 1
    probs = torch.softmax(logits[0], -1)
    keep = int((torch.cumsum(probs, 0) < 0.8).sum()) + 1
    assert nucleus[keep:].sum() == 0 and (nucleus[:keep] > 0).all()


# -- prompts ----------------------------------------------------------------------------------------------

def test_prompts_of_pairs_and_of_prompt_files(stories260k, tmp_path):
    from transformers import AutoTokenizer

    from prefalign.data.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "A", "chosen": "x", "rejected": "y"}, {"prompt": "B", "chosen": "x", "rejected": "y"},
            {"prompt": "A", "chosen": "z", "rejected": "w"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(str(pairs), tokenizer=tok)
    assert (got.texts, got.row_indices, got.kind, got.skipped) == (["A", "B"], [0, 1], "pairs", {"repeated_prompt": 1})

    plain = tmp_path / "prompts.jsonl"
    plain.write_text("".join(json.dumps({"question": q}) + "\n" for q in ["Q1", "", "Q2", "Q1"]))
    got = load_prompts(str(plain), tokenizer=tok, columns="prompt=question")
    assert got.texts == ["Q1", "Q2"] and got.skipped == {"empty_prompt": 1, "repeated_prompt": 1}

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert load_prompts(str(chat), tokenizer=tok, chat_template=template).texts == ["<user>Hi<a>"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: column 'prompt' is a number"):
        load_prompts(str(bad), tokenizer=tok)
    with pytest.raises(DataError, match="no 'prompt' column"):
        load_prompts(str(plain), tokenizer=tok)


def test_lora_rounds_continue_one_adapter_against_the_start_model(stories260k, prompts, toy, tmp_path):
    """use_peft: round 1 adds the adapter, each later round trains the previous round's adapter on; the model
    with the adapter disabled, the reference, stays the start model (ref_refresh: start) with nothing loaded."""
    from prefalign.models import load_model

    out = tmp_path / "run"
    summary = run_online(None, args(stories260k, prompts, out, "--reward", "toy_rewards:n_words", "--rounds", "2",
                                    "--steps_per_round", "2", "--use_peft", "true", "--lora_r", "4",
                                    "--lora_dropout", "0"))
    assert summary["status"] == "finished" and summary["final_model"] == str(out / "round-2" / "train")
    rounds = read_jsonl(out / "rounds.jsonl")
    assert all(r["trained"] and r["pairs"] for r in rounds)
    adapters = []
    for number in (1, 2):
        train_dir = out / f"round-{number}" / "train"
        assert (train_dir / "adapter_model.safetensors").is_file() and not (train_dir / "model.safetensors").exists()
        adapter_config = json.loads((train_dir / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(stories260k)  # one adapter, on the start model
        adapters.append(weights_of(train_dir / "adapter_model.safetensors"))
    config = json.loads((out / "round-2" / "train" / "prefalign_config.json").read_text())
    assert config["model_name_or_path"] == str(out / "round-1" / "train") and config["ref_model_name_or_path"] is None
    # round 2 trained the same adapter on (same tensors, other values), not a second one stacked on it
    assert adapters[0].keys() == adapters[1].keys()
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    # the reference is the start model: round 1 starts with policy = reference (DPO rewards 0), round 2 starts
    # from round 1's policy, already apart from it (as ref_refresh: round would not be)
    first = [next(r for r in read_jsonl(out / f"round-{n}" / "train" / "metrics.jsonl") if "loss" in r) for n in (1, 2)]
    assert first[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert abs(first[1]["rewards/chosen"]) > 1e-4 or abs(first[1]["rewards/rejected"]) > 1e-4
    # the final adapter, disabled, is the start model; enabled, it is another model
    final, start = load_model(out / "round-2" / "train").eval(), load_model(stories260k).eval()
    ids = torch.tensor([[1, 400, 300, 200, 100]])
    with torch.no_grad():
        with final.disable_adapter():
            torch.testing.assert_close(final(ids).logits, start(ids).logits)
        assert not torch.allclose(final(ids).logits, start(ids).logits)


def weights_of(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- mistakes: one line, nothing written ----------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--roundz", "3"], "unknown key 'roundz'; did you mean 'rounds'?"),
    (["--max_steps", "5"], "max_steps: prefalign online sets it for each round; use steps_per_round"),
    (["--samples_per_prompt", "1"], "samples_per_prompt: must be an integer of at least 2"),
    (["--pairing", "best"], "pairing: must be one of best_vs_worst, all_above_margin"),
    (["--rounds", "two"], "rounds='two': expected int"),
    (["--use_peft", "true", "--ref_refresh", "round"], "ref_refresh: round cannot be honoured with use_peft"),
])
def test_bad_keys_are_one_line_errors(stories260k, prompts, tmp_path, extra, message):
    with pytest.raises(ConfigError) as e:
        run_online(None, args(stories260k, prompts, tmp_path / "run", "--reward", "judge_file", *extra))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_recipe_key_is_checked_too(stories260k, prompts, tmp_path):
    recipe = tmp_path / "online.yaml"
    recipe.write_text(f"model_name_or_path: {stories260k}\ndataset: prompts.jsonl\nreward: judge_file\n"
                      "samples_per_promt: 4\n")
    with pytest.raises(ConfigError, match=r"online.yaml: unknown key 'samples_per_promt'; did you mean "
                                          r"'samples_per_prompt'\?"):
        load_online(recipe)
    recipe.write_text(f"model_name_or_path: {stories260k}\ndataset: prompts.jsonl\nreward: judge_file\nrounds: 2\n")
    settings = load_online(recipe, ["--rounds", "5", "--beta", "0.3"])
    assert settings.online.rounds == 5 and settings.base.beta == 0.3
    assert settings.base.dataset == str(prompts)  # relative to the recipe, as `prefalign train` reads it


@pytest.mark.parametrize("reward, message", [
    ("no_such_module_here:f", "cannot import no_such_module_here"),
    ("toy_rewards:missing", "toy_rewards has no function 'missing'"),
    ("just words", "expected module:function (a checker), model:PATH_OR_ID or judge_file"),
    ("model:/nonexistent/rm", "reward model:/nonexistent/rm: cannot load a sequence classifier"),
])
def test_a_bad_reward_is_one_line_before_anything_is_written(stories260k, prompts, toy, tmp_path, reward, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_online(None, args(stories260k, prompts, out, "--reward", reward))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_vllm_is_refused(stories260k, prompts, tmp_path):
    with pytest.raises(ConfigError, match="vllm is not installed"):
        run_online(None, args(stories260k, prompts, tmp_path / "a", "--reward", "judge_file",
                              "--generation_backend", "vllm"))
    assert not (tmp_path / "a").exists()


def test_a_run_continued_with_other_settings_is_refused(stories260k, prompts, tmp_path):
    out = tmp_path / "run"
    common = args(stories260k, prompts, out, "--reward", "judge_file", "--rounds", "1")
    run_online(None, common)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(PrefalignError, match=r"other settings \(temperature 1.0 -> 0.5\)"):
        run_online(None, [*common, "--temperature", "0.5"])
    with pytest.raises(PrefalignError, match=r"other settings \(beta None -> 0.5\)"):
        run_online(None, [*common, "--beta", "0.5"])
    assert sorted(p.name for p in out.rglob("*")) == before
    # asked for: the old run's own files go, the new one starts
    replaced = run_online(None, [*common, "--temperature", "0.5", "--overwrite_output_dir", "true"])
    assert replaced["status"] == "awaiting_judge"
    assert json.loads((out / "online_config.json").read_text())["online"]["temperature"] == 0.5


def test_a_train_run_folder_is_not_written_into(stories260k, prompts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "prefalign_config.json").write_text("{}")
    with pytest.raises(PrefalignError, match="holds a prefalign train run"):
        run_online(None, args(stories260k, prompts, out, "--reward", "judge_file"))


def test_the_command_line(stories260k, prompts, toy, tmp_path, capsys):
    from prefalign.cli import main

    out = tmp_path / "run"
    code = main(["online", *args(stories260k, prompts, out, "--reward", "judge_file", "--rounds", "1")])
    assert code == 75  # waiting for the judge
    assert "fill in the reward of each line of" in capsys.readouterr().err
    code = main(["online", *args(stories260k, prompts, tmp_path / "run2", "--reward", "toy_rewards:n_words",
                                 "--rounds", "1", "--steps_per_round", "1"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and math.isfinite(summary["rounds"][0]["mean_reward"])
    assert main(["online", "--roundz", "2"]) == 2
