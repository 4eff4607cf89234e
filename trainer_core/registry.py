"""The methods this trainer knows: one row per method, and everything derived from it.

A row says what a job of that method may ask (its hyperparameters and its options), what it
trains with (the resolved hyperparameters), which module under ``trainer_core.methods``
holds its ``train``, and what it can do (several processes and ZeRO, the dataset formats it
takes, its base learning rates). The API validates and resolves job bodies with it, the
runner dispatches with it; nothing else keeps a list of methods. A new method is one module
and one row here (docs/methods.md, "Adding a method").

No torch here: the API imports this module.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from trainer_core.hyperparameters import (
    MAX_AUTO_BATCH_SIZE,
    CommonRequest,
    CommonResolved,
    DpoHyperparameters,
    DpoHyperparametersRequest,
    GrpoHyperparameters,
    GrpoHyperparametersRequest,
    KtoHyperparameters,
    KtoHyperparametersRequest,
    OrpoHyperparameters,
    OrpoHyperparametersRequest,
    PpoHyperparameters,
    PpoHyperparametersRequest,
    ReinforcementHyperparameters,
    ReinforcementHyperparametersRequest,
    RewardModelHyperparameters,
    RewardModelHyperparametersRequest,
    RlooHyperparameters,
    RlooHyperparametersRequest,
    SimpoHyperparameters,
    SimpoHyperparametersRequest,
    SupervisedHyperparameters,
    SupervisedHyperparametersRequest,
)

AdapterType = Literal["lora", "full"]


# -- options: what a method block carries beside "hyperparameters" -------------------------
#
# A field without a default is required. The values are data that trainer_core.graders
# validates (reward functions are never code from the request), so they are typed here only
# as far as the JSON shape goes.


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoOptions(_Options):
    """The method's block holds only ``hyperparameters``."""


class RewardFunctionOptions(_Options):
    reward_functions: list[dict[str, Any]] = Field(
        description=(
            "The reward functions that score each sampled completion: OpenAI's graders and "
            "ours (regex, json_schema, length, answer_match, http, reward_model, ...), as data; "
            "docs/methods.md, 'Reward functions'."
        )
    )


class GraderOptions(_Options):
    grader: dict[str, Any] = Field(
        description=(
            "OpenAI's grader (string_check, text_similarity, score_model, multi, or one of "
            "ours); it becomes the run's one reward function."
        )
    )


class RewardModelOptions(_Options):
    reward_model: str = Field(
        description="The fine_tuned_model of one of your succeeded reward_model jobs."
    )


# -- the table -----------------------------------------------------------------------------


class BaseLearningRate(NamedTuple):
    """The rate ``learning_rate_multiplier`` scales, per adapter type. LoRA tolerates (and
    needs) a far larger rate than full fine-tuning; these are the usual starting points of
    the PEFT and TRL examples (TRL: SFT 2e-5, DPO 1e-6, reward 1e-4 full)."""

    lora: float
    full: float


# A NamedTuple rather than a dataclass so that callers that index a row positionally
# (``METHODS[name][0]`` for the request class, as before this was one table) keep working.
class Method(NamedTuple):
    request: type[CommonRequest]
    resolved: type[CommonResolved]
    options: type[BaseModel]
    # The module under trainer_core.methods whose ``train`` runs it.
    module: str
    # Runs in several processes and under DeepSpeed ZeRO 1-3 (``resources.gpus``/``zero_stage``).
    distributed: bool
    # The dataset formats (as trainer_core.formats names them) it can train on.
    dataset_formats: tuple[str, ...]
    base_learning_rate: BaseLearningRate
    # The ZeRO stages it runs under (``resources.zero_stage``), when distributed.
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)


_PREFERENCE_RATE = BaseLearningRate(lora=5e-5, full=1e-6)
_ONLINE_RATE = BaseLearningRate(lora=1e-5, full=1e-6)
# Online methods sample their own completions: prompts only (extra keys feed the graders).
_PROMPTS = ("prompt_only",)

