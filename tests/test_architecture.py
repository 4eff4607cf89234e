"""The import rules of the design page, checked rather than remembered.

- trainer_core imports nothing of api, worker, SQLAlchemy, Celery or FastAPI.
- api imports no torch (nor transformers/peft), directly or through what it imports.
- trainer_core's __init__, specs, seams, formats, graders and outbound import no torch, so the
  API can use them.
- api/__init__.py stays empty, so the worker can import api.models without the routes.
- a method module branches on no method's name and imports no other method module.
- worker takes nothing from alignd but alignd.processes, which imports nothing of ours (the
  API image ships alignd without worker; the worker must not load the CLI).
- the method registry is the one list of methods: each row names a module that trains it.
- every /v1 route declares what it answers (a response model, or a documented stream or
  file), and /openapi.json describes the objects with their fields' descriptions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

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
            "api.job_service",
            "api.job_rendering",
            "api.job_events",
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


# -- method modules: no branch on a method's name, no import of another method ----------------
METHODS_DIR = ROOT / "trainer_core" / "methods"
METHODS_PACKAGE = "trainer_core.methods"


def method_names() -> frozenset[str]:
    """Every method type the registry knows (trainer_core/registry.py)."""
    from trainer_core.registry import METHODS

    return frozenset(METHODS)


def method_modules() -> list[Path]:
    # The package's __init__ is not a method: it may gather them.
    return sorted(p for p in METHODS_DIR.glob("*.py") if p.name != "__init__.py")


def _names_in(node: ast.expr, names: frozenset[str]) -> list[str]:
    """The method names ``node`` is, or holds as a literal tuple, list or set."""
    elements = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [
        e.value
        for e in elements
        if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in names
    ]


def method_name_branches(tree: ast.AST, names: frozenset[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with a method name (==, !=, is, in and not in a
    literal collection, either side) and every ``match`` case whose pattern names one."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, name) for name in _names_in(operand, names)]
        elif isinstance(node, ast.match_case):
            for pattern in ast.walk(node.pattern):
                if isinstance(pattern, ast.MatchValue):
                    found += [(pattern.lineno, n) for n in _names_in(pattern.value, names)]
    return found


def method_imports(tree: ast.AST, package: str, modules: frozenset[str]) -> list[tuple[int, str]]:
    """(line, module) of every import of one of ``modules`` (names of the method modules),
    absolute or relative (``package`` is the importing file's), at the top or in a function."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            # `from trainer_core.methods import grpo` imports a module, `from ... grpo import x`
            # a name of one.
            targets = [source, *(f"{source}.{alias.name}" for alias in node.names)]
        for target in targets:
            parts = target.split(".")
            if parts[:2] == METHODS_PACKAGE.split(".") and len(parts) > 2 and parts[2] in modules:
                found.append((node.lineno, f"{METHODS_PACKAGE}.{parts[2]}"))
    return sorted(set(found))


def test_methods_do_not_branch_on_method_names() -> None:
    # Each method module reads top to bottom; dispatch lives in the registry and the runner.
    names = method_names()
    offences = [
        f"{path.relative_to(ROOT)}:{line} branches on {name!r}"
        for path in method_modules()
        for line, name in method_name_branches(ast.parse(path.read_text()), names)
    ]
    assert offences == [], "\n".join(offences)


def test_methods_do_not_import_each_other() -> None:
    # What two methods share is a building block of trainer_core, not one method's module.
    modules = frozenset(path.stem for path in method_modules())
    offences = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in method_modules()
        for line, module in method_imports(ast.parse(path.read_text()), METHODS_PACKAGE, modules)
        if module != f"{METHODS_PACKAGE}.{path.stem}"
    ]
    assert offences == [], "\n".join(offences)


