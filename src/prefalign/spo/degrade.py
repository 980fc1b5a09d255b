"""Graded degradations of a response by removing its RAKE key phrases (SPO, Li et al. 2024).

From the paper: key content is found with RAKE and removed in graded amounts. Ours: degree k of K removes
every occurrence of the top-scoring ⌈k·m/(K−1)⌉ of the response's m key phrases (degree 0 is the response
itself), then tidies whitespace. A response with no key phrase, or whose versions are not strictly shorter
degree by degree (too few phrases to tell K degrees apart), gives no SPO sample.

Only message text is degraded, never template markup. A completion rendered with a chat template carries
markup (e.g. SmolLM2's `<|im_end|>`): left to RAKE, `im_end`, `<` and `>` become key phrases, and every
top-degree version ends in mangled markup — a shortcut that tells the degree head the answer without reading
the text. So `markup` (the tokenizer's special tokens) is cut off the completion's edges together with the
whitespace around it and put back verbatim around every degraded version, and key phrases never include a
phrase without a letter or digit nor any part of a markup token. A completion with markup inside its text
holds several turns, whose role headers (`user`, `assistant`) cannot be told from message text: it is not
graded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=1)
def _rake():
    try:
        import RAKE
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("SPO needs python-rake: pip install python-rake") from e
    return RAKE.Rake(RAKE.SmartStopList())  # the SMART stop list ships with the package: works offline


def markup_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens as text (chat-template markup such as `<|im_end|>`), longest first.

    Only special tokens: an ordinary added token may be a word of the message."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(added.content)
    return tuple(sorted((t for t in tokens if t.strip()), key=lambda t: (-len(t), t)))


def _markup_pattern(markup: Iterable[str]) -> str | None:
    tokens = sorted({t for t in markup if t.strip()}, key=len, reverse=True)  # longest first: a token never cuts a longer one
    return "|".join(re.escape(t) for t in tokens) or None


def split_markup(text: str, markup: Iterable[str] = ()) -> tuple[str, str, str]:
    """(head, body, tail): the runs of markup tokens and whitespace at either edge, and the text between.

    Whitespace at the edges belongs to the head and tail so that every degraded version starts and ends the
    way the intact one does (a leading space, a newline after an end-of-turn token)."""
    tokens = sorted((t for t in markup if t.strip()), key=len, reverse=True)
    start, end = 0, len(text)
    while True:  # peel whitespace and whole tokens off the front...
        start = end - len(text[start:end].lstrip())
        token = next((t for t in tokens if text.startswith(t, start, end)), None)
        if token is None:
            break
        start += len(token)
    while True:  # ...then off the back
        end = start + len(text[start:end].rstrip())
        token = next((t for t in tokens if text.endswith(t, start, end)), None)
        if token is None:
            break
        end -= len(token)
    return text[:start], text[start:end], text[end:]


def _has_letter_or_digit(phrase: str) -> bool:
    return any(ch.isalnum() for ch in phrase)


def key_phrases(text: str, markup: Iterable[str] = ()) -> list[str]:
    """Key phrases, best first; ties broken by first appearance so the order is deterministic.

    Markup tokens in `text` are read as phrase boundaries, and a phrase that has no letter or digit (`<`, `|`)
    or that is part of a markup token (`im_end`) is never a key phrase: removing it would change markup or
    punctuation rather than content."""
    markup = [t for t in markup if t.strip()]
    pattern = _markup_pattern(markup)
    if pattern:
        text = re.sub(pattern, "\t", text)  # a tab ends a RAKE phrase
    lowered_markup = [t.lower() for t in markup]
    lowered = text.lower()
    scored = [
        (p, s) for p, s in _rake().run(text)
        if _has_letter_or_digit(p) and not any(p in t for t in lowered_markup)
    ]
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


def graded_versions(text: str, degrees: int, markup: Iterable[str] = ()) -> list[str] | None:
    """[degree 0 (intact), degree 1, …, degree K−1] or None when the response cannot be graded.

    Only the message text between the edge markup (see `split_markup`) is degraded; each version carries the
    intact head and tail verbatim. `markup`: the tokenizer's special tokens (`markup_tokens`)."""
    if degrees < 2:
        raise ValueError(f"spo_degrees must be at least 2, got {degrees}")
    markup = tuple(markup)
    head, body, tail = split_markup(text, markup)
    pattern = _markup_pattern(markup)
    if pattern and re.search(pattern, body):
        return None  # several turns: their role headers would be degraded like message text
    phrases = key_phrases(body, markup)
    m = len(phrases)
    if m == 0:
        return None
    versions = [text]
    for k in range(1, degrees):
        versions.append(head + remove_phrases(body, phrases[: math.ceil(k * m / (degrees - 1))]) + tail)
    if any(len(b) >= len(a) for a, b in zip(versions, versions[1:])):
        return None
    return versions
