"""``answer_match``: extracting an answer (the last number, a ``\\boxed{}``, or the whole
text) and comparing it with the reference, numerically when both are numbers.
"""

from __future__ import annotations

import math
import re

# A number: optional sign (not after a word character, so "3-5" gives 5), digits with optional
# thousands commas, optional decimals.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+"
)


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    while start != -1:
        at = start + len("\\boxed")
        while at < len(text) and text[at] == " ":
            at += 1
        if at < len(text) and text[at] == "{":
            depth, begin = 0, at + 1
            for pos in range(at, len(text)):
                if text[pos] == "{":
                    depth += 1
                elif text[pos] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[begin:pos].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def extract(text: str, how: str) -> str | None:
    if how == "last_number":
        return _last_number(text)
    if how == "boxed":
        return _boxed(text)
    return text.strip()


def _as_number(text: str) -> float | None:
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", cleaned):
        return None
    value = float(cleaned)
    return value if math.isfinite(value) else None


def answers_equal(answer: str, reference: str) -> bool:
    """Numbers compare numerically (``1,000`` = ``1000.0``); anything else as text with its
    whitespace collapsed."""
    a, b = _as_number(answer), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return " ".join(answer.split()) == " ".join(reference.split())
