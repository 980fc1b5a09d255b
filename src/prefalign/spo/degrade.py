"""Graded degradations of a response by removing its RAKE key phrases (SPO, Li et al. 2024).

From the paper: key content is found with RAKE and removed in graded amounts. Ours: degree k of K removes
every occurrence of the top-scoring ⌈k·m/(K−1)⌉ of the response's m key phrases (degree 0 is the response
itself), then tidies whitespace. A response with no key phrase, or whose versions are not strictly shorter
degree by degree (too few phrases to tell K degrees apart), gives no SPO sample.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def _rake():
    try:
        import RAKE
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("SPO needs python-rake: pip install python-rake") from e
    return RAKE.Rake(RAKE.SmartStopList())  # the SMART stop list ships with the package: works offline


def key_phrases(text: str) -> list[str]:
    """Key phrases, best first; ties broken by first appearance so the order is deterministic."""
    lowered = text.lower()
    scored = _rake().run(text)
    return [p for p, _ in sorted(scored, key=lambda ps: (-ps[1], lowered.find(ps[0]), ps[0]))]


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:!?])", r"\1", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def remove_phrases(text: str, phrases: list[str]) -> str:
    # Longest first, so a phrase inside a longer one cannot break the longer match.
    for phrase in sorted(phrases, key=len, reverse=True):
        text = re.sub(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", " ", text, flags=re.IGNORECASE)
    return _tidy(text)


def graded_versions(text: str, degrees: int) -> list[str] | None:
    """[degree 0 (intact), degree 1, …, degree K−1] or None when the response cannot be graded."""
    if degrees < 2:
        raise ValueError(f"spo_degrees must be at least 2, got {degrees}")
    phrases = key_phrases(text)
    m = len(phrases)
    if m == 0:
        return None
    versions = [text]
    for k in range(1, degrees):
        versions.append(remove_phrases(text, phrases[: math.ceil(k * m / (degrees - 1))]))
    if any(len(b) >= len(a) for a, b in zip(versions, versions[1:])):
        return None
    return versions
