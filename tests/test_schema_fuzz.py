"""Schemathesis over our own OpenAPI schema: for a bounded number of generated requests per
operation, the API never answers 5xx, every error is in OpenAI's error shape, and every answer
matches what the schema declares for it (status, media type, and the JSON's shape).

(schemathesis' pytest loader does not run under pytest 9, so each operation's Hypothesis
strategy is driven here directly; the checks are ours.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Api

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 12


def check(case: Any, api: Api) -> None:
    response = case.call(
        base_url=api.url, headers={"Authorization": api.http.headers["Authorization"]}
    )
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (where, response.text[:500])
    assert "x-request-id" in response.headers, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, (where, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (where, body)
    # The declared response models and media types are what the API really sends.
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )


def test_no_server_errors_and_errors_in_shape(pg_api: Api) -> None:
    schema = schemathesis.openapi.from_url(f"{pg_api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # files, jobs, models, health, planning, ...
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            check(case, pg_api)

        run()
