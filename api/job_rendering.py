"""Jobs, their events and checkpoints as the API answers them: OpenAI's ``fine_tuning.job``,
``fine_tuning.job.event`` and ``fine_tuning.job.checkpoint`` objects (plus our fields), and
how a row becomes one.

The shapes follow the openai SDK's types field by field; the SDK tests are the judge. The
method block and the top-level hyperparameters show what the job stored, key for key (a key
it did not store is absent, not null), which ``Sparse`` models keep so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    create_model,
    model_serializer,
)

from api import catalog
from api.models import Checkpoint, Job, JobEvent
from api.pagination import ListPage
from trainer_core.registry import METHODS, MethodType
from trainer_core.specs import AdapterSpec, ResourcesSpec

JobStatus = Literal[
    "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"
]


class Sparse(BaseModel):
    """A model that shows only the fields it was given: an absent key stays absent."""

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        shown: dict[str, Any] = handler(self)
        return {key: value for key, value in shown.items() if key in self.model_fields_set}


class MethodBlock(Sparse):
    """A method's block as the job stored it: resolved hyperparameters and its options.

    The fields are in the order jobs store them; each method's block narrows
    ``hyperparameters`` to its own class (``_block``).
    """

    hyperparameters: Any = None
    grader: dict[str, Any] | None = Field(None, description="reinforcement: the grader as given.")
    reward_functions: list[dict[str, Any]] | None = Field(
        None,
        description=(
            "grpo, rloo, reinforcement: the reward functions, normalised (reinforcement: its "
            "grader mapped onto them)."
        ),
    )
    reward_model: str | None = Field(None, description="ppo: the reward model it trains against.")


def _block(name: str) -> type[MethodBlock]:
    resolved = METHODS[name].resolved
    title = resolved.__name__.removesuffix("Hyperparameters")
    fields: dict[str, Any] = {
        "hyperparameters": (
            # A job stored by an older version may lack a field: it is shown as stored.
            Annotated[resolved | dict[str, Any], Field(union_mode="left_to_right")] | None,
            Field(None, description="Every hyperparameter, 'auto' resolved to its value."),
        )
    }
    return create_model(
        f"{title}Method", __base__=MethodBlock, __doc__=f"The block of a '{name}' job.", **fields
    )


_method_fields: dict[str, Any] = {
    "type": (MethodType, Field(description="The method: " + ", ".join(METHODS) + ".")),
    **{
        name: (_block(name) | None, Field(None, description=f"The '{name}' block."))
        for name in METHODS
    },
}
FineTuningJobMethod = create_model(
    "FineTuningJobMethod",
    __base__=Sparse,
    __doc__="The method a job trains with: its type, and the block named after it.",
    **_method_fields,
)


class JobHyperparameters(Sparse):
    """OpenAI's top-level copy of three hyperparameters (deprecated there; in method too)."""

    n_epochs: int | None = Field(None, description="Passes over the training file.")
    batch_size: int | None = Field(None, description="Examples per micro-batch.")
    learning_rate_multiplier: float | None = Field(
        None, description="Scales the method's base learning rate."
    )


class JobError(BaseModel):
    code: str = Field(description="A machine-readable code (training_error, worker_lost, ...).")
    message: str = Field(description="What went wrong.")
    param: str | None = Field(description="The parameter at fault, if one is.")


class JobProgress(BaseModel):
    step: int = Field(description="Optimizer steps done.")
    total_steps: int = Field(description="Optimizer steps the run makes in all.")
    percent: float = Field(description="step / total_steps, in percent (one decimal).")


class FineTuningJob(BaseModel):
    """A fine-tuning job (OpenAI's ``fine_tuning.job``, plus our fields)."""

    id: str = Field(description="The job id (ftjob-...).")
    object: Literal["fine_tuning.job"] = Field(description="Always 'fine_tuning.job'.")
    created_at: int = Field(description="When the job was created (Unix seconds).")
    finished_at: int | None = Field(description="When it ended (Unix seconds); null until then.")
    model: str = Field(description="The base model being fine-tuned.")
    fine_tuned_model: str | None = Field(
        description="ft:<base>:<owner>:<suffix>:<job id> once succeeded; else null."
    )
    organization_id: str = Field(description="The owner (tenant) of the job.")
    status: JobStatus = Field(
        description=(
            "validating_files, queued, running, paused (ours), succeeded, failed or cancelled."
        )
    )
    training_file: str = Field(description="The id of the training file.")
    validation_file: str | None = Field(description="The id of the validation file, if any.")
    result_files: list[str] = Field(
        description=(
            "Once succeeded: the id of its results file (purpose fine-tune-results), a CSV of "
            "its metrics per step, read with GET /v1/files/{id}/content; else empty."
        )
    )
    trained_tokens: int | None = Field(
        description="Non-padding tokens processed over all epochs; null until the job ends."
    )
    hyperparameters: JobHyperparameters = Field(
        description="OpenAI's copy of n_epochs, batch_size, learning_rate_multiplier."
    )
    method: FineTuningJobMethod = Field(  # type: ignore[valid-type]
        description="The method and its resolved hyperparameters and options."
    )
    seed: int = Field(description="The seed of the run (picked at random when none was given).")
    error: JobError | None = Field(description="Why a failed job failed; else null.")
    estimated_finish: int | None = Field(
        description="When a running job should finish (Unix seconds); null unless running."
    )
    integrations: list[dict[str, Any]] = Field(description="The integrations, as given.")
    metadata: dict[str, str] | None = Field(description="The key-value pairs given, if any.")
    suffix: str | None = Field(description="The suffix given, if any.")
    user_provided_suffix: str | None = Field(description="The suffix given, if any.")
    # Ours.
    substatus: str | None = Field(
        description=(
            "Ours: finer state within the status (cancelling, pausing, waiting for free GPUs, "
            "no worker serves the queue, ...)."
        )
    )
    queue_position: int | None = Field(
        description="Ours: 1-based place in the queue of a queued job (list and retrieve)."
    )
    progress: JobProgress | None = Field(
        description="Ours: steps done of the total, once a run has started."
    )
    adapter: AdapterSpec | None = Field(description="Ours: LoRA settings, or full fine-tuning.")
    max_seq_len: int | None = Field(description="Ours: the longest sequence, in tokens.")
    resources: ResourcesSpec = Field(
        description="Ours: processes, ZeRO stage, precision and worker class."
    )
    attempts: int = Field(
        description=(
            "Ours: how many times a worker has started the job's current run (1 once it is "
            "running; more after its worker was lost and the job resumed; 0 before it starts)."
        )
    )
    last_error: str | None = Field(
        description="Ours: why the last attempt was lost (a dead worker process, ...); else null."
    )


