"""Errors in OpenAI's shape, ``{"error": {message, type, param, code}}``, from one place.

Services raise ``APIError`` with the HTTP status it means; the handlers here render it, and
turn FastAPI's and Starlette's own errors (validation, 404, 405) into the same shape, because
the openai SDK reads ``body["error"]`` and shows a bare "Error code: 422" otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.artifacts import ArtifactStoreError

log = logging.getLogger("alignd.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorObject(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(
        description=(
            "invalid_request_error, authentication_error, permission_error, rate_limit_error "
            "or server_error."
        )
    )
    param: str | None = Field(
        description=(
            "The field at fault, with its full path as the request wrote it "
            "(method.supervised.hyperparameters.n_epochs); null when no one field is."
        )
    )
    code: str | None = Field(
        description="A machine-readable reason (invalid_value, not_found, invalid_state, ...)."
    )


class ErrorResponse(BaseModel):
    """Every error of every /v1 route, as OpenAI's API and its SDK shape it."""

    error: ErrorObject = Field(description="The error.")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# A 503 tells the client to come back: the openai SDK retries it, honouring Retry-After.
RETRY_AFTER_S = 1


def retry_after() -> list[tuple[bytes, bytes]]:
    """The ``Retry-After`` header of a 503, for the middlewares' raw ASGI answers."""
    return [(b"retry-after", str(RETRY_AFTER_S).encode())]


def retry_later(err: APIError) -> JSONResponse:
    """A 503 the client should retry, with ``Retry-After`` (the openai SDK honours it)."""
    return JSONResponse(err.body(), status_code=503, headers={"retry-after": str(RETRY_AFTER_S)})


def database_unavailable(exc: DBAPIError) -> APIError | None:
    """The 503 for a database that went away under a request (a restart or an outage: the
    connection was lost, or could not be made), which the client should retry like a busy
    server's; None for any other database error. Send it with ``Retry-After``."""
    if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
        return None
    log.warning("database unavailable: %s", exc.orig)
    return APIError(
        503,
        f"The database is unavailable; retry after {RETRY_AFTER_S} s.",
        code="database_unavailable",
    )


def server_busy(what: str) -> APIError:
    """The 503 of a server at capacity (api/admission.py); send it with ``Retry-After``."""
    return APIError(
        503, f"The server is busy ({what}); retry after {RETRY_AFTER_S} s.", code="server_busy"
    )


def not_found(kind: str, ident: str, *, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind}: '{ident}'", param=param, code="not_found")


def param_from_loc(loc: Sequence[int | str], prefix: str = "") -> str | None:
    """``("body", "method", "supervised", "n_epochs", "int")`` → ``"method.supervised.n_epochs"``.

    Pydantic appends the name of the union branch that failed ("int", "literal['auto']",
    "constrained-int"); those are not fields the user wrote, so they are dropped.
    """
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header"):
            continue
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            continue
        if "[" in item or item in ("int", "float", "str", "bool", "dict", "list") or "-" in item:
            continue
        parts.append(item)
    joined = ".".join(parts)
    if prefix:
        return f"{prefix}.{joined}" if joined else prefix
    return joined or None


def from_validation_error(
    exc: ValidationError | RequestValidationError, prefix: str = ""
) -> APIError:
    first = exc.errors()[0]
    param = param_from_loc(first.get("loc", ()), prefix)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if kind == "extra_forbidden":
        return invalid(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind == "missing":
        return invalid(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    message = first.get("msg", "invalid value")
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict | list) else ""
    return invalid(f"Invalid value for '{param}': {message}{shown}.", param=param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(DataError)
    async def _data(_request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request supplied (Postgres: a NUL character in a
        # string, a number out of range). The transaction is rolled back: nothing is stored.
        log.info("database refused a request value: %s", exc.orig)
        err = invalid(
            "A value in the request cannot be stored or searched "
            "(for example, it contains a NUL character or is out of range).",
        )
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(PoolTimeout)
    async def _pool(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        # No connection came free within ALIGND_DB_POOL_TIMEOUT_S: the server is overloaded,
        # which the client should retry, not a bug (a 500) (api/admission.py).
        err = server_busy("no database connection free")
        return retry_later(err)

    @app.exception_handler(DBAPIError)
    async def _database(_request: Request, exc: DBAPIError) -> JSONResponse:
        err = database_unavailable(exc)
        if err is None:
            raise exc  # any other database error is a bug of ours: a 500 (api/request_id.py)
        return retry_later(err)

    @app.exception_handler(ArtifactStoreError)
    async def _artifacts(_request: Request, exc: ArtifactStoreError) -> JSONResponse:
        # The artifact store (S3) stayed unreachable past its retries: the client may try
        # again later; the full reason goes to the log, not to the client.
        log.warning("artifact store: %s", exc)
        err = APIError(
            503, "The artifact store is unavailable; retry later.", code="artifact_store_error"
        )
        return retry_later(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(
                404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url"
            )
        else:
            # 413: a body over ALIGND_MAX_JSON_BODY_BYTES, raised while FastAPI reads it.
            code = "request_too_large" if exc.status_code == 413 else None
            err = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)
