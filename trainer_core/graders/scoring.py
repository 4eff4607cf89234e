"""Scoring: ``score`` (a batch of completions, every function, the weighted total) and
``run_grader`` (one sample, answered in the shape of OpenAI's ``graders/run``).

Each grader type's evaluation is here or, when it runs outside the interpreter, in
``running``; no reward is ever silently 0, and none is NaN.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer_core.graders.answers import answers_equal, extract
from trainer_core.graders.definitions import normalize_grader
from trainer_core.graders.fields import GraderError
from trainer_core.graders.formula import eval_formula, parse_formula
from trainer_core.graders.running import (
    Env,
    RewardModelFn,
    evaluate_http,
    evaluate_reward_model,
    regex_match_all,
)
from trainer_core.graders.schema import schema_matches
from trainer_core.graders.similarity import text_similarity
from trainer_core.graders.templates import Sample, no_constant, render
from trainer_core.graders.validation import validate_reward_functions


@dataclass
class Scores:
    total: list[float]  # weighted sum per sample
    per_function: dict[str, list[float]]  # each function's own reward per sample, by name


def _evaluate(
    function: dict[str, Any],
    samples: list[Sample],
    env: Env,
    param: str,
    subs_out: dict[str, list[float]] | None = None,
) -> list[float]:
    kind = function["type"]
    if kind == "multi":
        return _evaluate_multi(function, samples, env, param, subs_out)
    if kind in ("reward_model", "score_model"):
        values = evaluate_reward_model(function, samples, env, param)
    elif kind == "http":
        values = evaluate_http(function, samples, env, param)
    elif kind == "regex":
        texts = [render(function["input"], s, f"{param}.input") for s in samples]
        matched = regex_match_all(function, texts, param)
        values = [1.0 if m else 0.0 for m in matched]
    else:
        values = [_evaluate_one(function, s, param) for s in samples]
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise GraderError(
                param, f"reward function '{function['name']}' gave {value} for sample {i}."
            )
    return values


def _evaluate_one(function: dict[str, Any], sample: Sample, param: str) -> float:
    kind = function["type"]
    text = render(function["input"], sample, f"{param}.input")
    if kind == "string_check":
        ref = render(function["reference"], sample, f"{param}.reference")
        op = function["operation"]
        if op == "eq":
            return float(text == ref)
        if op == "ne":
            return float(text != ref)
        if op == "like":
            return float(ref in text)
        return float(ref.casefold() in text.casefold())
    if kind == "text_similarity":
        ref = render(function["reference"], sample, f"{param}.reference")
        return text_similarity(function["evaluation_metric"], text, ref, param)
    if kind == "json_valid":
        try:
            json.loads(text, parse_constant=no_constant)
        except ValueError:
            return 0.0
        return 1.0
    if kind == "json_schema":
        try:
            value = json.loads(text, parse_constant=no_constant)
        except ValueError:
            return 0.0
        return float(schema_matches(value, function["schema"]))
    if kind == "length":
        size = len(text) if function["unit"] == "chars" else len(text.split())
        off = max(0.0, abs(size - function["target"]) - function["tolerance"])
        return 1.0 / (1.0 + off / function["scale"])
    if kind == "answer_match":
        answer = extract(text, function["extract"])
        ref_text = render(function["reference"], sample, f"{param}.reference")
        reference = extract(ref_text, function["reference_extract"])
        if answer is None or reference is None:
            return 0.0
        return float(answers_equal(answer, reference))
    raise AssertionError(f"no evaluator for {kind}")


def _evaluate_multi(
    function: dict[str, Any],
    samples: list[Sample],
    env: Env,
    param: str,
    subs_out: dict[str, list[float]] | None,
) -> list[float]:
    formula = parse_formula(
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
        value = eval_formula(formula, {key: values[i] for key, values in sub_values.items()})
        if not math.isfinite(value):
            raise GraderError(
                f"{param}.calculate_output",
                f"'{param}.calculate_output' gave {value} for sample {i} (overflow).",
            )
        out.append(value)
    return out


def _samples(items: Sequence[Any], completions: Sequence[str], param: str) -> list[Sample]:
    if len(items) != len(completions):
        raise GraderError(param, f"{len(items)} items but {len(completions)} completions.")
    samples: list[Sample] = []
    for i, (item, text) in enumerate(zip(items, completions, strict=True)):
        if not isinstance(item, Mapping):
            raise GraderError(param, f"item {i} must be an object (a dataset row).")
        if not isinstance(text, str):
            raise GraderError(param, f"completion {i} must be a string.")
        samples.append(Sample(item, text))
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
    env = Env(reward_model, tuple(http_allowed_hosts), float(http_timeout_s))
    total = [0.0] * len(samples)
    per_function: dict[str, list[float]] = {}
    for i, function in enumerate(functions):
        values = _evaluate(function, samples, env, f"reward_functions[{i}]") if samples else []
        per_function[function["name"]] = values
        total = [t + function["weight"] * v for t, v in zip(total, values, strict=True)]
    return Scores(total=total, per_function=per_function)


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
    sample = Sample(item, output_text)
    env = Env(reward_model, tuple(http_allowed_hosts), float(http_timeout_s))
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