# The detectors on snippets, so that a blind one cannot pass the two tests above.
BRANCHES = {
    "equal": 'if spec.method == "dpo":\n    pass',
    "equal, name first": 'if "kto" == spec.method:\n    pass',
    "not equal": 'ok = spec.method != "ppo"',
    "is": 'ok = spec.method is "simpo"',
    "in a tuple": 'if spec.method in ("grpo", "other"):\n    pass',
    "in a list": 'ok = method in ["rloo"]',
    "in a set": 'ok = method in {"orpo"}',
    "not in": 'ok = method not in ("reward_model",)',
    "inside a function": 'def f(m):\n    return m == "reinforcement"',
    "match case": 'match spec.method:\n    case "supervised":\n        pass',
    "match or-case": 'match m:\n    case "x" | "dpo":\n        pass',
    "match nested": 'match m:\n    case ("kto", _):\n        pass',
}


@pytest.mark.parametrize("snippet", BRANCHES.values(), ids=list(BRANCHES))
def test_branch_detector_flags(snippet: str) -> None:
    assert method_name_branches(ast.parse(snippet), method_names())


@pytest.mark.parametrize("name", sorted(method_names()))
def test_branch_detector_knows_every_method(name: str) -> None:
    assert method_name_branches(ast.parse(f"ok = m == {name!r}"), method_names()) == [(1, name)]


def test_branch_detector_passes_other_strings() -> None:
    snippet = (
        'if loss_type == "sigmoid" or kind in ("sft", "dpo_like"):\n    pass\n'
        'match x:\n    case "hinge":\n        pass\n'
        'table = {"dpo": 1}\n'
        'cpu_only(resources, "grpo", sink)'
    )
    assert method_name_branches(ast.parse(snippet), method_names()) == []


METHOD_IMPORTS = {
    "from module": "from trainer_core.methods.grpo import RewardScorer",
    "from package": "from trainer_core.methods import grpo",
    "import": "import trainer_core.methods.grpo",
    "import as": "import trainer_core.methods.grpo as g",
    "relative module": "from .grpo import RewardScorer",
    "relative package": "from . import grpo",
    "relative from the parent": "from ..methods.grpo import RewardScorer",
    "inside a function": "def f():\n    from trainer_core.methods.grpo import x",
}


@pytest.mark.parametrize("snippet", METHOD_IMPORTS.values(), ids=list(METHOD_IMPORTS))
def test_method_import_detector_flags(snippet: str) -> None:
    found = method_imports(ast.parse(snippet), METHODS_PACKAGE, frozenset({"grpo", "dpo"}))
    assert [module for _, module in found] == ["trainer_core.methods.grpo"]


def test_method_import_detector_passes_building_blocks() -> None:
    snippet = (
        "from trainer_core.specs import TrainSpec\n"
        "from trainer_core import distributed\n"
        "from ..rl_losses import grpo_loss\n"
        "from . import helpers\n"
        "import trainer_core.methods\n"
    )
    assert method_imports(ast.parse(snippet), METHODS_PACKAGE, frozenset({"grpo"})) == []


def test_method_registry_rows_name_their_modules() -> None:
    # A method is one module and one registry row (trainer_core/registry.py): the row's
    # module exists and defines train, and resolving a request can fill every resolved field.
    from trainer_core.registry import METHODS

    for name, method in METHODS.items():
        path = ROOT / "trainer_core" / "methods" / f"{method.module}.py"
        assert path.is_file(), f"{name}: no module {path}"
        functions = {
            node.name
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef)
        }
        assert "train" in functions, f"{name}: {path.name} defines no train()"
        fillable = {*method.request.model_fields, *method.request.DEFAULTS, "learning_rate"}
        assert set(method.resolved.model_fields) <= fillable, name
        assert all(rate > 0 for rate in method.base_learning_rate), name


@pytest.fixture(scope="module")
def app_and_schema(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict[str, Any]]:
    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi")))
    return app, app.openapi()


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI keeps an included router whole, behind a wrapper, rather than copying its
        # routes into the app's list.
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes)


