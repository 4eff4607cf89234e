"""What a training run is asked to do: ``TrainSpec`` and its parts, plain pydantic, no torch.

``TrainSpec`` is the one object a run is described by, from the API to the trainer. The API
resolves a job body into it once, at creation (every "auto" replaced, see
``trainer_core.registry.resolve_hyperparameters``), and stores it on the job; the worker
loads it and fills in only what is local to the machine that runs it (paths, the operator's
settings) with ``model_copy``. ``python -m trainer_core run spec.json`` reads the same object.

The hyperparameter classes live in ``trainer_core.hyperparameters`` and the method table in
``trainer_core.registry``; the resolved classes a ``TrainSpec`` holds (and the registry's
``METHODS``/``resolve_hyperparameters``) are re-exported here, where method modules and tests
import them from. The request classes are the API's business: take them from the registry.

This module must stay importable without torch: the API imports it to validate job bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from trainer_core.hyperparameters import (
    DPO_LOSS_TYPES,
    CommonResolved,
    DpoHyperparameters,
    GrpoHyperparameters,
    KtoHyperparameters,
    OrpoHyperparameters,
    PpoHyperparameters,
    ReinforcementHyperparameters,
    RewardModelHyperparameters,
    RlooHyperparameters,
    SimpoHyperparameters,
    SupervisedHyperparameters,
)
from trainer_core.registry import (
    METHODS,
    MethodType,
    resolve_hyperparameters,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "METHODS",
    "PADDING_FREE_METHODS",
    "PRECISIONS",
    "TOKEN_BUDGET_METHODS",
    "AdapterSpec",
    "AnyHyperparameters",
    "DpoHyperparameters",
    "GrpoHyperparameters",
    "KtoHyperparameters",
    "MethodType",
    "OrpoHyperparameters",
    "PpoHyperparameters",
    "Precision",
    "ReinforcementHyperparameters",
    "ResourcesSpec",
    "RewardModelHyperparameters",
    "RewardModelRef",
    "RlooHyperparameters",
    "SimpoHyperparameters",
    "SupervisedHyperparameters",
    "TrainSpec",
    "resolve_hyperparameters",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(_Strict):
    """How the weights are trained: a LoRA adapter (default) or every weight."""

    type: Literal["lora", "full"] = Field(
        "lora", description="lora: train a LoRA adapter; full: train every weight."
    )
    r: Annotated[int, Field(ge=1, le=1024)] = Field(8, description="LoRA rank.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(
        16, description="LoRA scaling: the update is scaled by alpha / r."
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Dropout on the LoRA branch's input."
    )
    # "all-linear" targets every linear layer but the output head, which is what QLoRA
    # found works best and what peft's own shorthand means.
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear': every linear layer but the head.",
    )


# Mixed precision as the trainer runs it (trainer_core/placement.py). fp16 needs a CUDA GPU
# (its loss scaling); the workers' registry offers the rest per device (api/workers.py).
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


# The methods a token budget applies to: the offline ones whose micro-batches only split the
# work of a step. KTO is not among them: its KL baseline is a mean over a micro-batch of
# batch_size rows, which a budget would change (preference_losses.kto_loss).
TOKEN_BUDGET_METHODS: tuple[str, ...] = ("supervised", "dpo", "reward_model", "orpo", "simpo")
# Padding-free micro-batches: supervised rows only (pairs keep their chosen/rejected layout).
PADDING_FREE_METHODS: tuple[str, ...] = ("supervised",)


class ResourcesSpec(_Strict):
    """What a job needs of a worker (the ``resources`` extension field).

    ``gpus`` is the number of processes the job runs in, one per device: GPUs on a GPU
    worker, CPU processes (gloo) on a CPU one. ``zero_stage`` 0 is plain data parallelism
    (or one process); 1-3 are DeepSpeed's ZeRO stages. ``worker_class`` names the queue of a
    class of workers (``alignd worker --queues``); None sends the job to the default queue.
    """

    gpus: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="Processes the job runs in, one per device (GPUs, or CPU processes)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="0: plain data parallelism (or one process); 1-3: DeepSpeed ZeRO stages."
    )
    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state in CPU memory (needs zero_stage 1-3)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    precision: Precision = Field(
        "fp32", description="fp32, or bf16/fp16 mixed precision (fp16 on GPUs only)."
    )
    deterministic: bool | None = Field(
        None,
        description=(
            "torch's deterministic algorithms (bit-reproducible runs); null: on on the CPU, "
            "where they cost nothing, off on GPUs, where they cost ~17% of the step."
        ),
    )
    worker_class: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = Field(
        None,
        description="The queue of a class of workers (alignd worker --queues); null: the default.",
    )
    # The levers below change how fast a step runs, never what it computes (docs/methods.md,
    # "Speed levers"): the same rows make an optimizer step, with the same normalisers.
    max_tokens_per_batch: Annotated[int, Field(ge=8, le=16_777_216)] | None = Field(
        None,
        description=(
            "Cut each optimizer step's rows into micro-batches of at most this many tokens "
            "(padded tokens; real tokens with padding_free) per process; null: micro-batches of "
            "batch_size rows. Methods: " + ", ".join(TOKEN_BUDGET_METHODS) + "."
        ),
    )
    padding_free: bool = Field(
        False,
        description=(
            "Supervised: run each micro-batch as one row of its sequences back to back, no "
            "padding, attention kept within each sequence (FlashAttention-2 varlen when "
            "installed, else a block-diagonal mask)."
        ),
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer of the model (regional compilation)."
    )
    liger: bool = Field(
        False,
        description=(
            "Liger kernels (fused RMSNorm, SwiGLU, RoPE); needs a CUDA worker with liger-kernel."
        ),
    )

    @property
    def distributed(self) -> bool:
        """Whether the job runs in launched processes (several, or under DeepSpeed)."""
        return self.gpus > 1 or self.zero_stage > 0

    @model_validator(mode="after")
    def _consistent(self) -> ResourcesSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


# Any method's resolved hyperparameters. TrainSpec's validator parses them with the class of
# the spec's method (so overlapping fields can never pick the wrong one), and SerializeAsAny
# dumps every field of that class, not only the common ones.
AnyHyperparameters = SerializeAsAny[CommonResolved]


class RewardModelRef(_Strict):
    """A trained reward model on the worker's disk: its base and its adapter folder."""

    base: str
    adapter: str | None = None


