"""A generated preference task with checkable answers, the data of `prefalign demo`.

Each pair asks a short numeric question; `chosen` is the correct answer and `rejected` a plausible mistake
(an off-by-one or off-by-ten sum, a wrong unit factor, rounding the wrong way, ...). Mistakes go both ways
(too big as often as too small, the right answer first as often as second), so no surface cue such as
"prefer the smaller number" ranks the pairs: a model has to get better at the question itself.

The held-out split asks about other numbers: a fixed hash sends 30 % of all numbers to "test" and the rest
to "train", whatever the seed, so no test question's numbers appear in any training question.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "test")
HELD_OUT_PERCENT = 30


def is_held_out(number: int | str) -> bool:
    """Whether a number belongs to the test split (by a hash of its digits, so it is the same everywhere)."""
    return zlib.crc32(str(number).encode()) % 100 < HELD_OUT_PERCENT


def _draw(rng: random.Random, split: str, lo: int, hi: int) -> int:
    """A number in [lo, hi] from the split's side of the partition."""
    while True:
        n = rng.randint(lo, hi)
        if is_held_out(n) == (split == "test"):
            return n


def _off_by(rng: random.Random, answer: int, steps: tuple[int, ...]) -> int:
    """A near miss: answer ± one of `steps`, up or down at random (never below zero)."""
    step = rng.choice(steps)
    return answer - step if rng.random() < 0.5 and answer - step >= 0 else answer + step


# Each task returns (question, correct answer, mistaken answer) for one random problem.


def _addition(rng: random.Random, split: str) -> tuple[str, str, str]:
    a, b = _draw(rng, split, 10, 99), _draw(rng, split, 10, 99)
    wrong = _off_by(rng, a + b, (1, 10))  # a slip in the units or a lost carry
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def _parity(rng: random.Random, split: str) -> tuple[str, str, str]:
    n = _draw(rng, split, 10, 999)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return f"Is {n} even or odd?", f"{n} is {right}.", f"{n} is {wrong}."


def _compare(rng: random.Random, split: str) -> tuple[str, str, str]:
    a = _draw(rng, split, 100, 999)
    b = a
    while b == a:  # close numbers: the digits must be read, not the length
        b = _draw(rng, split, max(100, a - 60), min(999, a + 60))
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger.", f"{min(a, b)} is larger."


def _rounding(rng: random.Random, split: str) -> tuple[str, str, str]:
    n = _draw(rng, split, 100, 999)
    while n % 10 == 0:
        n = _draw(rng, split, 100, 999)
    down, up = n - n % 10, n - n % 10 + 10
    right, wrong = (up, down) if n % 10 >= 5 else (down, up)
    question = f"Round {n} to the nearest ten."
    return question, f"{n} rounded to the nearest ten is {right}.", f"{n} rounded to the nearest ten is {wrong}."


# (from unit, to unit, factor): conversions by a power of ten, so the mistake is a lost or extra zero.
UNITS = (
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("kilometres", "metres", 1000),
    ("litres", "millilitres", 1000),
    ("centimetres", "millimetres", 10),
)


def _units(rng: random.Random, split: str) -> tuple[str, str, str]:
    big, small, factor = rng.choice(UNITS)
    n = _draw(rng, split, 2, 99)
    wrong = n * factor * 10 if rng.random() < 0.5 else n * factor // 10  # one zero too many or too few
    return (
        f"How many {small} are in {n} {big}?",
        f"{n} {big} is {n * factor} {small}.",
        f"{n} {big} is {wrong} {small}.",
    )


TASKS: dict[str, Callable[[random.Random, str], tuple[str, str, str]]] = {
    "addition": _addition,
    "parity": _parity,
    "compare": _compare,
    "rounding": _rounding,
    "units": _units,
}


def make_demo_pairs(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` conversational preference pairs, the tasks in turn; the same split, n and seed give the same pairs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"prefalign-demo/{split}/{seed}")
    names = list(TASKS)
    pairs = []
    for i in range(n):
        name = names[i % len(names)]
        question, right, wrong = TASKS[name](rng, split)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
                "task": name,
            }
        )
    return pairs


def write_demo_dataset(folder: str | Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl into `folder` (created if needed); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for pair in make_demo_pairs(split, n, seed):
                f.write(json.dumps(pair) + "\n")
        paths.append(path)
    return paths[0], paths[1]