def v1_operations(app: Any) -> list[tuple[APIRoute, str]]:
    return [
        (route, method.lower())
        for route in api_routes(app.routes)
        if route.path.startswith("/v1")
        for method in sorted(route.methods)
    ]


def test_every_v1_route_declares_its_response(app_and_schema: tuple[Any, dict[str, Any]]) -> None:
    app, schema = app_and_schema
    operations = v1_operations(app)
    assert len(operations) >= 40
    undeclared = []
    for route, method in operations:
        responses = schema["paths"][route.path_format][method]["responses"]
        content = responses["200"].get("content", {})
        # A model, or a stream/file whose media type is documented (SSE, text, tar, bytes).
        streamed = [media for media in content if media != "application/json"]
        if route.response_model is None and not streamed:
            undeclared.append(f"{method.upper()} {route.path}")
        if route.response_model is not None:
            assert "$ref" in str(content["application/json"]["schema"]), route.path
        # Errors are documented in OpenAI's shape, never FastAPI's 422 {"detail": ...}.
        assert "422" not in responses, route.path
        assert responses["4XX"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }, route.path
        # A JSON body is described by its model, not as "any value".
        body = schema["paths"][route.path_format][method].get("requestBody", {}).get("content", {})
        for media, spec in body.items():
            assert spec["schema"].get("$ref", "").startswith("#/components/schemas/"), (
                route.path,
                media,
            )
    assert undeclared == []
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize(
    ("name", "item"),
    [
        ("FineTuningJob", None),
        ("FineTuningJobEvent", None),
        ("FineTuningJobCheckpoint", None),
        ("FileObject", None),
        ("JobCreate", None),
        ("FineTuningJobList", "FineTuningJob"),
        ("FineTuningJobEventList", "FineTuningJobEvent"),
        ("FineTuningJobCheckpointList", "FineTuningJobCheckpoint"),
        ("FileList", "FileObject"),
    ],
)
def test_openapi_describes_the_objects_field_by_field(
    app_and_schema: tuple[Any, dict[str, Any]], name: str, item: str | None
) -> None:
    schemas = app_and_schema[1]["components"]["schemas"]
    properties = schemas[name]["properties"]
    assert properties
    undescribed = [field for field, spec in properties.items() if not spec.get("description")]
    assert undescribed == [], f"{name} fields without a description: {undescribed}"
    if item is not None:  # a list page: OpenAI's envelope around the item's own schema
        assert properties["object"]["const"] == "list"
        assert properties["data"]["items"] == {"$ref": f"#/components/schemas/{item}"}
        assert {"has_more", "first_id", "last_id"} <= set(properties)


def test_openapi_declares_the_api_key_on_every_v1_operation(
    app_and_schema: tuple[Any, dict[str, Any]],
) -> None:
    schema = app_and_schema[1]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    declared = {
        (path, method): operation.get("security")
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }
    v1 = {key: value for key, value in declared.items() if key[0].startswith("/v1/")}
    assert len(v1) > 40 and all(value == [{"HTTPBearer": []}] for value in v1.values())
    assert declared[("/healthz", "get")] is None  # open, as /readyz and /metrics


def test_job_schema_names_every_method_block(app_and_schema: tuple[Any, dict[str, Any]]) -> None:
    # The method block, request and response, comes from the registry: every method is there
    # with its own hyperparameters.
    from trainer_core.registry import METHODS

    schemas = app_and_schema[1]["components"]["schemas"]
    for wrapper, suffix in (("FineTuningJobMethod", ""), ("JobMethodRequest", "Request")):
        properties = schemas[wrapper]["properties"]
        assert set(properties) == {"type", *METHODS}
        assert properties["type"]["enum"] == list(METHODS)
        for name, method in METHODS.items():
            block = str(properties[name])
            hyperparameters = (method.request if suffix else method.resolved).__name__
            block_name = block.split("#/components/schemas/")[1].split("'")[0]
            assert hyperparameters in str(schemas[block_name]["properties"]["hyperparameters"])
