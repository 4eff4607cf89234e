"""Reward functions ("graders"): data that scores completions, never code from the request.

A reward function is a JSON object with a ``type``. OpenAI's grader types:

- ``string_check`` (``eq``, ``ne``, ``like`` = substring, ``ilike`` = case-insensitive substring)
- ``text_similarity`` (``fuzzy_match``, ``bleu``, ``gleu``, ``rouge_1``..``rouge_5``, ``rouge_l``;
  ``cosine`` and ``meteor`` need an embedding model or WordNet and are refused)
- ``score_model`` (its ``model`` must be a reward model trained here: ``ft:...``)
- ``multi`` (sub-graders combined by a ``calculate_output`` formula)

and ours: ``regex``, ``json_valid``, ``json_schema``, ``length``, ``answer_match``,
``reward_model`` and ``http``. OpenAI's ``python`` and ``label_model`` are refused. Every
definition (which BLEU, which fuzzy ratio, ...) is in docs/methods.md, "Reward functions".

Templates: ``{{item.X}}`` (a dataset column; ``X.Y`` and list indexes ``X.0`` reach inside),
``{{sample.output_text}}`` (the completion) and ``{{sample.output_json}}`` /
``{{sample.output_json.X}}`` (the completion parsed as JSON; empty when it is not JSON).

This module imports nothing but the standard library: the API validates and runs graders
with it, and the training methods score with ``score``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "GraderError",
    "Scores",
    "bleu_score",
    "fuzzy_ratio",
    "gleu_score",
    "grader_to_reward_functions",
    "normalize_grader",
    "reward_model_names",
    "rouge_l_score",
    "rouge_n_score",
    "run_grader",
    "score",
    "validate_reward_functions",
]

RewardModelFn = Callable[[str, list[dict[str, Any]], list[str]], list[float]]

MAX_FUNCTIONS = 32
MAX_SUB_GRADERS = 32
MAX_NAME_CHARS = 64
MAX_TEMPLATE_CHARS = 100_000
MAX_PATTERN_CHARS = 1_000
MAX_FORMULA_CHARS = 1_000
MAX_FORMULA_NODES = 500
MAX_SCHEMA_CHARS = 100_000
MAX_SCHEMA_DEPTH = 32
MAX_URL_CHARS = 2_048
# text_similarity is quadratic in the worst case (fuzzy_match, rouge_l): longer texts are refused.
MAX_SIMILARITY_CHARS = 100_000
MAX_HTTP_RESPONSE_BYTES = 16 * 1024 * 1024
# A regex runs in a child interpreter that is killed after this long (per batch of samples):
# Python's re cannot be interrupted, and a pattern can backtrack for ever.
REGEX_TIMEOUT_S = 5.0

OPENAI_TYPES = ("string_check", "text_similarity", "score_model", "multi")
OUR_TYPES = (
    "regex",
    "json_valid",
    "json_schema",
    "length",
    "answer_match",
    "reward_model",
    "http",
)
SIMILARITY_METRICS = (
    "fuzzy_match",
    "bleu",
    "gleu",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
_UNAVAILABLE_METRICS = {
    "cosine": "it needs an embedding model, which this server does not host",
    "meteor": "it needs the WordNet synonym database, which this offline server does not have",
}
_STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
_DEFAULT_INPUT = "{{sample.output_text}}"


class GraderError(ValueError):
    """A reward function that is invalid, or that failed while scoring.

    ``param`` is the dotted path of the offending field inside the object that was given
    (``reward_functions[1].operation``, ``grader.graders.exact.reference``).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class Scores:
    total: list[float]  # weighted sum per sample
    per_function: dict[str, list[float]]  # each function's own reward per sample, by name


# -- templates -----------------------------------------------------------------------------

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


def _check_template(value: Any, param: str, *, required: bool = True) -> str:
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


class _Sample:
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
                self._json = json.loads(self.output_text, parse_constant=_no_constant)
                self._json_ok = True
            except ValueError:
                self._json_ok = False
        return bool(self._json_ok), self._json


def _no_constant(name: str) -> Any:
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


def _render(template: str, sample: _Sample, param: str) -> str:
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


# -- field checks --------------------------------------------------------------------------


def _check_keys(raw: dict[str, Any], param: str, kind: str, allowed: Iterable[str]) -> None:
    allowed = set(allowed) | {"type", "name"}
    for key in raw:
        if key not in allowed:
            takes = ", ".join(sorted(allowed))
            raise GraderError(
                f"{param}.{key}",
                f"Unknown parameter '{param}.{key}': a {kind} grader takes {takes}.",
            )


def _required(raw: dict[str, Any], key: str, param: str) -> Any:
    if key not in raw or raw[key] is None:
        raise GraderError(f"{param}.{key}", f"Missing required parameter: '{param}.{key}'.")
    return raw[key]


