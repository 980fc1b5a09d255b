"""Checkers shipped with prefalign, for `reward: prefalign.online.rewards:NAME`.

A checker is any function `reward(prompt, response) -> float`; prefalign imports it by `module:function`.
"""

from __future__ import annotations

from ..demo_task import given_answer, solve


def exact_answer(prompt: str, response: str) -> float:
    """1.0 when the response gives the known answer to the checkable task's question (`prefalign data task`), 0.0
    otherwise.

    The question is found in the prompt by its wording (the last one, wherever a chat template puts it) and
    solved (`demo_task.solve`). The answer the response gives is the last number it writes ("Double 34 is
    68." gives 68, as every answer of the task ends); for "Which is larger, 0.3 or 0.25?" it is the number the
    response says "is larger" (or greater, bigger), else the one of the two it names if it names only one —
    repeating the question answers nothing. Numbers compare by value ("3,000" is 3000, "500.0" is 500). A
    response with no answer scores 0. A prompt that asks none of the task's questions raises ValueError (a
    counted skip, not a reward of 0: the checker cannot judge it)."""
    solved = solve(prompt)
    if solved is None:
        raise ValueError("the prompt asks none of the checkable task's questions")
    task, answer, options = solved
    return 1.0 if given_answer(task, options, response) == answer else 0.0
