"""Reward functions (trainer_core.graders): every type's value on hand-worked examples,
templates, weights, the multi formula language, and the http type against a local server."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_outbound import CASE_IDS, HOST_CASES, rebinding_dns
from trainer_core.graders import (
    GraderError,
    bleu_score,
    definitions,
    fuzzy_ratio,
    gleu_score,
    grader_to_reward_functions,
    reward_model_names,
    rouge_l_score,
    rouge_n_score,
    run_grader,
    running,
    score,
    similarity,
    validate_reward_functions,
)

OUT = "{{sample.output_text}}"


def one(grader: dict[str, Any], output: str, item: dict[str, Any] | None = None) -> float:
    """The reward of one sample under one grader, through ``score``."""
    return score([grader], [item or {}], [output]).total[0]


def error(call: Any, *args: Any, **kwargs: Any) -> GraderError:
    with pytest.raises(GraderError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- string_check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "output", "reference", "expected"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),  # case-sensitive
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),  # substring
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "IT IS PARIS.", "paris", 1.0),  # substring, any case
        ("ilike", "Lyon", "paris", 0.0),
    ],
)
def test_string_check(operation: str, output: str, reference: str, expected: float) -> None:
    grader = {
        "type": "string_check",
        "input": OUT,
        "reference": "{{item.city}}",
        "operation": operation,
    }
    assert one(grader, output, {"city": reference}) == expected


def test_string_check_refuses_an_unknown_operation_naming_the_field() -> None:
    bad = {"type": "string_check", "input": OUT, "reference": "x", "operation": "contains"}
    err = error(validate_reward_functions, [{"type": "length", "target": 1}, bad])
    assert err.param == "reward_functions[1].operation"
    assert "eq, ne, like, ilike" in str(err)


# -- text_similarity ------------------------------------------------------------------------


def test_fuzzy_match_is_the_normalised_indel_ratio() -> None:
    """kitten/sitting: LCS "ittn" = 4, so 2·4/(6+7) = 8/13 (rapidfuzz fuzz.ratio 61.54)."""
    assert fuzzy_ratio("kitten", "sitting") == pytest.approx(8 / 13)
    assert fuzzy_ratio("", "") == 1.0
    assert fuzzy_ratio("abc", "") == 0.0
    grader = {
        "type": "text_similarity",
        "input": OUT,
        "reference": "sitting",
        "evaluation_metric": "fuzzy_match",
    }
    assert one(grader, "kitten") == pytest.approx(8 / 13)


def test_bit_parallel_lcs_equals_dynamic_programming() -> None:
    def lcs(a: str, b: str) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = (
                    table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
                )
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 25)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 25)))
        assert similarity.lcs_length(a, b) == lcs(a, b), (a, b)


def test_bleu_is_sacrebleu_sentence_bleu() -> None:
    """hyp "the cat sat on the mat" / ref "the cat sat on a mat" (6 tokens each, BP 1):
    precisions 5/6, 3/5, 2/4, 1/3, product 1/12, BLEU = (1/12)^(1/4) = 0.53728.
    "the cat" / "the cat sat": orders 1-2 match fully, order 3+ has no hypothesis n-gram
    (effective order 2), BP = exp(1 − 3/2) = 0.60653.
    "a b c d" / "a c b d": 4/4, then 0/3, 0/2, 0/1 smoothed to 1/(2·3), 1/(4·2), 1/(8·1):
    BLEU = (1/384)^(1/4) = 0.22590."""
    assert bleu_score("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(
        (1 / 12) ** 0.25
    )
    assert bleu_score("the cat", "the cat sat") == pytest.approx(math.exp(-0.5))
    assert bleu_score("a b c d", "a c b d") == pytest.approx(384**-0.25)
    assert bleu_score("", "anything") == 0.0
    # 13a tokenization splits punctuation: "mat." is "mat" "." on both sides.
    assert bleu_score("the cat sat on the mat.", "the cat sat on the mat.") == pytest.approx(1.0)


def test_gleu_is_min_of_precision_and_recall_over_1_to_4_grams() -> None:
    """Matches 5+3+2+1 = 11 over max(18, 18) n-grams = 11/18."""
    assert gleu_score("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(11 / 18)


def test_rouge_variants_are_f1() -> None:
    """hyp "the cat sat" / ref "the cat sat on the mat": ROUGE-1 P 3/3, R 3/6, F 2/3.
    ROUGE-2: 2 of 2 and of 5 bigrams, F = 2·1·0.4/1.4 = 4/7. ROUGE-L: LCS 5 of 6 both ways."""
    assert rouge_n_score("the cat sat", "the cat sat on the mat", 1) == pytest.approx(2 / 3)
    assert rouge_n_score("the cat sat", "the cat sat on the mat", 2) == pytest.approx(4 / 7)
    assert rouge_l_score("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(5 / 6)
    # rouge_score's tokenizer: lowercase, punctuation dropped.
    assert rouge_n_score("The CAT!", "the cat", 1) == 1.0
    grader = {
        "type": "text_similarity",
        "input": OUT,
        "reference": "{{item.ref}}",
        "evaluation_metric": "rouge_3",
    }
    # 3-grams: hyp {the cat sat}; ref has 4, one shared: P 1, R 1/4, F 0.4.
    assert one(grader, "the cat sat", {"ref": "the cat sat on the mat"}) == pytest.approx(0.4)


@pytest.mark.parametrize("metric", ["cosine", "meteor"])
def test_unavailable_metrics_are_refused_clearly(metric: str) -> None:
    err = error(
        grader_to_reward_functions,
        {
            "type": "text_similarity",
            "name": "s",
            "input": OUT,
            "reference": "x",
            "evaluation_metric": metric,
        },
    )
    assert err.param == "grader.evaluation_metric"
    assert "not available on this server" in str(err)


# -- templates ------------------------------------------------------------------------------


def test_templates_read_nested_columns_lists_and_the_sample_json() -> None:
    item = {"meta": {"city": "Paris", "codes": [7, 8]}, "n": 3}
    grader = {
        "type": "string_check",
        "input": "{{ item.meta.city }}-{{item.meta.codes.1}}-{{item.n}}-{{sample.output_json.a.b}}",
        "reference": OUT + "|",
        "operation": "eq",
    }
    # Rendered input: "Paris-8-3-x"; reference is the completion plus "|".
    assert run_grader(grader, item, '{"a": {"b": "x"}}')["reward"] == 0.0
    grader["reference"] = "Paris-8-3-x"
    result = run_grader(grader, item, '{"a": {"b": "x"}}')
    assert result["reward"] == 1.0
    assert result["metadata"]["errors"]["sample_parse_error"] is False


def test_a_sample_that_is_not_json_renders_empty_and_is_flagged() -> None:
    grader = {
        "type": "string_check",
        "input": "[{{sample.output_json.answer}}]",
        "reference": "[]",
        "operation": "eq",
    }
    result = run_grader(grader, {}, "not json")
    assert result["reward"] == 1.0
    assert result["metadata"]["errors"]["sample_parse_error"] is True


def test_unknown_template_variables_fail_validation() -> None:
    for template in ("{{sample.output}}", "{{answer}}", "{{item}}", "{{item..x}}"):
        err = error(
            validate_reward_functions,
            [{"type": "string_check", "input": template, "reference": "x", "operation": "eq"}],
        )
        assert err.param == "reward_functions[0].input", template
        assert "{{item.<column>}}" in str(err)


def test_a_missing_dataset_column_fails_clearly_never_a_silent_zero() -> None:
    grader = {
        "type": "string_check",
        "input": OUT,
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    err = error(score, [grader], [{"question": "q"}], ["a"])
    assert err.param == "reward_functions[0].reference"
    assert "{{item.answer}}" in str(err) and "question" in str(err)


# -- weights and names ----------------------------------------------------------------------


def test_weights_combine_and_names_are_filled_unique() -> None:
    """Per sample: eq (weight 2) + like (weight -0.5) + length(target 4, scale 4).
    "abcd": 2·1 − 0.5·1 + 1/(1+0/4) = 2.5; "xbcdef": 2·0 − 0.5·1 + 1/(1+2/4) = 1/6."""
    functions = validate_reward_functions(
        [
            {
                "type": "string_check",
                "input": OUT,
                "reference": "abcd",
                "operation": "eq",
                "weight": 2,
            },
            {
                "type": "string_check",
                "input": OUT,
                "reference": "bcd",
                "operation": "like",
                "weight": -0.5,
            },
            {"type": "length", "target": 4},
        ]
    )
    assert [f["name"] for f in functions] == ["string_check", "string_check_2", "length"]
    assert [f["weight"] for f in functions] == [2.0, -0.5, 1.0]
    scores = score(functions, [{}, {}], ["abcd", "xbcdef"])
    assert scores.total == pytest.approx([2.5, 1 / 6])
    assert scores.per_function["string_check"] == [1.0, 0.0]
    assert scores.per_function["string_check_2"] == [1.0, 1.0]
    assert scores.per_function["length"] == pytest.approx([1.0, 2 / 3])
    # Normalising is idempotent (the worker re-checks what the API stored).
    assert validate_reward_functions(json.loads(json.dumps(functions))) == functions


def test_explicit_names_win_and_duplicates_are_refused() -> None:
    functions = validate_reward_functions(
        [{"type": "length", "target": 1}, {"type": "json_valid", "name": "length"}]
    )
    assert [f["name"] for f in functions] == ["length_2", "length"]
    err = error(
        validate_reward_functions,
        [{"type": "json_valid", "name": "a"}, {"type": "length", "target": 1, "name": "a"}],
    )
    assert err.param == "reward_functions[1].name"
    for bad, param in (
        ([], "reward_functions"),
        ("x", "reward_functions"),
        ([{"type": "json_valid", "weight": "2"}], "reward_functions[0].weight"),
        ([{"type": "json_valid", "weight": float("nan")}], "reward_functions[0].weight"),
        ([{"type": "json_valid", "bogus": 1}], "reward_functions[0].bogus"),
        ([{"type": "nope"}], "reward_functions[0].type"),
        ([{"type": "json_valid", "name": "a/b"}], "reward_functions[0].name"),
    ):
        assert error(validate_reward_functions, bad).param == param, bad


def test_grader_to_reward_functions_gives_one_function_of_weight_one() -> None:
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": OUT,
        "reference": "{{item.a}}",
        "operation": "eq",
    }
    assert grader_to_reward_functions(grader) == [{**grader, "weight": 1.0}]


# -- multi ----------------------------------------------------------------------------------


def multi(formula: str) -> dict[str, Any]:
    return {
        "type": "multi",
        "name": "m",
        "graders": {
            "exact": {
                "type": "string_check",
                "name": "exact",
                "input": OUT,
                "reference": "{{item.a}}",
                "operation": "eq",
            },
            "sim": {
                "type": "text_similarity",
                "name": "sim",
                "input": OUT,
                "reference": "{{item.a}}",
                "evaluation_metric": "fuzzy_match",
            },
        },
        "calculate_output": formula,
    }


def test_multi_calculate_output() -> None:
    """Completion "kitten", reference "sitting": exact 0, sim 8/13.
    0.5·exact + 0.5·sim = 4/13; max(exact, sim) = 8/13; abs(exact − sim)/2 = 4/13;
    min(1, sim·2) = 1; (sim + 1) / exact divides by zero: 0 (documented)."""
    item = {"a": "sitting"}
    assert one(multi("0.5 * exact + 0.5 * sim"), "kitten", item) == pytest.approx(4 / 13)
    assert one(multi("max(exact, sim)"), "kitten", item) == pytest.approx(8 / 13)
    assert one(multi("abs(exact - sim) / 2"), "kitten", item) == pytest.approx(4 / 13)
    assert one(multi("min(1, sim * 2)"), "kitten", item) == 1.0
    assert one(multi("(sim + 1) / exact"), "kitten", item) == 0.0
    result = run_grader(multi("-exact + +sim"), item, "kitten")
    assert result["reward"] == pytest.approx(8 / 13)
    assert result["sub_rewards"] == pytest.approx({"exact": 0.0, "sim": 8 / 13})
    assert result["metadata"]["type"] == "multi"


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os')",
        "__import__(exact)",
        "pow(exact, 2)",
        "eval(exact)",
        "exact.real",
        "exact ** 2",
        "exact if sim else 1",
        "exact > sim",
        "(lambda: 1)()",
        "open('x')",
        "min(*[exact])",
        "max(exact, key=sim)",
        "unknown + 1",
        "'a'",
        "[exact][0]",
        "exact; sim",
        "1e999",
        "",
    ],
)
def test_multi_refuses_anything_but_arithmetic(formula: str) -> None:
    err = error(grader_to_reward_functions, multi(formula))
    assert err.param == "grader.calculate_output"


def test_multi_accepts_the_sdk_single_grader_form_and_checks_sub_graders() -> None:
    single = {
        "type": "multi",
        "name": "m",
        "graders": {
            "type": "string_check",
            "name": "exact",
            "input": OUT,
            "reference": "a",
            "operation": "eq",
        },
        "calculate_output": "exact * 3",
    }
    assert one(single, "a") == 3.0
    bad = multi("exact")
    bad["graders"]["sim"]["evaluation_metric"] = "meteor"
    assert error(grader_to_reward_functions, bad).param == "grader.graders.sim.evaluation_metric"


# -- refused types --------------------------------------------------------------------------


def test_python_grader_is_refused_clearly() -> None:
    err = error(
        grader_to_reward_functions,
        {"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
    )
    assert err.param == "grader.type"
    assert "runs code from the request, which this server never does" in str(err)
    nested = multi("exact")
    nested["graders"]["py"] = {"type": "python", "source": "x"}
    assert error(grader_to_reward_functions, nested).param == "grader.graders.py.type"
    assert "label_model" in str(error(grader_to_reward_functions, {"type": "label_model"}))


# -- ours -----------------------------------------------------------------------------------


def test_regex() -> None:
    fmt = {"type": "regex", "pattern": r"^<think>.*?</think>\s*<answer>\d+</answer>$", "flags": "s"}
    outputs = [
        "<think>a\nb</think> <answer>42</answer>",
        "<answer>42</answer>",
        "<think></think><answer>x</answer>",
    ]
    assert score([fmt], [{}] * 3, outputs).total == [1.0, 0.0, 0.0]
    assert one({"type": "regex", "pattern": "abc", "flags": "i"}, "xABCx") == 1.0
    assert one({"type": "regex", "pattern": "abc", "mode": "fullmatch"}, "xabcx") == 0.0
    assert one({"type": "regex", "pattern": "abc", "mode": "fullmatch"}, "abc") == 1.0
    # Input is a template like any other.
    assert (
        one({"type": "regex", "pattern": "^Q: 7$", "input": "Q: {{item.q}}"}, "", {"q": 7}) == 1.0
    )
    assert (
        error(validate_reward_functions, [{"type": "regex", "pattern": "("}]).param
        == "reward_functions[0].pattern"
    )
    assert (
        error(validate_reward_functions, [{"type": "regex", "pattern": "a" * 1001}]).param
        == "reward_functions[0].pattern"
    )
    assert (
        error(validate_reward_functions, [{"type": "regex", "pattern": "a", "flags": "x"}]).param
        == "reward_functions[0].flags"
    )


def test_a_backtracking_regex_fails_the_step_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Patched where it is read: the package does not re-export its limits.
    monkeypatch.setattr(running, "REGEX_TIMEOUT_S", 0.5)
    start = time.monotonic()
    err = error(score, [{"type": "regex", "pattern": r"^(a+)+$"}], [{}], ["a" * 64 + "b"])
    assert time.monotonic() - start < 5
    assert "catastrophic backtracking" in str(err)
    assert err.param == "reward_functions[0].pattern"


def test_json_valid_and_json_schema() -> None:
    assert score(
        [{"type": "json_valid"}], [{}] * 4, ['{"a": 1}', " [1, 2] ", "{a: 1}", "NaN"]
    ).total == [1.0, 1.0, 0.0, 0.0]
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            "kind": {"const": "person"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
        "title": "ignored annotation",
    }
    grader = {"type": "json_schema", "schema": schema}
    cases = {
        '{"name": "Ann", "age": 30, "tags": ["a"], "kind": "person"}': 1.0,
        '{"name": "Ann", "age": 30.0}': 1.0,  # 30.0 is an integer in JSON Schema
        '{"name": "Ann"}': 0.0,  # required
        '{"name": "", "age": 3}': 0.0,  # minLength
        '{"name": "Ann", "age": -1}': 0.0,  # minimum
        '{"name": "Ann", "age": true}': 0.0,  # a boolean is not an integer
        '{"name": "Ann", "age": 3, "tags": ["c"]}': 0.0,  # enum
        '{"name": "Ann", "age": 3, "tags": ["a", "a", "b"]}': 0.0,  # maxItems
        '{"name": "Ann", "age": 3, "x": 1}': 0.0,  # additionalProperties
        '{"name": "Ann", "age": 3, "kind": "cat"}': 0.0,  # const
        "[]": 0.0,
        "not json": 0.0,
    }
    for text, expected in cases.items():
        assert one(grader, text) == expected, text
    err = error(
        validate_reward_functions,
        [{"type": "json_schema", "schema": {"type": "string", "pattern": "a+"}}],
    )
    assert err.param == "reward_functions[0].schema.pattern"
    assert "not supported" in str(err)
    err = error(
        validate_reward_functions,
        [{"type": "json_schema", "schema": {"properties": {"a": {"type": "int"}}}}],
    )
    assert err.param == "reward_functions[0].schema.properties.a.type"


def test_length_is_dense_and_decreasing() -> None:
    """reward = 1 / (1 + max(0, |len − target| − tolerance) / scale), scale = target by default.
    target 10: len 7 → 1/(1+0.3) = 10/13; len 10 → 1; len 30 → 1/3.
    tolerance 2: len 7 → 1/(1+0.1) = 10/11. words, target 2: "a b c" → 1/(1+1/2) = 2/3."""
    assert one({"type": "length", "target": 10}, "x" * 7) == pytest.approx(10 / 13)
    assert one({"type": "length", "target": 10}, "x" * 10) == 1.0
    assert one({"type": "length", "target": 10}, "x" * 30) == pytest.approx(1 / 3)
    assert one({"type": "length", "target": 10, "tolerance": 2}, "x" * 7) == pytest.approx(10 / 11)
    assert one({"type": "length", "target": 2, "unit": "words"}, "a b c") == pytest.approx(2 / 3)
    assert one({"type": "length", "target": 0}, "xx") == pytest.approx(1 / 3)  # scale max(0, 1) = 1
    values = [one({"type": "length", "target": 20}, "x" * n) for n in range(20, 200, 10)]
    assert all(a > b > 0 for a, b in itertools.pairwise(values))
    assert (
        error(validate_reward_functions, [{"type": "length", "target": 1.5}]).param
        == "reward_functions[0].target"
    )
    assert (
        error(validate_reward_functions, [{"type": "length"}]).param == "reward_functions[0].target"
    )


def test_answer_match() -> None:
    last = {"type": "answer_match", "extract": "last_number", "reference": "{{item.answer}}"}
    assert one(last, "3 apples + 4 = 7 apples", {"answer": 7}) == 1.0
    assert one(last, "so the total is $1,000.", {"answer": "1000.0"}) == 1.0  # numerically
    assert one(last, "the range is 3-5", {"answer": "5"}) == 1.0  # "-" after a digit: not a sign
    assert one(last, "x = -5", {"answer": "-5"}) == 1.0
    assert one(last, "7 then 8", {"answer": 7}) == 0.0  # the last number counts
    assert one(last, "no number", {"answer": 7}) == 0.0
    boxed = {"type": "answer_match", "extract": "boxed", "reference": "{{item.answer}}"}
    assert one(boxed, r"so \boxed{\frac{1}{2}} done", {"answer": r"\frac{1}{2}"}) == 1.0
    assert one(boxed, r"\boxed{1} no, \boxed{ 2 }", {"answer": "2"}) == 1.0
    assert one(boxed, r"\boxed{2", {"answer": "2"}) == 0.0  # unbalanced
    gsm8k = {**last, "reference_extract": "last_number"}
    assert one(gsm8k, "It is 72.", {"answer": "48 + 24 = 72\n#### 72"}) == 1.0


# -- reward models --------------------------------------------------------------------------


def test_reward_model_and_score_model_delegate_to_the_injected_model() -> None:
    """Fake model: score = len(completion) − 2. score_model maps with range [−1, 1]:
    −1 + 2·σ(s); completion "ab" gives s = 0, so 0.0; "abcd" gives s = 2, −1 + 2σ(2) = 0.76159."""
    calls: list[tuple[str, list[dict[str, Any]], list[str]]] = []

    def model(name: str, items: list[dict[str, Any]], completions: list[str]) -> list[float]:
        calls.append((name, items, completions))
        return [len(c) - 2.0 for c in completions]

    functions = validate_reward_functions(
        [
            {"type": "reward_model", "model": "ft:tiny:local:rm:ftjob-1"},
            {
                "type": "score_model",
                "name": "judge",
                "model": "ft:tiny:local:rm:ftjob-2",
                "input": [{"role": "user", "content": "Q: {{item.q}}"}],
                "range": [-1, 1],
            },
        ]
    )
    assert reward_model_names(functions) == {"ft:tiny:local:rm:ftjob-1", "ft:tiny:local:rm:ftjob-2"}
    scores = score(functions, [{"q": "x", "messages": []}] * 2, ["ab", "abcd"], reward_model=model)
    assert scores.per_function["reward_model"] == [0.0, 2.0]
    assert scores.per_function["judge"] == pytest.approx([0.0, -1 + 2 / (1 + math.exp(-2))])
    assert calls[0] == (
        "ft:tiny:local:rm:ftjob-1",
        [{"q": "x", "messages": []}] * 2,
        ["ab", "abcd"],
    )
    # score_model's input messages become the prompt; the completion is the response.
    assert calls[1][1] == [{"messages": [{"role": "user", "content": "Q: x"}]}] * 2
    assert calls[1][2] == ["ab", "abcd"]

    assert error(score, functions, [{}], ["a"]).param == "reward_functions[0].type"  # no model here
    assert "ft:" in str(
        error(grader_to_reward_functions, {"type": "score_model", "model": "gpt-4o", "input": []})
    )
    for bad in ([1.0], [math.nan, 1.0], "x"):
        err = error(score, functions[:1], [{}, {}], ["a", "b"], reward_model=lambda *a, v=bad: v)
        assert err.param == "reward_functions[0].model", bad


# -- http -----------------------------------------------------------------------------------


class RewardServer:
    """A reward endpoint on 127.0.0.1: /ok answers len(completion) per sample."""

    def __init__(self) -> None:
        seen: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                # The client may give up first (the timeout test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.answer()

            def answer(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append(body)
                rewards = [float(len(c)) for c in body["completions"]]
                if self.path == "/slow":
                    time.sleep(1.5)
                if self.path == "/500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/ok")
                    self.end_headers()
                    return
                answer: Any = {"rewards": rewards}
                if self.path == "/short":
                    answer = {"rewards": rewards[:-1]}
                elif self.path == "/text":
                    answer = {"rewards": ["1"] * len(rewards)}
                elif self.path == "/shape":
                    answer = rewards
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.seen = seen
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def reward_server() -> Iterator[RewardServer]:
    server = RewardServer()
    yield server
    server.stop()


def test_http_reward_on_the_allowlist(reward_server: RewardServer) -> None:
    function = {"type": "http", "url": reward_server.url("/ok"), "weight": 0.5}
    items = [{"q": 1}, {"q": 2}]
    scores = score([function], items, ["abc", "abcdef"], http_allowed_hosts=[reward_server.host])
    assert scores.per_function["http"] == [3.0, 6.0]
    assert scores.total == [1.5, 3.0]
    assert reward_server.seen[-1] == {"items": items, "completions": ["abc", "abcdef"]}
    # An entry without a port allows every port of the host.
    assert score([function], [{}], ["ab"], http_allowed_hosts=["127.0.0.1"]).total == [1.0]


def test_http_reward_off_the_allowlist_is_refused(reward_server: RewardServer) -> None:
    function = {"type": "http", "url": reward_server.url("/ok")}
    before = len(reward_server.seen)
    for hosts in ([], ["localhost"], [f"127.0.0.1:{reward_server.port + 1}"]):
        err = error(score, [function], [{}], ["a"], http_allowed_hosts=hosts)
        assert "not on this server's allowlist" in str(err)
        assert err.param == "reward_functions[0].url"
    assert len(reward_server.seen) == before  # nothing was sent
    err = error(validate_reward_functions, [function], http_allowed_hosts=["example.com"])
    assert err.param == "reward_functions[0].url"
    for url in (
        "ftp://127.0.0.1/x",
        "http://user:pw@127.0.0.1/x",
        "/relative",
        "http://127.0.0.1:99999/",
    ):
        assert (
            error(validate_reward_functions, [{"type": "http", "url": url}]).param
            == "reward_functions[0].url"
        )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/500", "answered HTTP 500: boom"),
        ("/short", "must give one reward per sample (2); it gave 1 values"),
        ("/text", "rewards must be finite numbers"),
        ("/shape", '{"rewards": [one number per sample]}'),
        ("/redirect", "answered HTTP 302"),
        ("/slow", "did not answer within 0.5s"),
    ],
)
def test_a_failing_endpoint_fails_the_step_clearly(
    reward_server: RewardServer, path: str, message: str
) -> None:
    function = {"type": "http", "url": reward_server.url(path), "timeout_s": 0.5}
    err = error(score, [function], [{}, {}], ["a", "b"], http_allowed_hosts=[reward_server.host])
    assert message in str(err)
    assert err.param == "reward_functions[0].url"


def test_an_oversized_answer_fails_clearly(
    reward_server: RewardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running, "MAX_HTTP_RESPONSE_BYTES", 8)  # {"rewards": [1.0]} is 17
    function = {"type": "http", "url": reward_server.url("/ok")}
    err = error(score, [function], [{}], ["a"], http_allowed_hosts=[reward_server.host])
    assert "answered more than 8 bytes" in str(err)


def test_an_unreachable_endpoint_fails_clearly() -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    function = {"type": "http", "url": f"http://127.0.0.1:{port}/ok"}
    err = error(score, [function], [{}], ["a"], http_allowed_hosts=[f"127.0.0.1:{port}"])
    assert "could not be reached" in str(err)


@pytest.mark.parametrize(
    ("case", "url", "entries", "webhooks", "rewards"), HOST_CASES, ids=CASE_IDS
)
def test_http_reward_hosts_follow_the_outbound_policy(
    case: str, url: str, entries: str, webhooks: bool, rewards: bool
) -> None:
    """The shared table (tests/test_outbound.py): reward functions reach listed hosts only,
    by name, host:port or CIDR, never another public host."""
    function = {"type": "http", "url": url}
    hosts = [entry for entry in entries.split(",") if entry]
    if rewards:
        assert validate_reward_functions([function], http_allowed_hosts=hosts)[0]["url"] == url
    else:
        err = error(validate_reward_functions, [function], http_allowed_hosts=hosts)
        assert err.param == "reward_functions[0].url"
        assert "ALIGND_REWARD_HTTP_ALLOWED_HOSTS" in str(err)


def test_an_http_reward_goes_to_the_address_that_was_checked(
    reward_server: RewardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name resolves into the listed network for the check, then (were it looked up again)
    # to a documentation address nothing answers on.
    given = rebinding_dns(monkeypatch, "rewards.rebind.test", ["127.0.0.1", "192.0.2.1"])
    url = f"http://rewards.rebind.test:{reward_server.port}/ok"
    function = {"type": "http", "url": url, "timeout_s": 2}
    assert score([function], [{}], ["abc"], http_allowed_hosts=["127.0.0.0/8"]).total == [3.0]
    assert given == ["127.0.0.1"]


def test_an_http_reward_ignores_proxies_from_the_environment(
    reward_server: RewardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would make its own lookup of the host, after ours: nothing listens on port 9.
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    function = {"type": "http", "url": reward_server.url("/ok")}
    assert score([function], [{}], ["ab"], http_allowed_hosts=[reward_server.host]).total == [2.0]


def test_a_malformed_allowlist_entry_is_an_error_naming_the_setting() -> None:
    function = {"type": "http", "url": "http://rewards.internal:8080/x"}
    err = error(validate_reward_functions, [function], http_allowed_hosts=["rewards.internal:x"])
    assert "ALIGND_REWARD_HTTP_ALLOWED_HOSTS has a malformed entry" in str(err)


# -- robustness -----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(
    [
        "input",
        "reference",
        "operation",
        "evaluation_metric",
        "graders",
        "calculate_output",
        "model",
        "range",
        "pattern",
        "flags",
        "mode",
        "schema",
        "target",
        "unit",
        "tolerance",
        "scale",
        "extract",
        "reference_extract",
        "url",
        "timeout_s",
        "weight",
        "name",
        "source",
    ]
)
_grader = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*definitions.NORMALISERS, "nope"]) | _json,
    st.dictionaries(_fields, _json | st.just(OUT) | st.just("{{item.a}}"), max_size=6),
)


@settings(max_examples=300, deadline=None, database=None)
@given(raw=st.lists(_grader, min_size=1, max_size=3) | _json)
def test_any_json_is_either_normalised_or_a_grader_error(raw: Any) -> None:
    """Whatever a request holds, validation answers a list or a GraderError naming a field
    (never another exception, which the API would turn into a 500)."""
    try:
        functions = validate_reward_functions(raw)
    except GraderError as exc:
        assert exc.param.startswith("reward_functions")
        return
    assert validate_reward_functions(functions) == functions
    json.dumps(functions, allow_nan=False)
