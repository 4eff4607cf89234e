"""How ``/openapi.json`` describes what the ``/v1`` routes take and answer.

Responses are pydantic models declared on the routes. Request bodies are the subtle part:
the services validate them themselves, so that every mistake comes back in OpenAI's error
shape with the ``param`` path the user wrote (``method.dpo.hyperparameters.beta``) and the
checks run in their documented order. So a JSON body is declared ``Any`` to FastAPI, and
``documented_as`` attaches the pydantic model that describes it: the schema shows the model,
the value reaches the service as sent. Streamed and binary answers are described by
``streamed`` (their media type and what the bytes are).

Every error a ``/v1`` route gives is ``{"error": {message, type, param, code}}``
(``api.errors``); ``ERROR_RESPONSES`` says so for the whole range, which also keeps FastAPI
from advertising its own 422 ``{"detail": ...}`` shape, which we never send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidatorFunctionWrapHandler, WrapValidator

from api.errors import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorResponse,
        "description": (
            "A client error (400 invalid request or state, 401, 404, 413, 429), in OpenAI's "
            "error shape; 'param' names the field at fault as the request wrote it."
        ),
    },
    "5XX": {
        "model": ErrorResponse,
        "description": "A server error (500 internal_error, 503 queue_unavailable).",
    },
}


def _as_is(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return handler(value)


def documented_as(model: type[BaseModel]) -> WrapValidator:
    """``Annotated`` metadata: validate as the annotated type, describe the JSON as ``model``.

    ``Annotated[Any, Body(), documented_as(JobCreate)]`` passes the body through untouched
    and shows ``JobCreate`` as the request body; ``Annotated[dict[str, Any],
    documented_as(JobMethodRequest)]`` checks only that the value is an object (the service
    checks the rest) and shows the full method block.
    """
    return WrapValidator(_as_is, json_schema_input_type=model)


def streamed(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """The 200 answer of a route that streams (SSE, text) or sends bytes (files, adapters).

    On a route with a ``response_model`` (a page of events that ``?stream=true`` turns into
    its SSE stream) FastAPI merges these types beside the model's JSON.
    """
    content = {media: {"schema": {"type": "string"}} for media in media_types}
    return {200: {"description": description, "content": content}}


BEARER = {"type": "http", "scheme": "bearer", "description": "An alignd API key: sk-alignd-..."}


def declare_bearer_auth(app: FastAPI) -> None:
    """Every ``/v1`` operation takes an API key as a bearer token (``api.keys.AuthMiddleware``
    checks it): say so in ``/openapi.json``. Declared on the document, not by a FastAPI
    security dependency, which would parse the header again on every request (about 3% of a
    read's CPU) after the middleware has."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI keeps it in app.openapi_schema: changed in place
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["HTTPBearer"] = BEARER
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"HTTPBearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