class FineTuningJobList(ListPage[FineTuningJob]):
    """A page of jobs, newest first."""


class FineTuningJobEvent(BaseModel):
    """One line of a job's story (OpenAI's ``fine_tuning.job.event``)."""

    id: str = Field(description="The event id (ftevent-...), a cursor for after= and streams.")
    object: Literal["fine_tuning.job.event"] = Field(description="Always 'fine_tuning.job.event'.")
    created_at: int = Field(description="When it happened (Unix seconds).")
    level: str = Field(description="info, warning or error.")
    message: str = Field(description="What happened, for a person to read.")
    type: str = Field(description="message, or metrics (a step's metrics every 10 steps).")
    data: dict[str, Any] = Field(description="Details: a metrics event's step and values, ...")


class FineTuningJobEventList(ListPage[FineTuningJobEvent]):
    """A page of a job's events, newest first."""


class FineTuningJobCheckpoint(BaseModel):
    """A saved checkpoint of a job (OpenAI's ``fine_tuning.job.checkpoint``)."""

    id: str = Field(description="The checkpoint id (ftckpt-...).")
    object: Literal["fine_tuning.job.checkpoint"] = Field(
        description="Always 'fine_tuning.job.checkpoint'."
    )
    created_at: int = Field(description="When it was saved (Unix seconds).")
    fine_tuned_model_checkpoint: str = Field(
        description="The fine-tuned model's name with :ckpt-step-<step>."
    )
    fine_tuning_job_id: str = Field(description="The job it belongs to.")
    step_number: int = Field(description="The optimizer step it was saved after.")
    metrics: dict[str, float | int | None] = Field(
        description="The step, and the metrics at it (validation metrics with a validation file)."
    )


class FineTuningJobCheckpointList(ListPage[FineTuningJobCheckpoint]):
    """A page of a job's checkpoints, newest first."""


class FineTuningJobSpec(BaseModel):
    """Ours: a job's spec as submitted and as the API resolved it (``GET .../jobs/{id}/spec``)."""

    object: Literal["fine_tuning.job.spec"] = Field(description="Always 'fine_tuning.job.spec'.")
    fine_tuning_job_id: str = Field(description="The job.")
    submitted: dict[str, Any] | None = Field(
        description="The request body as its owner sent it; null for jobs older than this field."
    )
    resolved: dict[str, Any] | None = Field(
        description=(
            "What the worker trains from: the method with every hyperparameter resolved (no "
            "'auto'), the base model, adapter, resources, seed (docs/operations.md, 'The job "
            "spec'); null for jobs made outside the API."
        )
    )


def render_job(job: Job, queue_position: int | None = None) -> FineTuningJob:
    method_type = job.method["type"]
    hyperparameters = job.method[method_type]["hyperparameters"]
    progress = None
    if job.total_steps:
        step = job.step or 0
        progress = JobProgress(
            step=step,
            total_steps=job.total_steps,
            percent=round(100.0 * step / job.total_steps, 1),
        )
    return FineTuningJob(
        id=job.id,
        object="fine_tuning.job",
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.owner,
        status=job.status,
        training_file=job.training_file,
        validation_file=job.validation_file,
        result_files=job.result_files,
        trained_tokens=job.trained_tokens,
        # OpenAI shows the supervised three at the top level too (deprecated there).
        hyperparameters=JobHyperparameters.model_validate(
            {
                key: hyperparameters[key]
                for key in ("n_epochs", "batch_size", "learning_rate_multiplier")
                if key in hyperparameters
            }
        ),
        method=FineTuningJobMethod.model_validate(job.method),
        seed=job.seed,
        error=job.error,
        estimated_finish=job.estimated_finish if job.status == "running" else None,
        integrations=job.extensions.get("integrations", []),
        metadata=job.user_metadata,
        suffix=job.suffix,
        user_provided_suffix=job.suffix,
        substatus=job.substatus,
        queue_position=queue_position,
        progress=progress,
        adapter=job.extensions.get("adapter"),
        max_seq_len=job.extensions.get("max_seq_len"),
        # Jobs from before resources existed ran with the defaults.
        resources=job.extensions.get("resources") or ResourcesSpec(),
        attempts=job.attempts or 0,
        last_error=job.last_error,
    )


def render_event(row: JobEvent) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=row.id,
        object="fine_tuning.job.event",
        created_at=row.created_at,
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data or {},
    )


def render_checkpoint(job: Job, row: Checkpoint) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=row.id,
        object="fine_tuning.job.checkpoint",
        created_at=row.created_at,
        fine_tuned_model_checkpoint=f"{catalog.fine_tuned_name(job)}:ckpt-step-{row.step}",
        fine_tuning_job_id=job.id,
        step_number=row.step,
        metrics={"step": float(row.step), **row.metrics},
    )
