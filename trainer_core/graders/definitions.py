"""Each grader type's definition: its fields, checked, with their defaults filled in.

``normalize_grader`` dispatches on ``type`` to one normaliser per type; the result is
JSON-able and normalising it again gives it back unchanged. Types that would run code from
the request (``python``) or need a hosted judge (``label_model``) are refused here, with the
alternatives in the message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from trainer_core.graders.fields import (
    GraderError,
    check_keys,
    check_keys_plain,
    check_name,
    choice,
    number,
    plain_json,
    required,
)
from trainer_core.graders.formula import parse_formula
from trainer_core.graders.running import REGEX_FLAGS, regex_flags
from trainer_core.graders.schema import check_schema
from trainer_core.graders.similarity import SIMILARITY_METRICS
from trainer_core.graders.templates import check_template

MAX_SUB_GRADERS = 32
MAX_PATTERN_CHARS = 1_000
MAX_SCHEMA_CHARS = 100_000
MAX_URL_CHARS = 2_048

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
_UNAVAILABLE_METRICS = {
    "cosine": "it needs an embedding model, which this server does not host",
    "meteor": "it needs the WordNet synonym database, which this offline server does not have",
}
_STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
_DEFAULT_INPUT = "{{sample.output_text}}"

_Normaliser = Callable[[dict[str, Any], str], dict[str, Any]]


def _string_check(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "string_check", ("input", "reference", "operation"))
    return {
        "input": check_template(required(raw, "input", param), f"{param}.input"),
        "reference": check_template(
            required(raw, "reference", param), f"{param}.reference", required=False
        ),
        "operation": choice(raw, "operation", param, _STRING_OPERATIONS, None),
    }


def _text_similarity(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "text_similarity", ("input", "reference", "evaluation_metric"))
    metric = raw.get("evaluation_metric")
    if isinstance(metric, str) and metric in _UNAVAILABLE_METRICS:
        raise GraderError(
            f"{param}.evaluation_metric",
            f"evaluation_metric '{metric}' is not available on this server: "
            f"{_UNAVAILABLE_METRICS[metric]}. Use one of {', '.join(SIMILARITY_METRICS)}.",
        )
    return {
        "input": check_template(required(raw, "input", param), f"{param}.input", required=False),
        "reference": check_template(
            required(raw, "reference", param), f"{param}.reference", required=False
        ),
        "evaluation_metric": choice(raw, "evaluation_metric", param, SIMILARITY_METRICS, None),
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
    model = required(raw, "model", param)
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
        return check_template(content, param, required=False)
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            where = f"{param}[{i}]"
            if isinstance(part, str):
                texts.append(check_template(part, where, required=False))
            elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
                texts.append(check_template(part.get("text"), f"{where}.text", required=False))
            else:
                raise GraderError(
                    where,
                    f"'{where}' must be text (a string, or an input_text/output_text part); "
                    "a reward model scores text only.",
                )
        return "".join(texts)
    raise GraderError(param, f"'{param}' must be a string or a list of text parts.")


def _score_model(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "score_model", ("model", "input", "range", "sampling_params"))
    model = _reward_model_name(raw, param, "score_model")
    messages: list[dict[str, str]] = []
    raw_input = raw.get("input") or []
    if not isinstance(raw_input, list):
        raise GraderError(f"{param}.input", f"'{param}.input' must be a list of messages.")
    for i, message in enumerate(raw_input):
        where = f"{param}.input[{i}]"
        if not isinstance(message, dict):
            raise GraderError(where, f"'{where}' must be a message object {{role, content}}.")
        check_keys_plain(message, where, ("role", "content", "type"))
        if message.get("type", "message") != "message":
            raise GraderError(f"{where}.type", f"'{where}.type' must be 'message'.")
        role = choice(message, "role", where, ("system", "developer", "user", "assistant"), None)
        content = _content_text(required(message, "content", where), f"{where}.content")
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
        plain_json(sampling, f"{param}.sampling_params")
    out: dict[str, Any] = {"model": model, "input": messages, "range": [low, high]}
    if sampling is not None:
        # Accepted for compatibility and ignored: a reward model does not sample.
        out["sampling_params"] = sampling
    return out


def _reward_model(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "reward_model", ("model",))
    return {"model": _reward_model_name(raw, param, "reward_model")}


def _regex(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "regex", ("pattern", "input", "flags", "mode"))
    pattern = required(raw, "pattern", param)
    where = f"{param}.pattern"
    if not isinstance(pattern, str) or not pattern:
        raise GraderError(where, f"'{where}' must be a non-empty string.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GraderError(where, f"'{where}' is longer than {MAX_PATTERN_CHARS} characters.")
    flags = raw.get("flags", "")
    if not isinstance(flags, str) or any(ch not in REGEX_FLAGS for ch in flags):
        raise GraderError(
            f"{param}.flags", f"'{param}.flags' must be a string of i, m, s (got {flags!r})."
        )
    try:
        re.compile(pattern, regex_flags(flags))
    except (re.error, OverflowError, RecursionError) as exc:
        raise GraderError(where, f"'{where}' is not a valid regular expression: {exc}.") from None
    return {
        "pattern": pattern,
        "flags": "".join(sorted(set(flags))),
        "mode": choice(raw, "mode", param, ("search", "fullmatch"), "search"),
        "input": check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _json_valid(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "json_valid", ("input",))
    return {"input": check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input")}


def _json_schema(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "json_schema", ("input", "schema"))
    schema = required(raw, "schema", param)
    if len(plain_json(schema, f"{param}.schema")) > MAX_SCHEMA_CHARS:
        raise GraderError(
            f"{param}.schema", f"'{param}.schema' is larger than {MAX_SCHEMA_CHARS} characters."
        )
    check_schema(schema, f"{param}.schema", 0)
    return {
        "schema": schema,
        "input": check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _length(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "length", ("target", "unit", "tolerance", "scale", "input"))
    target = number(raw, "target", param, None, low=0, high=10_000_000, integer=True)
    return {
        "target": int(target),
        "unit": choice(raw, "unit", param, ("chars", "words"), "chars"),
        "tolerance": number(raw, "tolerance", param, 0.0, low=0, high=10_000_000),
        "scale": number(raw, "scale", param, max(target, 1.0), low=0, low_open=True, high=1e9),
        "input": check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


_EXTRACTS = ("last_number", "boxed", "none")


def _answer_match(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "answer_match", ("extract", "reference", "reference_extract", "input"))
    return {
        "extract": choice(raw, "extract", param, _EXTRACTS, "last_number"),
        "reference": check_template(required(raw, "reference", param), f"{param}.reference"),
        "reference_extract": choice(raw, "reference_extract", param, _EXTRACTS, "none"),
        "input": check_template(raw.get("input", _DEFAULT_INPUT), f"{param}.input"),
    }


def _http(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "http", ("url", "timeout_s"))
    url = required(raw, "url", param)
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
        out["timeout_s"] = number(raw, "timeout_s", param, None, low=0, low_open=True, high=600)
    return out


def _multi(raw: dict[str, Any], param: str) -> dict[str, Any]:
    check_keys(raw, param, "multi", ("graders", "calculate_output"))
    graders = required(raw, "graders", param)
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
        check_name(key, sub_param)
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(
                f"{sub_param}.type", f"'{sub_param}': a multi grader cannot nest another multi."
            )
        if isinstance(sub, dict) and "name" not in sub:
            sub = {**sub, "name": key}
        subs[key] = normalize_grader(sub, param=sub_param)
    formula = required(raw, "calculate_output", param)
    parse_formula(formula, set(subs), f"{param}.calculate_output")
    return {"graders": subs, "calculate_output": formula}


NORMALISERS: dict[str, _Normaliser] = {
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
    if not isinstance(kind, str) or kind not in NORMALISERS:
        known = ", ".join((*OPENAI_TYPES, *OUR_TYPES))
        raise GraderError(
            f"{param}.type",
            f"Invalid value for '{param}.type': {kind!r}; one of {known}.",
        )
    name = check_name(raw["name"], f"{param}.name") if raw.get("name") is not None else str(kind)
    body = NORMALISERS[str(kind)](
        {k: v for k, v in raw.items() if k != "name" or v is not None}, param
    )
    return {"type": kind, "name": name, **body}
