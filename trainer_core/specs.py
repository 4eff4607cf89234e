"""What a training run is asked to do: plain pydantic models, no torch.

Two layers live here. The *request* models mirror the OpenAI job body (every hyperparameter
may be ``"auto"``) and are what the API validates a POST against. ``resolve`` turns a request
into a concrete ``TrainSpec`` with every "auto" replaced by a documented default, so the
resolved values can be stored on the job and shown back to the user before training starts.

This module must stay importable without torch: the API imports it to validate job bodies.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]

# Base learning rates that ``learning_rate_multiplier`` scales. LoRA tolerates (and needs)
# roughly ten times the rate of full fine-tuning; these are the usual starting points in
# the PEFT and TRL examples.
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}
DEFAULT_N_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(_Strict):
    """How the weights are trained: a LoRA adapter (default) or every weight."""

    type: Literal["lora", "full"] = "lora"
    r: Annotated[int, Field(ge=1, le=1024)] = 8
    alpha: Annotated[float, Field(gt=0, le=4096)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # "all-linear" targets every linear layer but the output head, which is what QLoRA
    # found works best and what peft's own shorthand means.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SupervisedHyperparametersRequest(_Strict):
    """OpenAI's three supervised hyperparameters plus ours; each may be "auto"."""

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    lr_scheduler: Literal["linear", "cosine", "constant"] | Auto = "auto"
    weight_decay: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6)] | Auto = "auto"


class SupervisedHyperparameters(_Strict):
    """Resolved supervised hyperparameters: no "auto" left."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    gradient_accumulation_steps: int
    warmup_ratio: float
    lr_scheduler: Literal["linear", "cosine", "constant"]
    weight_decay: float
    max_grad_norm: float


T = TypeVar("T")


def _pick(value: T | str, default: T) -> T:
    return default if value == "auto" else value  # type: ignore[return-value]


def resolve_supervised(
    request: SupervisedHyperparametersRequest, *, adapter_type: str, n_examples: int
) -> SupervisedHyperparameters:
    """Replace every "auto" with its documented default (docs/methods.md)."""
    multiplier = _pick(request.learning_rate_multiplier, 1.0)
    return SupervisedHyperparameters(
        n_epochs=_pick(request.n_epochs, DEFAULT_N_EPOCHS),
        batch_size=_pick(request.batch_size, max(1, min(MAX_AUTO_BATCH_SIZE, n_examples))),
        learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE[adapter_type] * multiplier,
        gradient_accumulation_steps=_pick(request.gradient_accumulation_steps, 1),
        warmup_ratio=_pick(request.warmup_ratio, 0.0),
        lr_scheduler=_pick(request.lr_scheduler, "linear"),
        weight_decay=_pick(request.weight_decay, 0.0),
        max_grad_norm=_pick(request.max_grad_norm, 1.0),
    )


# method type -> the request model of its hyperparameters. The API rejects a type not here.
METHOD_HYPERPARAMETERS: dict[str, type[BaseModel]] = {
    "supervised": SupervisedHyperparametersRequest,
}


def resolve_hyperparameters(
    method_type: str, request: BaseModel, *, adapter_type: str, n_examples: int
) -> BaseModel:
    """Resolve a method's request hyperparameters (the type must be in METHOD_HYPERPARAMETERS)."""
    resolvers = {"supervised": resolve_supervised}
    return resolvers[method_type](request, adapter_type=adapter_type, n_examples=n_examples)  # type: ignore[arg-type]


# method type -> the dataset formats (as the file validator names them) it can train on.
METHOD_DATASET_FORMATS: dict[str, tuple[str, ...]] = {
    "supervised": ("chat", "prompt_completion", "text"),
}


class TrainSpec(_Strict):
    """Everything one run needs; what ``python -m trainer_core run spec.json`` reads."""

    method: Literal["supervised"] = "supervised"
    model: str = Field(description="Local model folder (Hugging Face format) or a hub id.")
    train_file: str = Field(description="Path of the training JSONL file.")
    validation_file: str | None = None
    seed: int = 42
    max_seq_len: Annotated[int, Field(ge=8, le=1_048_576)] = 1024
    adapter: AdapterSpec = AdapterSpec()
    hyperparameters: SupervisedHyperparameters
    # Steps between metric points sent to the sink.
    log_every: Annotated[int, Field(ge=1)] = 1
    # Steps between checkpoints; None means one at the end of every epoch (OpenAI's rule).
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    # Only the operator can turn these on (ALIGND_TRUST_REMOTE_CODE, ALIGND_ALLOW_HUB).
    trust_remote_code: bool = False
    allow_hub: bool = False
    # torch intra-op threads; None leaves torch's default.
    num_threads: Annotated[int, Field(ge=1)] | None = None
