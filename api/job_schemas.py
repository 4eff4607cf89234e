"""The body of ``POST /v1/fine_tuning/jobs`` (and of ``.../estimate``): its models, and the
checks that turn a raw body into a typed request, each error naming the field as written.

``JobCreate`` validates the top level. The method block (``method.<type>``) is checked here
by hand, against the method's row in ``trainer_core.registry``, so that its errors carry the
full path (``method.dpo.hyperparameters.beta``) and come in a fixed order: the type, unknown
keys, missing required options, then the hyperparameters. ``JobMethodRequest`` describes
that block in ``/openapi.json``; it is built from the same registry rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from api.errors import from_validation_error, invalid
from api.openapi import documented_as
from trainer_core.hyperparameters import CommonRequest, SupervisedHyperparametersRequest
from trainer_core.registry import METHODS, MethodType, required_options
from trainer_core.specs import AdapterSpec, ResourcesSpec

_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_WANDB_FIELD = re.compile(r"(integrations\.\d+\.wandb[\w.]*):")
# integrations are stored on the job and echoed by every GET and every list page (only wandb
# is acted on, by the worker: worker/integrations.py), so they get a budget of the same order as the largest metadata (16 pairs of
# 64 + 512 characters, about 9 KB): 10 entries, 8 KiB of compact JSON (docs/api.md).
MAX_INTEGRATIONS = 10
MAX_INTEGRATIONS_BYTES = 8 * 1024


def _block_request(name: str) -> type[BaseModel]:
    """``method.<name>`` as a request may give it: hyperparameters plus the method's options."""
    method = METHODS[name]
    title = method.request.__name__.removesuffix("HyperparametersRequest")
    fields: dict[str, Any] = {
        "hyperparameters": (
            method.request | None,
            Field(None, description="Numbers or 'auto' (docs/methods.md has the defaults)."),
        )
    }
    return create_model(
        f"{title}MethodRequest",
        __base__=method.options,
        __doc__=f"The block of a '{name}' job: its hyperparameters and options.",
        **fields,
    )


_method_fields: dict[str, Any] = {
    "type": (MethodType, Field(description="The method: " + ", ".join(METHODS) + ".")),
    **{
        name: (_block_request(name) | None, Field(None, description=f"The '{name}' block."))
        for name in METHODS
    },
}
JobMethodRequest = create_model(
    "JobMethodRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__=(
        "The method to train with: its type, and the block named after the type with its "
        "hyperparameters and options (e.g. {'type': 'dpo', 'dpo': {'hyperparameters': ...}})."
    ),
    **_method_fields,
)


class WandbIntegration(BaseModel):
    """OpenAI's ``wandb`` block of an integration. wandb's own rules (tag length, characters
    of a project name) are wandb's to check when the run starts: a refusal there is a warning
    event on the job, not a failed request (docs/api.md)."""

    model_config = ConfigDict(extra="forbid")

    project: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(max_length=128)] | None = None
    entity: Annotated[str, Field(max_length=128)] | None = None
    tags: Annotated[list[str], Field(max_length=64)] | None = None


class JobCreate(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs``: OpenAI's fields plus our extensions."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)] = Field(
        description="The base model: a model in the server's models dir (GET /v1/models)."
    )
    training_file: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="The id of a processed file in a format the method trains on."
    )
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="A file for the validation metrics at every checkpoint."
    )
    suffix: str | None = Field(
        None, description="Up to 64 of letters, digits, '.', '_', '-'; part of the model name."
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(
        None, description="Makes the run reproducible; a random one is picked when absent."
    )
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 pairs (keys up to 64 characters, values up to 512)."
    )
    method: Annotated[dict[str, Any], documented_as(JobMethodRequest)] | None = Field(
        None, description="The method and its hyperparameters; supervised when absent."
    )
    # OpenAI's deprecated top-level form of the supervised hyperparameters.
    hyperparameters: (
        Annotated[dict[str, Any], documented_as(SupervisedHyperparametersRequest)] | None
    ) = Field(None, description="Deprecated (OpenAI): a supervised job's hyperparameters.")
    integrations: Annotated[list[dict[str, Any]], Field(max_length=MAX_INTEGRATIONS)] | None = (
        Field(
            None,
            description=(
                "OpenAI's integrations: a {'type': 'wandb', 'wandb': {project, name, entity, "
                "tags}} entry logs the job to W&B; others are stored and shown. At most "
                f"{MAX_INTEGRATIONS} entries and {MAX_INTEGRATIONS_BYTES} bytes of JSON."
            ),
        )
    )
    # Ours (the SDK sends them through extra_body).
    adapter: AdapterSpec | None = Field(None, description="Ours: LoRA (default) or full.")
    max_seq_len: Annotated[int, Field(ge=8, le=1_048_576)] | None = Field(
        None, description="Ours: longer examples are truncated, keeping the start (1024)."
    )
    resources: ResourcesSpec | None = Field(
        None, description="Ours: processes, ZeRO stage, precision and worker class."
    )

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        # The suffix becomes part of a model name split on ':', so keep it to a safe alphabet.
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
            if size > MAX_INTEGRATIONS_BYTES:
                raise ValueError(
                    f"at most {MAX_INTEGRATIONS_BYTES} bytes of JSON in all (got {size})"
                )
            for index, item in enumerate(value):
                if item.get("type") == "wandb":
                    try:
                        WandbIntegration.model_validate(item.get("wandb"))
                    except ValidationError as exc:
                        first = exc.errors()[0]
                        where = ".".join(str(part) for part in first["loc"])
                        raise ValueError(
                            f"integrations.{index}.wandb{'.' + where if where else ''}: "
                            f"{first['msg']}"
                        ) from None
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value


