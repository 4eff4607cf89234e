"""Lists of reward functions: a GRPO/RLOO block's ``reward_functions`` or reinforcement's
single ``grader``, normalised with their names and weights, and what they reach (the reward
models they name, the http hosts they call).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from trainer_core.graders.definitions import normalize_grader
from trainer_core.graders.fields import GraderError, number
from trainer_core.graders.running import allowed_url

MAX_FUNCTIONS = 32


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
        weight = number(entry, "weight", where, 1.0, low=-1e6, high=1e6)
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
            allowed_url(node["url"], hosts, f"{where}.url")


def uses_reward_model(grader: dict[str, Any]) -> str | None:
    """The param of the first reward_model/score_model node of a normalised grader, or None."""
    for node, where in _walk(grader, "grader"):
        if node.get("type") in ("reward_model", "score_model"):
            return f"{where}.type"
    return None
