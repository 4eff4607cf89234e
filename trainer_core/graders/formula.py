"""``multi``'s ``calculate_output``: a tiny arithmetic language, parsed by ast and never
eval'ed.

Numbers, the sub-graders' names, ``+ - * /``, parentheses and ``min``, ``max``, ``abs``;
``x / 0`` is 0 (documented in docs/methods.md).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

from trainer_core.graders.fields import GraderError

MAX_FORMULA_CHARS = 1_000
MAX_FORMULA_NODES = 500

_FORMULA_FUNCS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def parse_formula(text: Any, names: set[str], param: str) -> ast.expr:
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


def eval_formula(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # checked by parse_formula
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        operand = eval_formula(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left = eval_formula(node.left, values)
        right = eval_formula(node.right, values)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right if right != 0 else 0.0  # documented: x / 0 is 0
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [eval_formula(arg, values) for arg in node.args]
        return float(_FORMULA_FUNCS[node.func.id](*args))
    raise AssertionError(f"unchecked formula node {type(node).__name__}")
