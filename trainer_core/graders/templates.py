"""Templates: ``{{item.X}}``, ``{{sample.output_text}}`` and ``{{sample.output_json.X}}``.

A template is compiled once (cached) into literal text and variables, checked when a grader
is defined, and rendered against one ``Sample``: a dataset row, its completion, and the
completion parsed as JSON on first use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from trainer_core.graders.fields import GraderError

MAX_TEMPLATE_CHARS = 100_000

_TEMPLATE_RE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_TEMPLATE_HELP = (
    "use {{item.<column>}}, {{sample.output_text}}, {{sample.output_json}} or "
    "{{sample.output_json.<key>}}"
)


@dataclass(frozen=True)
class _Var:
    root: str  # "item", "output_text" or "output_json"
    path: tuple[str, ...]
    source: str  # as written, for messages


_Pieces = tuple[str | _Var, ...]


@lru_cache(maxsize=4096)
def _compile_template(text: str) -> _Pieces:
    """Split a template into literal text and variables; ValueError names a bad variable."""
    pieces: list[str | _Var] = []
    at = 0
    for match in _TEMPLATE_RE.finditer(text):
        if match.start() > at:
            pieces.append(text[at : match.start()])
        expr = match.group(1).strip()
        parts = expr.split(".")
        source = "{{" + expr + "}}"
        if any(not part.strip() or part != part.strip() for part in parts):
            raise ValueError(f"malformed template variable '{source}': {_TEMPLATE_HELP}")
        if parts[0] == "item" and len(parts) >= 2:
            pieces.append(_Var("item", tuple(parts[1:]), source))
        elif parts[:2] == ["sample", "output_text"] and len(parts) == 2:
            pieces.append(_Var("output_text", (), source))
        elif parts[:2] == ["sample", "output_json"]:
            pieces.append(_Var("output_json", tuple(parts[2:]), source))
        else:
            raise ValueError(f"unknown template variable '{source}': {_TEMPLATE_HELP}")
        at = match.end()
    if at < len(text):
        pieces.append(text[at:])
    return tuple(pieces)


def check_template(value: Any, param: str, *, required: bool = True) -> str:
    if not isinstance(value, str):
        raise GraderError(param, f"'{param}' must be a string (it may hold template variables).")
    if required and not value:
        raise GraderError(param, f"'{param}' must not be empty.")
    if len(value) > MAX_TEMPLATE_CHARS:
        raise GraderError(param, f"'{param}' is longer than {MAX_TEMPLATE_CHARS} characters.")
    try:
        _compile_template(value)
    except ValueError as exc:
        raise GraderError(param, f"'{param}': {exc}.") from None
    return value


_MISSING = object()


class Sample:
    """One sample: its dataset row, its completion, and the completion parsed as JSON."""

    def __init__(self, item: Mapping[str, Any], output_text: str) -> None:
        self.item = item
        self.output_text = output_text
        self._json: Any = _MISSING
        self._json_ok: bool | None = None
        self.sample_parse_error = False

    def output_json(self) -> tuple[bool, Any]:
        if self._json_ok is None:
            try:
                self._json = json.loads(self.output_text, parse_constant=no_constant)
                self._json_ok = True
            except ValueError:
                self._json_ok = False
        return bool(self._json_ok), self._json


def no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _dig(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render(template: str, sample: Sample, param: str) -> str:
    out: list[str] = []
    for piece in _compile_template(template):
        if isinstance(piece, str):
            out.append(piece)
        elif piece.root == "output_text":
            out.append(sample.output_text)
        elif piece.root == "output_json":
            # The completion is the model's: not being JSON earns what an empty value earns.
            ok, parsed = sample.output_json()
            value = _dig(parsed, piece.path) if ok else _MISSING
            if value is _MISSING:
                sample.sample_parse_error = True
                out.append("")
            else:
                out.append(_as_text(value))
        else:
            # The dataset is the user's: a missing column is a mistake to report, not a zero.
            value = _dig(sample.item, piece.path)
            if value is _MISSING:
                keys = ", ".join(sorted(map(str, sample.item))) or "none"
                raise GraderError(
                    param,
                    f"{piece.source} in '{param}' names a field the dataset row does not have "
                    f"(its keys: {keys}).",
                )
            out.append(_as_text(value))
    return "".join(out)
