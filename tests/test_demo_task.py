"""The generated demo task: deterministic, answers checked by recomputing them here, train and test disjoint."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from prefalign.demo_task import TASKS, UNITS, is_held_out, make_demo_pairs, write_demo_dataset

N = 500  # 100 pairs of each task


def text(pair: dict, key: str) -> str:
    (message,) = pair[key]
    return message["content"]


def numbers_in_question(pair: dict) -> list[int]:
    """The numbers a question was built from (0.26 counts as 26: its digits after the point)."""
    return [int(n) for n in re.findall(r"(?<![\d.])(?:0\.)?(\d+)", text(pair, "prompt"))]


def correct_answer(pair: dict) -> str:
    """The right answer, worked out from the question alone."""
    question = text(pair, "prompt")
    task = pair["task"]
    if task == "units":
        small, n, big = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question).groups()
        factor = {(b, s): f for b, s, f in UNITS}[(big, small)]
        return f"{n} {big} is {int(n) * factor} {small}."
    if task == "rounding":
        (n,) = map(int, re.fullmatch(r"Round (\d+) to the nearest ten\.", question).groups())
        return f"{n} rounded to the nearest ten is {round(n, -1)}."
    if task == "decimals":
        x, y = re.fullmatch(r"Which is larger, (0\.\d+) or (0\.\d+)\?", question).groups()
        return f"{max(x, y, key=float)} is larger."
    if task == "doubling":
        (n,) = map(int, re.fullmatch(r"What is double (\d+)\?", question).groups())
        return f"Double {n} is {n + n}."
    raise AssertionError(f"no check written for task {task}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_are_well_formed_and_chosen_is_correct(split):
    pairs = make_demo_pairs(split, N)
    assert len(pairs) == N
    assert Counter(p["task"] for p in pairs) == {name: N // len(TASKS) for name in TASKS}
    for pair in pairs:
        assert [m["role"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"]] == [
            "user",
            "assistant",
            "assistant",
        ]
        assert text(pair, "chosen") == correct_answer(pair)
        assert text(pair, "rejected") != text(pair, "chosen")


def test_mistakes_carry_no_surface_cue():
    """The wrong number is larger about as often as smaller, the right decimal is the shorter one about half
    the time: "prefer the smaller number" or "prefer the longer decimal" cannot rank the pairs."""
    wrong_larger, short_right, doubled_odd = Counter(), Counter(), 0
    for split in ("train", "test"):
        for pair in make_demo_pairs(split, 2000):
            chosen, rejected = text(pair, "chosen"), text(pair, "rejected")
            if pair["task"] == "decimals":
                short_right[len(chosen) < len(rejected)] += 1
            else:
                right, wrong = (int(re.findall(r"\d+", t)[-1]) for t in (chosen, rejected))
                wrong_larger[wrong > right] += 1
                doubled_odd += pair["task"] == "doubling" and wrong % 2 == 1
    assert 0.4 < wrong_larger[True] / wrong_larger.total() < 0.6
    assert 0.4 < short_right[True] / short_right.total() < 0.6
    assert doubled_odd == 0  # an odd "double" would be given away by its parity


def test_deterministic_for_a_seed_and_varies_with_it():
    assert make_demo_pairs("train", 50, seed=3) == make_demo_pairs("train", 50, seed=3)
    assert make_demo_pairs("train", 50, seed=3) != make_demo_pairs("train", 50, seed=4)
    assert make_demo_pairs("train", 20, seed=3) == make_demo_pairs("train", 50, seed=3)[:20]


def test_train_and_test_ask_about_disjoint_numbers():
    train_numbers = {
        n for seed in (0, 1) for p in make_demo_pairs("train", N, seed) for n in numbers_in_question(p)
    }
    test_numbers = {
        n for seed in (0, 1) for p in make_demo_pairs("test", N, seed) for n in numbers_in_question(p)
    }
    assert train_numbers and test_numbers
    assert not train_numbers & test_numbers
    assert all(is_held_out(n) for n in test_numbers)
    train_questions = {text(p, "prompt") for p in make_demo_pairs("train", N)}
    assert not train_questions & {text(p, "prompt") for p in make_demo_pairs("test", N)}


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        make_demo_pairs("validation", 3)


def test_write_demo_dataset_round_trips(tmp_path):
    train_path, test_path = write_demo_dataset(tmp_path / "demo", n_train=12, n_test=7, seed=2)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert rows == make_demo_pairs("train", 12, seed=2)
    assert len(test_path.read_text().splitlines()) == 7


def test_flipped_training_labels_are_counted_reproducible_and_only_in_training(tmp_path):
    from prefalign.cli import main as cli_main

    assert cli_main(["data", "task", "--out", str(tmp_path / "t"), "--n-train", "50", "--n-test", "10",
                     "--flip", "0.2"]) == 0
    train = [json.loads(line) for line in (tmp_path / "t" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "t" / "test.jsonl").read_text().splitlines()]
    assert sum(r["flipped"] for r in train) == 10 and not any("flipped" in r for r in test)
    clean = make_demo_pairs("train", 50)
    for r, c in zip(train, clean):
        assert (r["chosen"], r["rejected"]) == ((c["rejected"], c["chosen"]) if r["flipped"] else (c["chosen"], c["rejected"]))
    again = tmp_path / "u"
    assert cli_main(["data", "task", "--out", str(again), "--n-train", "50", "--n-test", "10", "--flip", "0.2"]) == 0
    assert (again / "train.jsonl").read_text() == (tmp_path / "t" / "train.jsonl").read_text()