@dataclass(frozen=True)
class MethodRequest:
    """A job body's method, checked: its type, hyperparameters and (raw) options."""

    type: str
    hyperparameters: CommonRequest
    # Reward functions, grader, reward model: checked by the service (graders, ownership).
    options: dict[str, Any]


def parse_body(raw: Any) -> JobCreate:
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_body")
    try:
        return JobCreate.model_validate(raw)
    except ValidationError as exc:
        error = from_validation_error(exc)
        if error.param == "resources" and "offload_optimizer" in error.message:
            # ResourcesSpec's cross-field rule reports on the whole object; name the field.
            error.param = "resources.offload_optimizer"
        if error.param == "integrations" and (found := _WANDB_FIELD.search(error.message)):
            error.param = found.group(1)  # the wandb block's own field, as the message names it
        raise error from None


def parse_method(body: JobCreate) -> MethodRequest:
    """The method block of a checked body (supervised with the legacy top-level form)."""
    if body.method is None:
        hyperparameters = _hyperparameters("supervised", body.hyperparameters, "hyperparameters")
        return MethodRequest("supervised", hyperparameters, {})
    if body.hyperparameters is not None:
        raise invalid(
            "Give hyperparameters inside 'method', not also at the top level.",
            param="hyperparameters",
        )
    method_type = body.method.get("type")
    if not isinstance(method_type, str):
        raise invalid(
            "Missing required parameter: 'method.type'.",
            param="method.type",
            code="missing_required_parameter",
        )
    if method_type not in METHODS:
        raise invalid(
            f"Unsupported method type '{method_type}'. Supported: {', '.join(METHODS)}.",
            param="method.type",
            code="unsupported_method",
        )
    for key in body.method:
        if key not in ("type", method_type):
            raise invalid(
                f"Unknown parameter: 'method.{key}'.",
                param=f"method.{key}",
                code="unknown_parameter",
            )
    block = body.method.get(method_type) or {}
    if not isinstance(block, dict):
        raise invalid(f"'method.{method_type}' must be an object.", param=f"method.{method_type}")
    options = METHODS[method_type].options.model_fields
    for key in block:
        if key != "hyperparameters" and key not in options:
            raise invalid(
                f"Unknown parameter: 'method.{method_type}.{key}'.",
                param=f"method.{method_type}.{key}",
                code="unknown_parameter",
            )
    for key in required_options(method_type):
        if block.get(key) is None:
            raise invalid(
                f"Missing required parameter: 'method.{method_type}.{key}'.",
                param=f"method.{method_type}.{key}",
                code="missing_required_parameter",
            )
    prefix = f"method.{method_type}.hyperparameters"
    hyperparameters = _hyperparameters(method_type, block.get("hyperparameters"), prefix)
    given = {key: value for key, value in block.items() if key != "hyperparameters"}
    return MethodRequest(method_type, hyperparameters, given)


def _hyperparameters(method_type: str, raw: Any, prefix: str) -> CommonRequest:
    if raw is not None and not isinstance(raw, dict):
        raise invalid(f"'{prefix}' must be an object.", param=prefix)
    try:
        return METHODS[method_type].request.model_validate(raw or {})
    except ValidationError as exc:
        raise from_validation_error(exc, prefix=prefix) from None
