"""``/v1/fine_tuning/alpha/graders``: OpenAI's validate and run, over trainer_core.graders.

Both take OpenAI's grader types and ours (regex, json_schema, length, answer_match, http,
...). ``run`` grades one sample on the API: reward_model and score_model graders score with a
trained reward model, which only the workers load (the API has no torch), so ``run`` refuses
them with a 400 and ``validate`` is how to check them before training.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from api.deps import OwnerDep, ServicesDep
from api.errors import invalid
from api.grader_schemas import (
    GraderRunRequest,
    GraderRunResponse,
    GraderValidateRequest,
    GraderValidateResponse,
)
from api.openapi import ERROR_RESPONSES, documented_as
from trainer_core import graders

router = APIRouter(
    prefix="/v1/fine_tuning/alpha/graders", tags=["graders"], responses=ERROR_RESPONSES
)


def _body(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    for key in body:
        if key not in allowed:
            raise invalid(f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
    if body.get("grader") is None:
        raise invalid(
            "Missing required parameter: 'grader'.",
            param="grader",
            code="missing_required_parameter",
        )
    return body


def _normalise(services: Any, raw: Any) -> dict[str, Any]:
    try:
        grader = graders.normalize_grader(raw, param="grader")
        graders.grader_to_reward_functions(
            grader, http_allowed_hosts=services.settings.reward_http_allowed_hosts
        )
    except graders.GraderError as exc:
        raise invalid(exc.message, param=exc.param, code="invalid_grader") from None
    return grader


@router.post("/validate")
def validate_grader(
    services: ServicesDep,
    _owner: OwnerDep,
    body: Annotated[Any, Body(), documented_as(GraderValidateRequest)] = None,
) -> GraderValidateResponse:
    """Check a grader; answer it normalised (defaults filled in), or a 400 naming the field."""
    request = _body(body, ("grader",))
    raw = request["grader"]
    grader = _normalise(services, raw)
    if grader["type"] == "multi" and isinstance(raw.get("graders", {}).get("type"), str):
        # The SDK's MultiGrader type declares ``graders`` as one grader (OpenAI's wire and docs
        # use an object of named graders, which is what we store); answer in the form asked.
        (grader["graders"],) = grader["graders"].values()
    return GraderValidateResponse(grader=grader)


@router.post("/run")
def run_grader(
    services: ServicesDep,
    _owner: OwnerDep,
    body: Annotated[Any, Body(), documented_as(GraderRunRequest)] = None,
) -> GraderRunResponse:
    """Grade ``model_sample`` (the completion) against ``item`` (a dataset row)."""
    request = _body(body, ("grader", "model_sample", "item"))
    sample = request.get("model_sample")
    if not isinstance(sample, str):
        raise invalid(
            "'model_sample' must be a string (the completion to grade).",
            param="model_sample",
            code="missing_required_parameter" if sample is None else "invalid_value",
        )
    item = request.get("item")
    if item is not None and not isinstance(item, dict):
        raise invalid("'item' must be an object (a dataset row).", param="item")
    grader = _normalise(services, request["grader"])
    where = graders.uses_reward_model(grader)
    if where is not None:
        raise invalid(
            "reward_model and score_model graders score with a trained reward model, which runs "
            "on the workers during training; the API does not load models, so /run cannot "
            "score them. Use /validate to check them.",
            param=where,
            code="grader_not_runnable",
        )
    settings = services.settings
    try:
        result = graders.run_grader(
            grader,
            item or {},
            sample,
            http_allowed_hosts=settings.reward_http_allowed_hosts,
            http_timeout_s=settings.reward_http_timeout_s,
        )
    except graders.GraderError as exc:
        raise invalid(exc.message, param=exc.param, code="grader_failed") from None
    return GraderRunResponse.model_validate(result)
