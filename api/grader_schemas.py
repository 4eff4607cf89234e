"""The shapes of ``/v1/fine_tuning/alpha/graders``: OpenAI's validate and run requests and
answers (graders themselves are data that ``trainer_core.graders`` checks and runs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

GRADER = (
    "A grader: OpenAI's (string_check, text_similarity, score_model, multi, python refused) "
    "or ours (regex, json_schema, length, answer_match, http, reward_model, ...)."
)


class GraderValidateRequest(BaseModel):
    grader: dict[str, Any] = Field(description=GRADER)


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any] = Field(description="The grader, normalised (defaults filled in).")


class GraderRunRequest(BaseModel):
    grader: dict[str, Any] = Field(description=GRADER)
    model_sample: str = Field(description="The completion to grade.")
    item: dict[str, Any] | None = Field(
        None, description="The dataset row it answers ({{item.X}} in templates)."
    )


class GraderRunMetadata(BaseModel):
    name: str = Field(description="The grader's name.")
    type: str = Field(description="The grader's type.")
    errors: dict[str, bool | str | None] = Field(
        description="OpenAI's error flags (sample_parse_error, ...) and their details."
    )
    execution_time: float = Field(description="Seconds the grading took.")
    scores: dict[str, float] = Field(description="A multi grader's sub-grader rewards.")
    token_usage: int | None = Field(description="Always null: no model is sampled.")
    sampled_model_name: str | None = Field(description="Always null: no model is sampled.")


class GraderRunResponse(BaseModel):
    reward: float = Field(description="The grader's reward for the sample.")
    sub_rewards: dict[str, float] = Field(description="A multi grader's sub-grader rewards.")
    metadata: GraderRunMetadata = Field(description="How the grading went.")
    model_grader_token_usage_per_model: dict[str, Any] = Field(
        description="Always empty: no model is sampled."
    )
