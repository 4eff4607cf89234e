"""The JSON Schema subset of the ``json_schema`` grader: checking a schema when the grader is
defined, and matching a parsed completion against it.
"""

from __future__ import annotations

import math
from typing import Any

from trainer_core.graders.fields import GraderError

MAX_SCHEMA_DEPTH = 32

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


def check_schema(schema: Any, param: str, depth: int) -> None:
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
                check_schema(sub, f"{where}.{prop}", depth + 1)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise GraderError(where, f"'{where}' must be a list of property names.")
        elif key in ("additionalProperties", "items"):
            check_schema(value, where, depth + 1)
        elif key == "anyOf":
            if not isinstance(value, list) or not value:
                raise GraderError(where, f"'{where}' must be a non-empty list of schemas.")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}[{i}]", depth + 1)
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