# The fields only the machine that runs a job knows: the worker sets them (from its
# settings, or to paths of what it downloaded); the spec the API stores leaves them out.
WORKER_FIELDS = frozenset(
    {
        "trust_remote_code",
        "allow_hub",
        "reward_models",
        "reward_http_allowed_hosts",
        "reward_http_timeout_s",
        "resume_from",
        "num_threads",
    }
)


class TrainSpec(_Strict):
    """Everything one run needs; what ``python -m trainer_core run spec.json`` reads.

    As the API stores it (docs/operations.md, "The job spec"), ``model`` is the model's name
    in the models dir (or a hub id), ``train_file``/``validation_file`` are file ids, and the
    ``WORKER_FIELDS`` are absent; the worker replaces the names by local paths and sets those.
    """

    method: MethodType = "supervised"  # type: ignore[valid-type]
    model: str = Field(
        description="Local model folder (Hugging Face format) or a hub id; stored: the name."
    )
    train_file: str = Field(description="Path of the training JSONL file; stored: the file id.")
    validation_file: str | None = None
    seed: int = 42
    max_seq_len: Annotated[int, Field(ge=8, le=1_048_576)] = 1024
    adapter: AdapterSpec = AdapterSpec()
    hyperparameters: AnyHyperparameters
    # Steps between metric points sent to the sink.
    log_every: Annotated[int, Field(ge=1)] = 1
    # Steps between checkpoints; None means one at the end of every epoch (OpenAI's rule).
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    # Only the operator can turn these on (ALIGND_TRUST_REMOTE_CODE, ALIGND_ALLOW_HUB).
    trust_remote_code: bool = False
    allow_hub: bool = False
    # Online methods: the reward functions (graders, as trainer_core.graders validates them),
    # and the reward models they or PPO name, resolved by the worker to local folders.
    reward_functions: list[dict[str, Any]] = Field(default_factory=list)
    reward_model: str | None = None
    reward_models: dict[str, RewardModelRef] = Field(default_factory=dict)
    # Hosts an "http" reward function may POST to (ALIGND_REWARD_HTTP_ALLOWED_HOSTS).
    reward_http_allowed_hosts: list[str] = Field(default_factory=list)
    reward_http_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    # A checkpoint folder (adapter/ + state/) to continue from: pause/resume, or a restart
    # of a failed job from its last checkpoint.
    resume_from: str | None = None
    # torch intra-op threads; None leaves torch's default.
    num_threads: Annotated[int, Field(ge=1)] | None = None
    # Processes, ZeRO stage, precision (the job's ``resources``).
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="before")
    @classmethod
    def _typed_hyperparameters(cls, data: Any) -> Any:
        # Parse the hyperparameters with the method's own model, so a DPO spec can never be
        # read as a supervised one (their fields overlap).
        if isinstance(data, dict) and isinstance(data.get("hyperparameters"), dict):
            resolved_cls = METHODS[data.get("method", "supervised")].resolved
            data = {**data, "hyperparameters": resolved_cls.model_validate(data["hyperparameters"])}
        return data

    @model_validator(mode="after")
    def _levers_of_the_method(self) -> TrainSpec:
        # The API refuses these at creation, naming the field (api/workers.check_resources);
        # this keeps a spec run from the command line as honest.
        r = self.resources
        if r.max_tokens_per_batch is not None and self.method not in TOKEN_BUDGET_METHODS:
            raise ValueError(
                f"resources.max_tokens_per_batch applies to {', '.join(TOKEN_BUDGET_METHODS)}"
            )
        if r.padding_free and self.method not in PADDING_FREE_METHODS:
            raise ValueError(f"resources.padding_free applies to {', '.join(PADDING_FREE_METHODS)}")
        return self

    def stored(self) -> dict[str, Any]:
        """The JSON the API stores on the job: everything but the worker's fields."""
        return self.model_dump(mode="json", exclude=set(WORKER_FIELDS))
