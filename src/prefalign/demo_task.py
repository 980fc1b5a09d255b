"""A generated preference task with checkable answers, the data of `prefalign demo`.

Each pair asks a short numeric question; `chosen` is the correct answer and `rejected` a plausible mistake
(a wrong unit factor, rounding the wrong way, 0.25 > 0.3, an off-by-ten double). Mistakes go both ways
(too big as often as too small, the right answer first as often as second), so no surface cue such as
"prefer the smaller number" ranks the pairs: a model has to get better at the question itself.

The held-out split asks about other numbers: a fixed hash sends 30 % of all numbers to "test" and the rest
to "train", whatever the seed, so no test question's numbers appear in any training question.
"""

from __future__ import annotations

import json
import random
import re
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


# Each task returns (question, correct answer, mistaken answer) for one random problem. These four are the
# ones SmolLM2-135M-Instruct gets near chance before training and learns within a few minutes on a CPU;
# tasks it already knows (addition: 93 %) or cannot learn that fast (parity, subtraction) were left out.


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


def _rounding(rng: random.Random, split: str) -> tuple[str, str, str]:
    n = _draw(rng, split, 100, 999)
    while n % 5 == 0:  # last digit 1-4 rounds down, 6-9 up: as many of each, and no tie to argue about
        n = _draw(rng, split, 100, 999)
    down, up = n - n % 10, n - n % 10 + 10
    right, wrong = (up, down) if n % 10 > 5 else (down, up)
    return (
        f"Round {n} to the nearest ten.",
        f"{n} rounded to the nearest ten is {right}.",
        f"{n} rounded to the nearest ten is {wrong}.",
    )


def _decimals(rng: random.Random, split: str) -> tuple[str, str, str]:
    """0.a against 0.bc: the classic slip is to think the longer decimal is larger."""
    a, b = _draw(rng, split, 1, 9), _draw(rng, split, 10, 99)
    while b // 10 == a or b % 10 == 0:  # the tenths decide, and 0.b0 would just be 0.b
        b = _draw(rng, split, 10, 99)
    short, long = f"0.{a}", f"0.{b}"
    larger, smaller = (short, long) if a * 10 > b else (long, short)
    first, second = (short, long) if rng.random() < 0.5 else (long, short)
    return f"Which is larger, {first} or {second}?", f"{larger} is larger.", f"{smaller} is larger."


def _doubling(rng: random.Random, split: str) -> tuple[str, str, str]:
    n = _draw(rng, split, 10, 99)
    wrong = _off_by(rng, 2 * n, (2, 10))  # even mistakes, so "the answer must be even" does not give it away
    return f"What is double {n}?", f"Double {n} is {2 * n}.", f"Double {n} is {wrong}."


TASKS: dict[str, Callable[[random.Random, str], tuple[str, str, str]]] = {
    "units": _units,
    "rounding": _rounding,
    "decimals": _decimals,
    "doubling": _doubling,
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


def flip_labels(pairs: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """The same pairs with chosen and rejected swapped in round(fraction·n) of them, drawn with `seed`
    (controlled label noise; each flipped pair is marked `flipped: true`)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the flipped fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"prefalign-demo/flip/{seed}")
    flipped = set(rng.sample(range(len(pairs)), round(fraction * len(pairs))))
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"], "flipped": True} if i in flipped
            else {**p, "flipped": False} for i, p in enumerate(pairs)]


def write_demo_dataset(folder: str | Path, n_train: int, n_test: int, seed: int = 0,
                       flip: float = 0.0) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl into `folder` (created if needed); returns their paths. `flip`: the
    fraction of *training* pairs whose labels are swapped (the held-out pairs stay correct)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"{split}.jsonl"
        pairs = make_demo_pairs(split, n, seed)
        if split == "train" and flip:
            pairs = flip_labels(pairs, flip, seed)
        with path.open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
        paths.append(path)
    return paths[0], paths[1]


# -- checking an answer: the questions above, recognised in any text, and their known answers ---------------

QUESTIONS = {
    "units": re.compile(r"How many ([a-z]+) are in (\d+) ([a-z]+)\?"),
    "rounding": re.compile(r"Round (\d+) to the nearest ten\."),
    "decimals": re.compile(r"Which is larger, (\d*\.\d+) or (\d*\.\d+)\?"),
    "doubling": re.compile(r"What is double (\d+)\?"),
}
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")


def solve(text: str) -> tuple[str, float, tuple[float, ...]] | None:
    """(task, the correct answer, the two options of a decimals question) for the last question of this task
    found in `text` (a rendered prompt may wrap it in a chat template), or None when it asks none of them."""
    found = [(m.start(), task, m) for task, pattern in QUESTIONS.items() for m in pattern.finditer(text)]
    if not found:
        return None
    _, task, m = max(found, key=lambda f: f[0])
    if task == "units":
        small, n, big = m.group(1), int(m.group(2)), m.group(3)
        factor = next((f for b, s, f in UNITS if b == big and s == small), None)
        return None if factor is None else (task, float(n * factor), ())
    if task == "rounding":
        n = int(m.group(1))
        return task, float(n - n % 10 + (10 if n % 10 >= 5 else 0)), ()
    if task == "decimals":
        options = (float(m.group(1)), float(m.group(2)))
        return task, max(options), options
    return task, float(2 * int(m.group(1))), ()


def numbers_in(text: str) -> list[float]:
    """The numbers written in `text`, in order ("1,000" is one thousand)."""
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


LARGER = re.compile(r"(\d*\.\d+)\s+is\s+(?:the\s+)?(?:larger|greater|bigger)")


def given_answer(task: str, options: tuple[float, ...], response: str) -> float | None:
    """The answer a response gives. For decimals: the option it says "is larger" (or greater, bigger) — "0.3 is
    larger than 0.25" — else the one option it names when it names only one; naming both without saying which
    is larger (as repeating the question does) gives no answer. For the others: the last number it writes
    ("Double 34 is 68."), where every answer of the templates above ends. None when it gives none."""
    if task == "decimals":
        said = [float(x) for x in LARGER.findall(response) if float(x) in options]
        if said:
            return said[0]
        named = {x for x in numbers_in(response) if x in options}
        return named.pop() if len(named) == 1 else None
    numbers = numbers_in(response)
    return numbers[-1] if numbers else None
