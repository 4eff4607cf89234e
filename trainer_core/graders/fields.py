"""``GraderError`` and the checks of one field that every grader type's definition uses.

Each check names the offending field by its dotted path (``reward_functions[1].operation``)
so that the API answers a 400 whose ``param`` points at it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

MAX_NAME_CHARS = 64


class GraderError(ValueError):
    """A reward function that is invalid, or that failed while scoring.

    ``param`` is the dotted path of the offending field inside the object that was given
    (``reward_functions[1].operation``, ``grader.graders.exact.reference``).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def check_keys(raw: dict[str, Any], param: str, kind: str, allowed: Iterable[str]) -> None:
    allowed = set(allowed) | {"type", "name"}
    for key in raw:
        if key not in allowed:
            takes = ", ".join(sorted(allowed))
            raise GraderError(
                f"{param}.{key}",
                f"Unknown parameter '{param}.{key}': a {kind} grader takes {takes}.",
            )


def required(raw: dict[str, Any], key: str, param: str) -> Any:
    if key not in raw or raw[key] is None:
        raise GraderError(f"{param}.{key}", f"Missing required parameter: '{param}.{key}'.")
    return raw[key]


def choice(
    raw: dict[str, Any], key: str, param: str, choices: Sequence[str], default: str | None
) -> str:
    value = raw.get(key, default)
    if value is None:
        raise GraderError(f"{param}.{key}", f"Missing required parameter: '{param}.{key}'.")
    if value not in choices:
        raise GraderError(
            f"{param}.{key}",
            f"Invalid value for '{param}.{key}': {value!r}; one of {', '.join(choices)}.",
        )
    return str(value)


def number(
    raw: dict[str, Any],
    key: str,
    param: str,
    default: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    value = raw.get(key)
    if value is None:
        value = default
    where = f"{param}.{key}"
    if value is None:
        raise GraderError(where, f"Missing required parameter: '{where}'.")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GraderError(where, f"'{where}' must be a finite number (got {value!r}).")
    if integer and value != int(value):
        raise GraderError(where, f"'{where}' must be a whole number (got {value!r}).")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise GraderError(where, f"'{where}' must be {bound} (got {value!r}).")
    if high is not None and value > high:
        raise GraderError(where, f"'{where}' must be at most {high:g} (got {value!r}).")
    return float(value)


def plain_json(value: Any, param: str) -> str:
    """``value`` as strict JSON text; NaN and Infinity (which Python's parser lets in) are refused."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise GraderError(param, f"'{param}' must be plain JSON (no NaN or Infinity).") from None


def check_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GraderError(param, f"'{param}' must be a non-empty string.")
    if len(value) > MAX_NAME_CHARS:
        raise GraderError(param, f"'{param}' is longer than {MAX_NAME_CHARS} characters.")
    if "/" in value or any(ord(ch) < 32 for ch in value):
        raise GraderError(param, f"'{param}' may not contain '/' or control characters.")
    return value


def check_keys_plain(raw: dict[str, Any], param: str, allowed: Sequence[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise GraderError(
                f"{param}.{key}",
                f"Unknown parameter '{param}.{key}' (allowed: {', '.join(allowed)}).",
            )


def float_list(raw: Any, n: int, who: str, param: str) -> list[float]:
    if not isinstance(raw, list | tuple) or len(raw) != n:
        got = f"{len(raw)} values" if isinstance(raw, list | tuple) else type(raw).__name__
        raise GraderError(param, f"{who} must give one reward per sample ({n}); it gave {got}.")
    out: list[float] = []
    for i, value in enumerate(raw):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise GraderError(
                param, f"{who} gave {value!r} for sample {i}; rewards must be finite numbers."
            )
        out.append(float(value))
    return out