def _choice(
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


def _number(
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


def _plain_json(value: Any, param: str) -> str:
    """``value`` as strict JSON text; NaN and Infinity (which Python's parser lets in) are refused."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise GraderError(param, f"'{param}' must be plain JSON (no NaN or Infinity).") from None


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GraderError(param, f"'{param}' must be a non-empty string.")
    if len(value) > MAX_NAME_CHARS:
        raise GraderError(param, f"'{param}' is longer than {MAX_NAME_CHARS} characters.")
    if "/" in value or any(ord(ch) < 32 for ch in value):
        raise GraderError(param, f"'{param}' may not contain '/' or control characters.")
    return value


# -- normalisation, per type ---------------------------------------------------------------

_Normaliser = Callable[[dict[str, Any], str], dict[str, Any]]


def _string_check(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "string_check", ("input", "reference", "operation"))
    return {
        "input": _check_template(_required(raw, "input", param), f"{param}.input"),
        "reference": _check_template(
            _required(raw, "reference", param), f"{param}.reference", required=False
        ),
        "operation": _choice(raw, "operation", param, _STRING_OPERATIONS, None),
    }


def _text_similarity(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "text_similarity", ("input", "reference", "evaluation_metric"))
    metric = raw.get("evaluation_metric")
    if isinstance(metric, str) and metric in _UNAVAILABLE_METRICS:
        raise GraderError(
            f"{param}.evaluation_metric",
            f"evaluation_metric '{metric}' is not available on this server: "
            f"{_UNAVAILABLE_METRICS[metric]}. Use one of {', '.join(SIMILARITY_METRICS)}.",
        )
    return {
        "input": _check_template(_required(raw, "input", param), f"{param}.input", required=False),
        "reference": _check_template(
            _required(raw, "reference", param), f"{param}.reference", required=False
        ),
        "evaluation_metric": _choice(raw, "evaluation_metric", param, SIMILARITY_METRICS, None),
    }


def _python(raw: dict[str, Any], param: str) -> dict[str, Any]:
    raise GraderError(
        f"{param}.type",
        "The python grader is not supported: it runs code from the request, which this server "
        "never does. Use a declarative reward function instead (string_check, "
        "text_similarity, regex, json_schema, answer_match, length, multi), a trained "
        "reward_model, or an http reward function served at a host the operator allows.",
    )


def _label_model(raw: dict[str, Any], param: str) -> dict[str, Any]:
    raise GraderError(
        f"{param}.type",
        "The label_model grader is not supported: it needs a hosted chat model as judge, and "
        "this server has none. Use score_model with a reward model trained here "
        "(a reward_model job), or an http reward function.",
    )


def _reward_model_name(raw: dict[str, Any], param: str, kind: str) -> str:
    model = _required(raw, "model", param)
    if not isinstance(model, str) or not model.startswith("ft:"):
        raise GraderError(
            f"{param}.model",
            f"'{param}.model' must name a reward model trained on this server (the "
            f"fine_tuned_model of a finished reward_model job, 'ft:...'); a {kind} grader has "
            f"no hosted judge models here (got {model!r}).",
        )
    return model


def _content_text(content: Any, param: str) -> str:
    """A message's content (a string or a list of text parts) as one template string."""
    if isinstance(content, str):
        return _check_template(content, param, required=False)
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            where = f"{param}[{i}]"
            if isinstance(part, str):
                texts.append(_check_template(part, where, required=False))
            elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
                texts.append(_check_template(part.get("text"), f"{where}.text", required=False))
            else:
                raise GraderError(
                    where,
                    f"'{where}' must be text (a string, or an input_text/output_text part); "
                    "a reward model scores text only.",
                )
        return "".join(texts)
    raise GraderError(param, f"'{param}' must be a string or a list of text parts.")


def _score_model(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "score_model", ("model", "input", "range", "sampling_params"))
    model = _reward_model_name(raw, param, "score_model")
    messages: list[dict[str, str]] = []
    raw_input = raw.get("input") or []
    if not isinstance(raw_input, list):
        raise GraderError(f"{param}.input", f"'{param}.input' must be a list of messages.")
    for i, message in enumerate(raw_input):
        where = f"{param}.input[{i}]"
        if not isinstance(message, dict):
            raise GraderError(where, f"'{where}' must be a message object {{role, content}}.")
        _check_keys_plain(message, where, ("role", "content", "type"))
        if message.get("type", "message") != "message":
            raise GraderError(f"{where}.type", f"'{where}.type' must be 'message'.")
        role = _choice(message, "role", where, ("system", "developer", "user", "assistant"), None)
        content = _content_text(_required(message, "content", where), f"{where}.content")
        messages.append({"role": role, "content": content})
    low, high = 0.0, 1.0
    if raw.get("range") is not None:
        rng = raw["range"]
        if (
            not isinstance(rng, list)
            or len(rng) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in rng)
            or not all(math.isfinite(v) for v in rng)
            or rng[0] >= rng[1]
        ):
            raise GraderError(
                f"{param}.range",
                f"'{param}.range' must be two finite numbers [low, high], low < high.",
            )
        low, high = float(rng[0]), float(rng[1])
    sampling = raw.get("sampling_params")
    if sampling is not None and not isinstance(sampling, dict):
        raise GraderError(
            f"{param}.sampling_params", f"'{param}.sampling_params' must be an object."
        )
    if sampling is not None:
        _plain_json(sampling, f"{param}.sampling_params")
    out: dict[str, Any] = {"model": model, "input": messages, "range": [low, high]}
    if sampling is not None:
        # Accepted for compatibility and ignored: a reward model does not sample.
        out["sampling_params"] = sampling
    return out


def _check_keys_plain(raw: dict[str, Any], param: str, allowed: Sequence[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise GraderError(
                f"{param}.{key}",
                f"Unknown parameter '{param}.{key}' (allowed: {', '.join(allowed)}).",
            )


def _reward_model(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "reward_model", ("model",))
    return {"model": _reward_model_name(raw, param, "reward_model")}


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}


def _regex(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "regex", ("pattern", "input", "flags", "mode"))
    pattern = _required(raw, "pattern", param)
    where = f"{param}.pattern"
    if not isinstance(pattern, str) or not pattern:
        raise GraderError(where, f"'{where}' must be a non-empty string.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GraderError(where, f"'{where}' is longer than {MAX_PATTERN_CHARS} characters.")
    flags = raw.get("flags", "")
    if not isinstance(flags, str) or any(ch not in _REGEX_FLAGS for ch in flags):
        raise GraderError(
            f"{param}.flags", f"'{param}.flags' must be a string of i, m, s (got {flags!r})."
        )
    try:
        re.compile(pattern, _regex_flags(flags))
    except (re.error, OverflowError, RecursionError) as exc:
        raise GraderError(where, f"'{where}' is not a valid regular expression: {exc}.") from None
    return {
        "pattern": pattern,
        "flags": "".join(sorted(set(flags))),
        "mode": _choice(raw, "mode", param, ("search", "fullmatch"), "search"),
        "input": _check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _regex_flags(flags: str) -> int:
    value = 0
    for ch in flags:
        value |= _REGEX_FLAGS[ch]
    return value


def _json_valid(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "json_valid", ("input",))
    return {"input": _check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input")}


def _json_schema(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "json_schema", ("input", "schema"))
    schema = _required(raw, "schema", param)
    if len(_plain_json(schema, f"{param}.schema")) > MAX_SCHEMA_CHARS:
        raise GraderError(
            f"{param}.schema", f"'{param}.schema' is larger than {MAX_SCHEMA_CHARS} characters."
        )
    _check_schema(schema, f"{param}.schema", 0)
    return {
        "schema": schema,
        "input": _check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _length(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "length", ("target", "unit", "tolerance", "scale", "input"))
    target = _number(raw, "target", param, None, low=0, high=10_000_000, integer=True)
    return {
        "target": int(target),
        "unit": _choice(raw, "unit", param, ("chars", "words"), "chars"),
        "tolerance": _number(raw, "tolerance", param, 0.0, low=0, high=10_000_000),
        "scale": _number(raw, "scale", param, max(target, 1.0), low=0, low_open=True, high=1e9),
        "input": _check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


_EXTRACTS = ("last_number", "boxed", "none")


def _answer_match(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "answer_match", ("extract", "reference", "reference_extract", "input"))
    return {
        "extract": _choice(raw, "extract", param, _EXTRACTS, "last_number"),
        "reference": _check_template(_required(raw, "reference", param), f"{param}.reference"),
        "reference_extract": _choice(raw, "reference_extract", param, _EXTRACTS, "none"),
        "input": _check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _http(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "http", ("url", "timeout_s"))
    url = _required(raw, "url", param)
    where = f"{param}.url"
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise GraderError(where, f"'{where}' must be a URL of at most {MAX_URL_CHARS} characters.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as exc:
        raise GraderError(where, f"'{where}' is not a valid URL: {exc}.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GraderError(where, f"'{where}' must be an http:// or https:// URL with a host.")
    if parts.username is not None or parts.password is not None:
        raise GraderError(
            where, f"'{where}' may not carry credentials: the job spec is stored and shown back."
        )
    out: dict[str, Any] = {"url": url}
    if raw.get("timeout_s") is not None:
        out["timeout_s"] = _number(raw, "timeout_s", param, None, low=0, low_open=True, high=600)
    return out


def _multi(raw: dict[str, Any], param: str) -> dict[str, Any]:
    _check_keys(raw, param, "multi", ("graders", "calculate_output"))
    graders = _required(raw, "graders", param)
    where = f"{param}.graders"
    if not isinstance(graders, dict) or not graders:
        raise GraderError(where, f"'{where}' must be an object of named graders.")
    if isinstance(graders.get("type"), str):
        # The SDK's type declares one grader here; it is keyed by its own name.
        single = graders
        graders = {str(single.get("name") or single["type"]): single}
    if len(graders) > MAX_SUB_GRADERS:
        raise GraderError(where, f"'{where}' has more than {MAX_SUB_GRADERS} graders.")
    subs: dict[str, dict[str, Any]] = {}
    for key, sub in graders.items():
        sub_param = f"{where}.{key}"
        _name(key, sub_param)
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(
                f"{sub_param}.type", f"'{sub_param}': a multi grader cannot nest another multi."
            )
        if isinstance(sub, dict) and "name" not in sub:
            sub = {**sub, "name": key}
        subs[key] = normalize_grader(sub, param=sub_param)
    formula = _required(raw, "calculate_output", param)
    _parse_formula(formula, set(subs), f"{param}.calculate_output")
    return {"graders": subs, "calculate_output": formula}


_NORMALISERS: dict[str, _Normaliser] = {
    "string_check": _string_check,
    "text_similarity": _text_similarity,
    "score_model": _score_model,
    "multi": _multi,
    "python": _python,
    "label_model": _label_model,
    "regex": _regex,
    "json_valid": _json_valid,
    "json_schema": _json_schema,
    "length": _length,
    "answer_match": _answer_match,
    "reward_model": _reward_model,
    "http": _http,
}


def normalize_grader(raw: object, *, param: str = "grader") -> dict[str, Any]:
    """One grader object, checked and with its defaults filled (``name`` defaults to ``type``).

    Raises GraderError naming the field. The result is JSON-able and normalising it again
    gives it back unchanged.
    """
    if not isinstance(raw, dict):
        raise GraderError(param, f"'{param}' must be a grader object with a 'type'.")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in _NORMALISERS:
        known = ", ".join((*OPENAI_TYPES, *OUR_TYPES))
        raise GraderError(
            f"{param}.type",
            f"Invalid value for '{param}.type': {kind!r}; one of {known}.",
        )
    name = _name(raw["name"], f"{param}.name") if raw.get("name") is not None else str(kind)
    body = _NORMALISERS[str(kind)](
        {k: v for k, v in raw.items() if k != "name" or v is not None}, param
    )
    return {"type": kind, "name": name, **body}


def validate_reward_functions(
    raw: object,
    *,
    param: str = "reward_functions",
    http_allowed_hosts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """A GRPO/RLOO block's ``reward_functions``: a list of grader objects, each with an
    optional ``weight`` (default 1.0, any finite number) and ``name`` (default its type,
    made unique with ``_2``, ``_3``...). Returns the normalised list.

    With ``http_allowed_hosts`` given, an http function whose host is not on it is refused now
    rather than at the first training step.
    """
    if not isinstance(raw, list) or not raw:
        raise GraderError(param, f"'{param}' must be a non-empty list of reward functions.")
    if len(raw) > MAX_FUNCTIONS:
        raise GraderError(param, f"'{param}' has more than {MAX_FUNCTIONS} reward functions.")
    functions: list[dict[str, Any]] = []
    explicit: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(entry, dict):
            raise GraderError(where, f"'{where}' must be a reward function object with a 'type'.")
        weight = _number(entry, "weight", where, 1.0, low=-1e6, high=1e6)
        grader = {k: v for k, v in entry.items() if k != "weight"}
        function = normalize_grader(grader, param=where)
        if entry.get("name") is not None:
            if function["name"] in explicit:
                raise GraderError(
                    f"{where}.name", f"Duplicate reward function name '{function['name']}'."
                )
            explicit.add(function["name"])
        function["weight"] = weight
        functions.append(function)
    # Functions without a name are named after their type, skipping names already taken.
    taken = set(explicit)
    for entry, function in zip(raw, functions, strict=True):
        if entry.get("name") is None:
            base, k, name = function["name"], 1, function["name"]
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            function["name"] = name
            taken.add(name)
    if http_allowed_hosts is not None:
        for i, function in enumerate(functions):
            _check_hosts(function, f"{param}[{i}]", http_allowed_hosts)
    return functions


def grader_to_reward_functions(
    raw: object, *, param: str = "grader", http_allowed_hosts: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """OpenAI reinforcement's single ``grader`` (any type, multi included) as the same
    normalised list as ``validate_reward_functions``: one function of weight 1."""
    function = normalize_grader(raw, param=param)
    function["weight"] = 1.0
    if http_allowed_hosts is not None:
        _check_hosts(function, param, http_allowed_hosts)
    return [function]


def _walk(function: dict[str, Any], param: str) -> Iterable[tuple[dict[str, Any], str]]:
    yield function, param
    if function.get("type") == "multi":
        for key, sub in function.get("graders", {}).items():
            yield from _walk(sub, f"{param}.graders.{key}")


def reward_model_names(functions: list[dict[str, Any]]) -> set[str]:
    """The reward models (``ft:...`` names) that reward_model and score_model functions use."""
    names: set[str] = set()
    for function in functions:
        for node, _ in _walk(function, ""):
            if node.get("type") in ("reward_model", "score_model") and isinstance(
                node.get("model"), str
            ):
                names.add(node["model"])
    return names


def _check_hosts(function: dict[str, Any], param: str, hosts: Sequence[str]) -> None:
    for node, where in _walk(function, param):
        if node.get("type") == "http":
            _allowed_url(node["url"], hosts, f"{where}.url")


# -- calculate_output: a tiny arithmetic language, parsed by ast and never eval'ed ---------

_FORMULA_FUNCS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _parse_formula(text: Any, names: set[str], param: str) -> ast.expr:
    if not isinstance(text, str) or not text.strip():
        raise GraderError(param, f"'{param}' must be a non-empty formula string.")
    if len(text) > MAX_FORMULA_CHARS:
        raise GraderError(param, f"'{param}' is longer than {MAX_FORMULA_CHARS} characters.")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise GraderError(param, f"'{param}' is not a valid formula: {exc}.") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_FORMULA_NODES:
        raise GraderError(param, f"'{param}' is too long a formula.")
    allowed_help = (
        "a formula may use numbers, the graders' names, + - * /, parentheses and "
        "min(), max(), abs()"
    )
    called = {id(node.func) for node in nodes if isinstance(node, ast.Call)}
    for node in nodes:
        if isinstance(node, ast.Expression | ast.Load | ast.UnaryOp | ast.BinOp):
            if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.UAdd | ast.USub):
                raise GraderError(param, f"'{param}': operator not allowed; {allowed_help}.")
            if isinstance(node, ast.BinOp) and not isinstance(node.op, _BINOPS):
                raise GraderError(param, f"'{param}': operator not allowed; {allowed_help}.")
        elif isinstance(node, ast.operator | ast.unaryop):
            continue
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GraderError(param, f"'{param}': {value!r} is not a number; {allowed_help}.")
            try:
                if not math.isfinite(float(value)):
                    raise OverflowError
            except OverflowError:
                raise GraderError(param, f"'{param}': the number {value} is too large.") from None
        elif isinstance(node, ast.Name):
            if id(node) in called:
                if node.id not in _FORMULA_FUNCS:
                    raise GraderError(
                        param, f"'{param}': calling '{node.id}' is not allowed; {allowed_help}."
                    )
            elif node.id not in names:
                known = ", ".join(sorted(names))
                raise GraderError(
                    param, f"'{param}': unknown name '{node.id}' (the graders are: {known})."
                )
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise GraderError(
                    param, f"'{param}': only min, max and abs may be called; {allowed_help}."
                )
            if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
                raise GraderError(param, f"'{param}': {node.func.id}() takes plain arguments.")
            if node.func.id == "abs" and len(node.args) != 1:
                raise GraderError(param, f"'{param}': abs() takes one argument.")
        else:
            what = type(node).__name__
            raise GraderError(param, f"'{param}': {what} is not allowed; {allowed_help}.")
    return tree.body


def _eval_formula(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # checked by _parse_formula
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        operand = _eval_formula(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left = _eval_formula(node.left, values)
        right = _eval_formula(node.right, values)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right if right != 0 else 0.0  # documented: x / 0 is 0
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_eval_formula(arg, values) for arg in node.args]
        return float(_FORMULA_FUNCS[node.func.id](*args))
    raise AssertionError(f"unchecked formula node {type(node).__name__}")


# -- JSON Schema (a documented subset) -----------------------------------------------------

_SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_SCHEMA_ANNOTATIONS = ("title", "description", "$schema", "$id", "$comment", "default", "examples")
_SCHEMA_KEYWORDS = (
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "anyOf",
)


def _check_schema(schema: Any, param: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise GraderError(param, f"'{param}' must be a JSON Schema object (or true/false).")
    if depth > MAX_SCHEMA_DEPTH:
        raise GraderError(param, f"'{param}' nests deeper than {MAX_SCHEMA_DEPTH} levels.")
    for key, value in schema.items():
        where = f"{param}.{key}"
        if key in _SCHEMA_ANNOTATIONS:
            continue
        if key not in _SCHEMA_KEYWORDS:
            raise GraderError(
                where,
                f"JSON Schema keyword '{key}' is not supported here; the supported ones are "
                f"{', '.join(_SCHEMA_KEYWORDS)}.",
            )
        if key == "type":
            kinds = value if isinstance(value, list) else [value]
            if not kinds or any(k not in _SCHEMA_TYPES for k in kinds):
                raise GraderError(
                    where, f"'{where}' must be one or a list of {', '.join(_SCHEMA_TYPES)}."
                )
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise GraderError(where, f"'{where}' must be a non-empty list.")
        elif key == "properties":
            if not isinstance(value, dict):
                raise GraderError(where, f"'{where}' must be an object of schemas.")
            for prop, sub in value.items():
                _check_schema(sub, f"{where}.{prop}", depth + 1)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise GraderError(where, f"'{where}' must be a list of property names.")
        elif key in ("additionalProperties", "items"):
            _check_schema(value, where, depth + 1)
        elif key == "anyOf":
            if not isinstance(value, list) or not value:
                raise GraderError(where, f"'{where}' must be a non-empty list of schemas.")
            for i, sub in enumerate(value):
                _check_schema(sub, f"{where}[{i}]", depth + 1)
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GraderError(where, f"'{where}' must be a non-negative integer.")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise GraderError(where, f"'{where}' must be a number.")


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return kind == "number" or float(value).is_integer()


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def schema_matches(value: Any, schema: Any) -> bool:
    """Whether a parsed JSON value satisfies a schema of the supported subset."""
    if isinstance(schema, bool):
        return schema
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, k) for k in kinds):
            return False
    if "enum" in schema and not any(_json_equal(value, v) for v in schema["enum"]):
        return False
    if "const" in schema and not _json_equal(value, schema["const"]):
        return False
    if "anyOf" in schema and not any(schema_matches(value, s) for s in schema["anyOf"]):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        for key, sub in value.items():
            if key in props:
                if not schema_matches(sub, props[key]):
                    return False
            elif "additionalProperties" in schema and not schema_matches(
                sub, schema["additionalProperties"]
            ):
                return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return False
        if "items" in schema and not all(schema_matches(v, schema["items"]) for v in value):
            return False
    if isinstance(value, str) and (
        len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf)
    ):
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return False
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return False
    return True


# -- text similarity -----------------------------------------------------------------------


def _lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(a)) big-int
    operations on len(b)-bit words."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def fuzzy_ratio(a: str, b: str) -> float:
    """Normalised InDel similarity, ``2·LCS(a, b) / (len(a) + len(b))`` over characters,
    case-sensitive: what rapidfuzz's ``fuzz.ratio`` computes (÷100). Two empty strings: 1."""
    if not a and not b:
        return 1.0
    return 2.0 * _lcs_length(a, b) / (len(a) + len(b))


# sacreBLEU's "13a" tokenizer (mteval-v13a.pl), the default of sacrebleu.sentence_bleu.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def tokenize_13a(text: str) -> list[str]:
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (
            line.replace("&quot;", '"')
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
        )
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_score(hypothesis: str, reference: str) -> float:
    """Sentence BLEU in [0, 1], exactly sacrebleu's ``sentence_bleu(h, [r]).score / 100``:
    13a tokens, case-sensitive, n-grams up to 4, "exp" smoothing (the k-th n-gram order with
    no match counts 1 / (2^k · total)), effective order (orders the hypothesis is too short for
    are left out) and the brevity penalty exp(1 − r/h) when h < r."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    if not hyp:
        return 0.0
    log_sum, order, smooth = 0.0, 0, 1.0
    for n in range(1, 5):
        total = len(hyp) - n + 1
        if total <= 0:
            break
        order = n
        correct = sum((_ngrams(hyp, n) & _ngrams(ref, n)).values())
        if correct == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * total))
        else:
            log_sum += math.log(correct / total)
    penalty = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return penalty * math.exp(log_sum / order)


def gleu_score(hypothesis: str, reference: str) -> float:
    """Google-BLEU (Wu et al. 2016), as nltk's ``sentence_gleu`` (1- to 4-grams) on 13a
    tokens: matching n-grams ÷ max(hypothesis n-grams, reference n-grams), i.e.
    min(precision, recall) over all orders together."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    matches = hyp_total = ref_total = 0
    for n in range(1, 5):
        hyp_n, ref_n = _ngrams(hyp, n), _ngrams(ref, n)
        matches += sum((hyp_n & ref_n).values())
        hyp_total += max(0, len(hyp) - n + 1)
        ref_total += max(0, len(ref) - n + 1)
    most = max(hyp_total, ref_total)
    return matches / most if most else 0.0


_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize_rouge(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, ASCII letters and digits only, no stemming."""
    return [t for t in _ROUGE_NON_ALNUM.sub(" ", text.lower()).split() if t]


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / max(hyp_count, 1)
    recall = overlap / max(ref_count, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n_score(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1, as Google's rouge_score ``RougeScorer(["rougeN"])`` computes ``fmeasure``."""
    hyp_n = _ngrams(tokenize_rouge(hypothesis), n)
    ref_n = _ngrams(tokenize_rouge(reference), n)
    overlap = sum((hyp_n & ref_n).values())
    return _f1(overlap, sum(hyp_n.values()), sum(ref_n.values()))


def rouge_l_score(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (token LCS), as rouge_score's ``rougeL`` ``fmeasure``."""
    hyp, ref = tokenize_rouge(hypothesis), tokenize_rouge(reference)
    if not hyp or not ref:
        return 0.0
    return _f1(_lcs_length(hyp, ref), len(hyp), len(ref))


def _similarity(metric: str, hypothesis: str, reference: str, param: str) -> float:
    for what, text in (("input", hypothesis), ("reference", reference)):
        if len(text) > MAX_SIMILARITY_CHARS:
            raise GraderError(
                f"{param}.{what}",
                f"text_similarity {what} has {len(text)} characters; the limit is "
                f"{MAX_SIMILARITY_CHARS}.",
            )
    if metric == "fuzzy_match":
        return fuzzy_ratio(hypothesis, reference)
    if metric == "bleu":
        return bleu_score(hypothesis, reference)
    if metric == "gleu":
        return gleu_score(hypothesis, reference)
    if metric == "rouge_l":
        return rouge_l_score(hypothesis, reference)
    return rouge_n_score(hypothesis, reference, int(metric.removeprefix("rouge_")))


# -- answers -------------------------------------------------------------------------------

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


def _extract(text: str, how: str) -> str | None:
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


# -- scoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Env:
    reward_model: RewardModelFn | None
    http_allowed_hosts: tuple[str, ...]
    http_timeout_s: float


def _evaluate(
    function: dict[str, Any],
    samples: list[_Sample],
    env: _Env,
    param: str,
    subs_out: dict[str, list[float]] | None = None,
) -> list[float]:
    kind = function["type"]
    if kind == "multi":
        return _evaluate_multi(function, samples, env, param, subs_out)
    if kind in ("reward_model", "score_model"):
        values = _evaluate_reward_model(function, samples, env, param)
    elif kind == "http":
        values = _evaluate_http(function, samples, env, param)
    elif kind == "regex":
        texts = [_render(function["input"], s, f"{param}.input") for s in samples]
        matched = _regex_match_all(function, texts, param)
        values = [1.0 if m else 0.0 for m in matched]
    else:
        values = [_evaluate_one(function, s, param) for s in samples]
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise GraderError(
                param, f"reward function '{function['name']}' gave {value} for sample {i}."
            )
    return values


def _evaluate_one(function: dict[str, Any], sample: _Sample, param: str) -> float:
    kind = function["type"]
    text = _render(function["input"], sample, f"{param}.input")
    if kind == "string_check":
        ref = _render(function["reference"], sample, f"{param}.reference")
        op = function["operation"]
        if op == "eq":
            return float(text == ref)
        if op == "ne":
            return float(text != ref)
        if op == "like":
            return float(ref in text)
        return float(ref.casefold() in text.casefold())
    if kind == "text_similarity":
        ref = _render(function["reference"], sample, f"{param}.reference")
        return _similarity(function["evaluation_metric"], text, ref, param)
    if kind == "json_valid":
        try:
            json.loads(text, parse_constant=_no_constant)
        except ValueError:
            return 0.0
        return 1.0
    if kind == "json_schema":
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError:
            return 0.0
        return float(schema_matches(value, function["schema"]))
    if kind == "length":
        size = len(text) if function["unit"] == "chars" else len(text.split())
        off = max(0.0, abs(size - function["target"]) - function["tolerance"])
        return 1.0 / (1.0 + off / function["scale"])
    if kind == "answer_match":
        answer = _extract(text, function["extract"])
        ref_text = _render(function["reference"], sample, f"{param}.reference")
        reference = _extract(ref_text, function["reference_extract"])
        if answer is None or reference is None:
            return 0.0
        return float(answers_equal(answer, reference))
    raise AssertionError(f"no evaluator for {kind}")


def _evaluate_multi(
    function: dict[str, Any],
    samples: list[_Sample],
    env: _Env,
    param: str,
    subs_out: dict[str, list[float]] | None,
) -> list[float]:
    formula = _parse_formula(
        function["calculate_output"], set(function["graders"]), f"{param}.calculate_output"
    )
    sub_values = {
        key: _evaluate(sub, samples, env, f"{param}.graders.{key}")
        for key, sub in function["graders"].items()
    }
    if subs_out is not None:
        subs_out.update(sub_values)
    out: list[float] = []
    for i in range(len(samples)):
        value = _eval_formula(formula, {key: values[i] for key, values in sub_values.items()})
        if not math.isfinite(value):
            raise GraderError(
                f"{param}.calculate_output",
                f"'{param}.calculate_output' gave {value} for sample {i} (overflow).",
            )
        out.append(value)
    return out


_REGEX_CHILD = (
    "import json,re,sys\n"
    "d=json.load(sys.stdin)\n"
    "p=re.compile(d['pattern'],d['flags'])\n"
    "f=p.fullmatch if d['mode']=='fullmatch' else p.search\n"
    "sys.stdout.write(json.dumps([f(t) is not None for t in d['texts']]))\n"
)


def _regex_match_all(function: dict[str, Any], texts: list[str], param: str) -> list[bool]:
    """Match in a child interpreter killed after REGEX_TIMEOUT_S: a pattern that backtracks
    catastrophically fails the step with a clear error instead of hanging the worker."""
    if not texts:
        return []
    payload = json.dumps(
        {
            "pattern": function["pattern"],
            "flags": _regex_flags(function["flags"]),
            "mode": function["mode"],
            "texts": texts,
        }
    ).encode("ascii")
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _REGEX_CHILD],
            input=payload,
            capture_output=True,
            timeout=REGEX_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GraderError(
            f"{param}.pattern",
            f"regex '{function['name']}' ran longer than {REGEX_TIMEOUT_S:g}s on {len(texts)} "
            "sample(s) (catastrophic backtracking?); simplify the pattern.",
        ) from None
    if done.returncode != 0:
        raise GraderError(
            f"{param}.pattern",
            f"regex '{function['name']}' failed: {done.stderr.decode(errors='replace')[-500:]}",
        )
    result = json.loads(done.stdout)
    return [bool(v) for v in result]


def _evaluate_reward_model(
    function: dict[str, Any], samples: list[_Sample], env: _Env, param: str
) -> list[float]:
    if env.reward_model is None:
        raise GraderError(
            f"{param}.type",
            f"'{function['name']}' is a {function['type']} grader: it scores with a trained reward "
            "model, which runs on the workers during training (the API has no torch), so it "
            "cannot run here. /validate checks it.",
        )
    if function["type"] == "score_model" and function["input"]:
        items: list[dict[str, Any]] = []
        completions: list[str] = []
        for sample in samples:
            messages = [
                {
                    "role": m["role"],
                    "content": _render(m["content"], sample, f"{param}.input[{j}].content"),
                }
                for j, m in enumerate(function["input"])
            ]
            if messages[-1]["role"] == "assistant":
                completions.append(messages.pop()["content"])
            else:
                completions.append(sample.output_text)
            items.append({"messages": messages})
    else:
        items = [dict(sample.item) for sample in samples]
        completions = [sample.output_text for sample in samples]
    try:
        raw = env.reward_model(function["model"], items, completions)
    except GraderError:
        raise
    except Exception as exc:
        raise GraderError(
            f"{param}.model", f"reward model '{function['model']}' failed: {exc}"
        ) from exc
    values = _float_list(raw, len(samples), f"reward model '{function['model']}'", f"{param}.model")
    if function["type"] == "score_model":
        low, high = function["range"]
        values = [low + (high - low) * _sigmoid(v) for v in values]
    return values


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _float_list(raw: Any, n: int, who: str, param: str) -> list[float]:
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


def _parse_host_entry(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def _allowed_url(url: str, hosts: Sequence[str], param: str) -> None:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in hosts:
        if not entry.strip():
            continue
        allowed_host, allowed_port = _parse_host_entry(entry)
        if allowed_host == host and allowed_port in (None, port):
            return
    listed = ", ".join(h for h in hosts if h.strip()) or "none"
    raise GraderError(
        param,
        f"http reward function URL host '{host}:{port}' is not on this server's allowlist "
        f"(ALIGND_REWARD_HTTP_ALLOWED_HOSTS; allowed: {listed}). Ask the operator to add it.",
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead off the allowlist: it is an error, never followed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _evaluate_http(
    function: dict[str, Any], samples: list[_Sample], env: _Env, param: str
) -> list[float]:
    url = function["url"]
    _allowed_url(url, env.http_allowed_hosts, f"{param}.url")
    timeout = min(function.get("timeout_s", env.http_timeout_s), env.http_timeout_s)
    body = json.dumps(
        {"items": [dict(s.item) for s in samples], "completions": [s.output_text for s in samples]}
    ).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "alignd-grader"},
    )
    who = f"http reward function '{function['name']}' ({url})"
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_HTTP_RESPONSE_BYTES:
                    raise GraderError(
                        f"{param}.url", f"{who} answered more than {MAX_HTTP_RESPONSE_BYTES} bytes."
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace") if exc.fp else ""
        raise GraderError(
            f"{param}.url", f"{who} answered HTTP {exc.code}: {detail}".rstrip(": ")
        ) from None
    except GraderError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError):
            raise GraderError(
                f"{param}.url", f"{who} did not answer within {timeout:g}s."
            ) from None
        raise GraderError(f"{param}.url", f"{who} could not be reached: {reason}.") from None
    try:
        answer = json.loads(b"".join(chunks), parse_constant=_no_constant)
    except ValueError:
        raise GraderError(f"{param}.url", f"{who} did not answer JSON.") from None
    if not isinstance(answer, dict) or "rewards" not in answer:
        raise GraderError(
            f"{param}.url", f'{who} must answer {{"rewards": [one number per sample]}}.'
        )
    return _float_list(answer["rewards"], len(samples), who, f"{param}.url")


def _samples(items: Sequence[Any], completions: Sequence[str], param: str) -> list[_Sample]:
    if len(items) != len(completions):
        raise GraderError(param, f"{len(items)} items but {len(completions)} completions.")
    samples: list[_Sample] = []
    for i, (item, text) in enumerate(zip(items, completions, strict=True)):
        if not isinstance(item, Mapping):
            raise GraderError(param, f"item {i} must be an object (a dataset row).")
        if not isinstance(text, str):
            raise GraderError(param, f"completion {i} must be a string.")
        samples.append(_Sample(item, text))
    return samples


def score(
    functions: list[dict[str, Any]],
    items: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    reward_model: RewardModelFn | None = None,
    http_allowed_hosts: Sequence[str] = (),
    http_timeout_s: float = 10.0,
) -> Scores:
    """Score each completion with every function; ``total`` is the weighted sum.

    ``items[i]`` is the dataset row of sample i, ``completions[i]`` its text.
    ``reward_model(name, items, completions)`` scores with a trained reward model; items
    given to it are prompt-only rows (``{"messages": [...]}`` or ``{"prompt": ...}``).
    Any failure (a missing column, an unreachable endpoint, a bad answer) raises GraderError;
    no reward is ever silently 0, and none is NaN.
    """
    functions = validate_reward_functions(functions)
    samples = _samples(items, completions, "items")
    env = _Env(reward_model, tuple(http_allowed_hosts), float(http_timeout_s))
    total = [0.0] * len(samples)
    per_function: dict[str, list[float]] = {}
    for i, function in enumerate(functions):
        values = _evaluate(function, samples, env, f"reward_functions[{i}]") if samples else []
        per_function[function["name"]] = values
        total = [t + function["weight"] * v for t, v in zip(total, values, strict=True)]
    return Scores(total=total, per_function=per_function)


def uses_reward_model(grader: dict[str, Any]) -> str | None:
    """The param of the first reward_model/score_model node of a normalised grader, or None."""
    for node, where in _walk(grader, "grader"):
        if node.get("type") in ("reward_model", "score_model"):
            return f"{where}.type"
    return None


_ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)


def run_grader(
    grader: dict[str, Any],
    item: dict[str, Any],
    output_text: str,
    *,
    http_allowed_hosts: Sequence[str] = (),
    http_timeout_s: float = 10.0,
    reward_model: RewardModelFn | None = None,
) -> dict[str, Any]:
    """Grade one sample, answering in the shape of OpenAI's ``/fine_tuning/alpha/graders/run``.

    ``sub_rewards`` (and ``metadata.scores``) hold a multi grader's sub-grader rewards.
    ``metadata.errors.sample_parse_error`` is set when a ``sample.output_json`` variable met a
    completion that is not JSON (it rendered empty). Other failures raise GraderError.
    """
    start = time.perf_counter()
    function = normalize_grader(grader, param="grader")
    if item is None:
        item = {}
    if not isinstance(item, dict):
        raise GraderError("item", "'item' must be an object (a dataset row).")
    if not isinstance(output_text, str):
        raise GraderError("model_sample", "'model_sample' must be a string.")
    sample = _Sample(item, output_text)
    env = _Env(reward_model, tuple(http_allowed_hosts), float(http_timeout_s))
    subs: dict[str, list[float]] = {}
    reward = _evaluate(function, [sample], env, "grader", subs)[0]
    sub_rewards = {key: values[0] for key, values in subs.items()}
    errors: dict[str, Any] = {flag: False for flag in _ERROR_FLAGS}
    errors["sample_parse_error"] = sample.sample_parse_error
    errors["model_grader_server_error_details"] = None
    errors["python_grader_runtime_error_details"] = None
    errors["python_grader_server_error_type"] = None
    return {
        "reward": reward,
        "sub_rewards": sub_rewards,
        "metadata": {
            "name": function["name"],
            "type": function["type"],
            "errors": errors,
            "execution_time": time.perf_counter() - start,
            "scores": dict(sub_rewards),
            "token_usage": None,
            "sampled_model_name": None,
        },
        "model_grader_token_usage_per_model": {},
    }