METHODS: dict[str, Method] = {
    "supervised": Method(
        SupervisedHyperparametersRequest,
        SupervisedHyperparameters,
        NoOptions,
        module="supervised",
        distributed=True,
        dataset_formats=("chat", "prompt_completion", "text"),
        base_learning_rate=BaseLearningRate(lora=2e-4, full=2e-5),
    ),
    "dpo": Method(
        DpoHyperparametersRequest,
        DpoHyperparameters,
        NoOptions,
        module="dpo",
        distributed=True,
        dataset_formats=("preference",),
        base_learning_rate=_PREFERENCE_RATE,
    ),
    "reward_model": Method(
        RewardModelHyperparametersRequest,
        RewardModelHyperparameters,
        NoOptions,
        module="reward_model",
        distributed=True,
        dataset_formats=("preference",),
        base_learning_rate=BaseLearningRate(lora=1e-4, full=1e-5),
    ),
    "kto": Method(
        KtoHyperparametersRequest,
        KtoHyperparameters,
        NoOptions,
        module="kto",
        distributed=True,
        # Paired preference data too: each pair becomes one desirable and one undesirable row.
        dataset_formats=("kto", "preference"),
        base_learning_rate=_PREFERENCE_RATE,
    ),
    "orpo": Method(
        OrpoHyperparametersRequest,
        OrpoHyperparameters,
        NoOptions,
        module="orpo",
        distributed=True,
        dataset_formats=("preference",),
        base_learning_rate=_PREFERENCE_RATE,
    ),
    "simpo": Method(
        SimpoHyperparametersRequest,
        SimpoHyperparameters,
        NoOptions,
        module="simpo",
        distributed=True,
        dataset_formats=("preference",),
        base_learning_rate=_PREFERENCE_RATE,
    ),
    "grpo": Method(
        GrpoHyperparametersRequest,
        GrpoHyperparameters,
        RewardFunctionOptions,
        module="grpo",
        distributed=True,
        dataset_formats=_PROMPTS,
        base_learning_rate=_ONLINE_RATE,
    ),
    # OpenAI's reinforcement is GRPO driven by its grader (mapped when the job is created).
    "reinforcement": Method(
        ReinforcementHyperparametersRequest,
        ReinforcementHyperparameters,
        GraderOptions,
        module="grpo",
        distributed=True,
        dataset_formats=_PROMPTS,
        base_learning_rate=_ONLINE_RATE,
    ),
    "rloo": Method(
        RlooHyperparametersRequest,
        RlooHyperparameters,
        RewardFunctionOptions,
        module="rloo",
        distributed=True,
        dataset_formats=_PROMPTS,
        base_learning_rate=_ONLINE_RATE,
    ),
    "ppo": Method(
        PpoHyperparametersRequest,
        PpoHyperparameters,
        RewardModelOptions,
        module="ppo",
        # Plain data parallelism only: its value head trains beside the model, and DeepSpeed
        # is given the model alone (methods/ppo.py).
        distributed=True,
        dataset_formats=_PROMPTS,
        base_learning_rate=_ONLINE_RATE,
        zero_stages=(0,),
    ),
}

# The method names as a type, for TrainSpec and the API's schemas.
MethodType = Literal[tuple(METHODS)]  # type: ignore[valid-type]
DISTRIBUTED_METHODS = tuple(name for name, method in METHODS.items() if method.distributed)


def required_options(method_type: str) -> tuple[str, ...]:
    """The options a job of ``method_type`` must give beside its hyperparameters."""
    fields = METHODS[method_type].options.model_fields
    return tuple(name for name, field in fields.items() if field.is_required())


def resolve_hyperparameters(
    method_type: str, request: BaseModel, *, adapter_type: str, n_examples: int
) -> CommonResolved:
    """Replace every "auto" with its documented default (docs/methods.md)."""
    method = METHODS[method_type]
    request_cls, resolved_cls = method.request, method.resolved
    assert isinstance(request, request_cls)
    values = {
        key: request_cls.DEFAULTS[key] if value == "auto" else value
        for key, value in request.model_dump().items()
        if key != "batch_size"
    }
    # Fields the request does not expose (reinforcement's GRPO settings) take their defaults.
    for key in resolved_cls.model_fields:
        if key not in values and key in request_cls.DEFAULTS:
            values[key] = request_cls.DEFAULTS[key]
    values = request_cls.finish_resolving(values)
    values["batch_size"] = (
        max(1, min(MAX_AUTO_BATCH_SIZE, n_examples))
        if request.batch_size == "auto"
        else request.batch_size
    )
    base_rate: float = getattr(method.base_learning_rate, adapter_type)
    values["learning_rate"] = base_rate * values["learning_rate_multiplier"]
    return resolved_cls(**values)
