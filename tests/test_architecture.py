"""The import rules of the design page, checked rather than remembered.

- trainer_core imports nothing of api, worker, SQLAlchemy, Celery or FastAPI.
- api imports no torch (nor transformers/peft), directly or through what it imports.
- trainer_core's __init__, specs, seams, formats, graders and outbound import no torch, so the
  API can use them.
- api/__init__.py stays empty, so the worker can import api.models without the routes.
- worker takes nothing from alignd but alignd.processes, which imports nothing of ours (the
  API image ships alignd without worker; the worker must not load the CLI).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets")


def imported_modules(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[path] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path, names in imported_modules(package).items()
        for name in sorted(names)
        if name.split(".")[0] in forbidden
    ]


def test_trainer_core_imports_nothing_of_the_service() -> None:
    assert (
        offenders(
            "trainer_core",
            ("api", "worker", "alignd", "sqlalchemy", "celery", "fastapi", "starlette", "kombu"),
        )
        == []
    )


def test_api_source_imports_no_torch() -> None:
    assert offenders("api", (*HEAVY, "worker", "alignd")) == []


@pytest.mark.parametrize(
    "modules",
    [
        [
            "api.app",
            "api.models",
            "api.jobs",
            "api.files",
            "api.routes.jobs",
            "api.routes.files",
            "api.catalog",
            "api.migration",
        ],
        [
            "trainer_core",
            "trainer_core.specs",
            "trainer_core.seams",
            "trainer_core.formats",
            "trainer_core.graders",
            "trainer_core.outbound",
        ],
    ],
)
def test_light_modules_load_no_torch_at_run_time(modules: list[str]) -> None:
    # In a fresh interpreter: an indirect import (a module of ours that imports torch) counts.
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(sorted(h for h in {HEAVY!r} if h in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_api_init_is_empty() -> None:
    assert (ROOT / "api" / "__init__.py").read_text().strip() == ""


def test_worker_takes_only_the_process_helpers_from_alignd() -> None:
    taken = {
        name
        for names in imported_modules("worker").values()
        for name in names
        if name.split(".")[0] == "alignd"
    }
    assert taken <= {"alignd.processes"}
    helpers = imported_modules("alignd")[ROOT / "alignd" / "processes.py"]
    ours = ("alignd", "api", "worker", "trainer_core")
    assert sorted(name for name in helpers if name.split(".")[0] in ours) == []


def test_methods_do_not_branch_on_method_names() -> None:
    # Each method module reads top to bottom; dispatch lives in runner.py, not in the methods.
    for path in (ROOT / "trainer_core" / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant)
                and c.value in ("supervised", "dpo", "kto", "grpo", "ppo")
                for c in node.comparators
            ):
                raise AssertionError(f"{path.name} compares against a method name")
