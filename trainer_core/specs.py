"""What a training run is asked to do: plain pydantic models, no torch.

Two layers live here. The *request* models mirror the OpenAI job body (every hyperparameter
may be ``"auto"``) and are what the API validates a POST against. ``resolve`` turns a request
into a concrete ``TrainSpec`` with every "auto" replaced by a documented default, so the
resolved values can be stored on the job and shown back to the user before training starts.

This module must stay importable without torch: the API imports it to validate job bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Auto = Literal["auto"]
LrScheduler = Literal["linear", "cosine", "constant"]

# Base learning rates that ``learning_rate_multiplier`` scales, per method and adapter type.
# LoRA tolerates (and needs) a far larger rate than full fine-tuning; these are the usual
# starting points of the PEFT and TRL examples (TRL: SFT 2e-5, DPO 1e-6, reward 1e-4 full).
BASE_LEARNING_RATE: dict[str, dict[str, float]] = {
    "supervised": {"lora": 2e-4, "full": 2e-5},
    "dpo": {"lora": 5e-5, "full": 1e-6},
    "kto": {"lora": 5e-5, "full": 1e-6},
    "orpo": {"lora": 5e-5, "full": 1e-6},
    "simpo": {"lora": 5e-5, "full": 1e-6},
    "reward_model": {"lora": 1e-4, "full": 1e-5},
    "grpo": {"lora": 1e-5, "full": 1e-6},
    "reinforcement": {"lora": 1e-5, "full": 1e-6},
    "rloo": {"lora": 1e-5, "full": 1e-6},
    "ppo": {"lora": 1e-5, "full": 1e-6},
}
DEFAULT_N_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8

DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "exo_pair",
    "cdpo",
    "sft",
)


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


# Methods that run under DeepSpeed (ZeRO 1-3) and across several processes.
DISTRIBUTED_METHODS = ("supervised", "reward_model", "dpo")
PRECISIONS = ("fp32", "bf16", "fp16")


class ResourcesSpec(_Strict):
    """What a job needs of a worker (the ``resources`` extension field).

    ``gpus`` is the number of processes the job runs in, one per device: GPUs on a GPU
    worker, CPU processes (gloo) on a CPU one. ``zero_stage`` 0 is plain data parallelism
    (or one process); 1-3 are DeepSpeed's ZeRO stages. ``worker_class`` names the queue of a
    class of workers (``alignd worker --queues``); None sends the job to the default queue.
    """

    gpus: Annotated[int, Field(ge=1, le=64)] = 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    worker_class: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = None

    @property
    def distributed(self) -> bool:
        """Whether the job runs in launched processes (several, or under DeepSpeed)."""
        return self.gpus > 1 or self.zero_stage > 0

    @model_validator(mode="after")
    def _consistent(self) -> ResourcesSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


# -- requests: what a job body may say (numbers or "auto") ---------------------------------


class _CommonRequest(_Strict):
    """OpenAI's three hyperparameters plus the optimizer ones every method shares."""

    # Defaults for "auto" that do not depend on the data or the adapter.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "n_epochs": DEFAULT_N_EPOCHS,
        "learning_rate_multiplier": 1.0,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "linear",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    lr_scheduler: LrScheduler | Auto = "auto"
    weight_decay: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6)] | Auto = "auto"


class SupervisedHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_CommonRequest.DEFAULTS,
        "packing": False,
        "completion_only_loss": True,
        "assistant_only_loss": True,
    }

    # Best-fit-decreasing packing of several rows into one max_seq_len sequence.
    packing: bool | Auto = "auto"
    # prompt/completion rows: loss on the completion only (else on every token).
    completion_only_loss: bool | Auto = "auto"
    # chat rows: loss on assistant turns only (else on every token).
    assistant_only_loss: bool | Auto = "auto"


class DpoHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_CommonRequest.DEFAULTS,
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "precompute_ref_log_probs": False,
    }

    # Strength of the pull towards the reference: higher keeps the policy closer to it.
    beta: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    # One loss, or several combined with loss_weights (e.g. ["sigmoid", "sft"]).
    loss_type: Literal[DPO_LOSS_TYPES] | list[Literal[DPO_LOSS_TYPES]] | Auto = "auto"  # type: ignore[valid-type]
    loss_weights: list[Annotated[float, Field(ge=0)]] | Auto | None = "auto"
    # Probability that a preference label is flipped (robust, exo_pair, cdpo).
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] | Auto = "auto"
    # One no-grad pass of the reference before training; the reference then costs nothing.
    precompute_ref_log_probs: bool | Auto = "auto"

    @model_validator(mode="after")
    def _weights_match(self) -> DpoHyperparametersRequest:
        types = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        if (
            isinstance(self.loss_weights, list)
            and "auto" not in types
            and len(self.loss_weights) != len(types)
        ):
            raise ValueError("loss_weights needs one weight per loss_type")
        if "exo_pair" in types and self.label_smoothing in ("auto", 0.0):
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (1e-3 is usual)")
        return self


class RewardModelHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_CommonRequest.DEFAULTS,
        "center_rewards_coefficient": 0.0,
    }

    # c in c * mean((r_chosen + r_rejected)^2), keeping rewards centred (0.01 is usual).
    center_rewards_coefficient: Annotated[float, Field(ge=0, le=10)] | Auto = "auto"


class KtoHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_CommonRequest.DEFAULTS,
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    # Weights of the desirable and undesirable losses; balance them when the labels are not.
    desirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    undesirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"


class OrpoHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {**_CommonRequest.DEFAULTS, "beta": 0.1}

    # lambda of the paper: the weight of the odds-ratio term beside the NLL.
    beta: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"


class SimpoHyperparametersRequest(_CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {**_CommonRequest.DEFAULTS, "beta": 2.0, "gamma": 0.5}

    # Scale of the length-normalised reward margin (the paper uses 2.0-2.5).
    beta: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    # Target reward margin (the paper uses 0.5-1.5).
    gamma: Annotated[float, Field(ge=0, le=100)] | Auto = "auto"


class _SamplingRequest(_CommonRequest):
    """What the online methods share: how completions are sampled from the policy."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_CommonRequest.DEFAULTS,
        "max_completion_length": 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    }

    # batch_size counts prompts; each is sampled num_generations times.
    max_completion_length: Annotated[int, Field(ge=1, le=32768)] | Auto = "auto"
    temperature: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"
    top_p: Annotated[float, Field(gt=0, le=1)] | Auto = "auto"
    top_k: Annotated[int, Field(ge=0, le=100000)] | Auto = "auto"  # 0 = off


class GrpoHyperparametersRequest(_SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_SamplingRequest.DEFAULTS,
        "num_generations": 8,
        "epsilon": 0.2,
        "epsilon_high": None,
        "beta": 0.0,
        "scale_rewards": "group",
        "loss_type": "dapo",
        "num_iterations": 1,
        "mask_truncated_completions": False,
    }

    # Completions per prompt: the group whose mean is the baseline.
    num_generations: Annotated[int, Field(ge=2, le=256)] | Auto = "auto"
    # Clipping of the importance ratio: [1 - epsilon, 1 + epsilon_high] (DAPO: 0.28 above).
    epsilon: Annotated[float, Field(gt=0, lt=1)] | Auto = "auto"
    epsilon_high: Annotated[float, Field(gt=0, lt=10)] | Auto | None = "auto"
    # KL coefficient to the reference (0 = no reference at all, TRL's default).
    beta: Annotated[float, Field(ge=0, le=10)] | Auto = "auto"
    scale_rewards: Literal["group", "batch", "none"] | Auto = "auto"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] | Auto = "auto"
    # Optimizer passes over each rollout (> 1 uses importance ratios against it).
    num_iterations: Annotated[int, Field(ge=1, le=16)] | Auto = "auto"
    mask_truncated_completions: bool | Auto = "auto"


class ReinforcementHyperparametersRequest(_CommonRequest):
    """OpenAI's reinforcement hyperparameters; mapped onto GRPO's (docs/methods.md)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **GrpoHyperparametersRequest.DEFAULTS,
        "compute_multiplier": 1.0,
        "eval_interval": 0,
        "eval_samples": 0,
        "reasoning_effort": "default",
    }

    # OpenAI's knobs: compute_multiplier scales num_generations (8 x multiplier, at least 2).
    compute_multiplier: Annotated[float, Field(gt=0, le=32)] | Auto = "auto"
    eval_interval: Annotated[int, Field(ge=0)] | Auto = "auto"
    eval_samples: Annotated[int, Field(ge=0)] | Auto = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] | Auto = "auto"


class RlooHyperparametersRequest(_SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_SamplingRequest.DEFAULTS,
        "num_generations": 2,
        "epsilon": 0.2,
        "beta": 0.05,
        "normalize_advantages": False,
        "num_iterations": 1,
    }

    num_generations: Annotated[int, Field(ge=2, le=256)] | Auto = "auto"
    epsilon: Annotated[float, Field(gt=0, lt=1)] | Auto = "auto"
    # KL coefficient, folded into the reward (TRL: 0.05).
    beta: Annotated[float, Field(ge=0, le=10)] | Auto = "auto"
    normalize_advantages: bool | Auto = "auto"
    num_iterations: Annotated[int, Field(ge=1, le=16)] | Auto = "auto"


class PpoHyperparametersRequest(_SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **_SamplingRequest.DEFAULTS,
        "num_ppo_epochs": 4,
        "gamma": 1.0,
        "lam": 0.95,
        "cliprange": 0.2,
        "cliprange_value": 0.2,
        "vf_coef": 0.1,
        "kl_coef": 0.05,
        "whiten_rewards": False,
        "missing_eos_penalty": None,
    }

    num_ppo_epochs: Annotated[int, Field(ge=1, le=64)] | Auto = "auto"
    gamma: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    lam: Annotated[float, Field(ge=0, le=1)] | Auto = "auto"
    cliprange: Annotated[float, Field(gt=0, lt=1)] | Auto = "auto"
    cliprange_value: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    vf_coef: Annotated[float, Field(ge=0, le=100)] | Auto = "auto"
    # Per-token KL penalty to the reference, subtracted from the reward.
    kl_coef: Annotated[float, Field(ge=0, le=10)] | Auto = "auto"
    whiten_rewards: bool | Auto = "auto"
    # Subtracted from the score of a completion that never produced EOS (e.g. 1.0).
    missing_eos_penalty: Annotated[float, Field(ge=0, le=100)] | Auto | None = "auto"


# -- resolved: what a run trains with (no "auto" left) -------------------------------------


class _CommonResolved(_Strict):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    gradient_accumulation_steps: int
    warmup_ratio: float
    lr_scheduler: LrScheduler
    weight_decay: float
    max_grad_norm: float


class SupervisedHyperparameters(_CommonResolved):
    packing: bool = False
    completion_only_loss: bool = True
    assistant_only_loss: bool = True


class DpoHyperparameters(_CommonResolved):
    beta: float
    loss_type: list[str]
    loss_weights: list[float] | None
    label_smoothing: float
    precompute_ref_log_probs: bool


class RewardModelHyperparameters(_CommonResolved):
    center_rewards_coefficient: float


class KtoHyperparameters(_CommonResolved):
    beta: float
    desirable_weight: float
    undesirable_weight: float


class OrpoHyperparameters(_CommonResolved):
    beta: float


class SimpoHyperparameters(_CommonResolved):
    beta: float
    gamma: float


class _SamplingResolved(_CommonResolved):
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int


class GrpoHyperparameters(_SamplingResolved):
    num_generations: int
    epsilon: float
    epsilon_high: float | None
    beta: float
    scale_rewards: Literal["group", "batch", "none"]
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"]
    num_iterations: int
    mask_truncated_completions: bool


class ReinforcementHyperparameters(GrpoHyperparameters):
    compute_multiplier: float
    eval_interval: int
    eval_samples: int
    reasoning_effort: str


class RlooHyperparameters(_SamplingResolved):
    num_generations: int
    epsilon: float
    beta: float
    normalize_advantages: bool
    num_iterations: int


class PpoHyperparameters(_SamplingResolved):
    num_ppo_epochs: int
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    kl_coef: float
    whiten_rewards: bool
    missing_eos_penalty: float | None


# method type -> (request model, resolved model). The API rejects a type not here.
METHODS: dict[str, tuple[type[_CommonRequest], type[_CommonResolved]]] = {
    "supervised": (SupervisedHyperparametersRequest, SupervisedHyperparameters),
    "dpo": (DpoHyperparametersRequest, DpoHyperparameters),
    "reward_model": (RewardModelHyperparametersRequest, RewardModelHyperparameters),
    "kto": (KtoHyperparametersRequest, KtoHyperparameters),
    "orpo": (OrpoHyperparametersRequest, OrpoHyperparameters),
    "simpo": (SimpoHyperparametersRequest, SimpoHyperparameters),
    "grpo": (GrpoHyperparametersRequest, GrpoHyperparameters),
    "reinforcement": (ReinforcementHyperparametersRequest, ReinforcementHyperparameters),
    "rloo": (RlooHyperparametersRequest, RlooHyperparameters),
    "ppo": (PpoHyperparametersRequest, PpoHyperparameters),
}
METHOD_HYPERPARAMETERS: dict[str, type[BaseModel]] = {
    name: pair[0] for name, pair in METHODS.items()
}

# method type -> the dataset formats (as the file validator names them) it can train on.
# KTO takes paired preference data too: each pair becomes one desirable and one undesirable row.
METHOD_DATASET_FORMATS: dict[str, tuple[str, ...]] = {
    "supervised": ("chat", "prompt_completion", "text"),
    "dpo": ("preference",),
    "reward_model": ("preference",),
    "kto": ("kto", "preference"),
    "orpo": ("preference",),
    "simpo": ("preference",),
    # Online methods sample their own completions: prompts only (extra keys feed graders).
    "grpo": ("prompt_only",),
    "reinforcement": ("prompt_only",),
    "rloo": ("prompt_only",),
    "ppo": ("prompt_only",),
}

# method type -> the options its block may carry beside "hyperparameters", and which of
# them a job must give. Reward functions are validated by trainer_core.graders.
METHOD_OPTIONS: dict[str, dict[str, bool]] = {
    "grpo": {"reward_functions": True},
    "rloo": {"reward_functions": True},
    "reinforcement": {"grader": True},
    "ppo": {"reward_model": True},
}


def resolve_hyperparameters(
    method_type: str, request: BaseModel, *, adapter_type: str, n_examples: int
) -> _CommonResolved:
    """Replace every "auto" with its documented default (docs/methods.md)."""
    request_cls, resolved_cls = METHODS[method_type]
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
    if method_type == "dpo" and isinstance(values["loss_type"], str):
        values["loss_type"] = [values["loss_type"]]
    if method_type == "reinforcement":
        # OpenAI's compute_multiplier buys more samples per prompt.
        values["num_generations"] = max(2, round(8 * values["compute_multiplier"]))
    values["batch_size"] = (
        max(1, min(MAX_AUTO_BATCH_SIZE, n_examples))
        if request.batch_size == "auto"
        else request.batch_size
    )
    values["learning_rate"] = (
        BASE_LEARNING_RATE[method_type][adapter_type] * values["learning_rate_multiplier"]
    )
    return resolved_cls(**values)


def resolve_supervised(
    request: SupervisedHyperparametersRequest, *, adapter_type: str, n_examples: int
) -> SupervisedHyperparameters:
    resolved = resolve_hyperparameters(
        "supervised", request, adapter_type=adapter_type, n_examples=n_examples
    )
    assert isinstance(resolved, SupervisedHyperparameters)
    return resolved


AnyHyperparameters = (
    SupervisedHyperparameters
    | DpoHyperparameters
    | RewardModelHyperparameters
    | KtoHyperparameters
    | OrpoHyperparameters
    | SimpoHyperparameters
    | GrpoHyperparameters
    | ReinforcementHyperparameters
    | RlooHyperparameters
    | PpoHyperparameters
)
MethodType = Literal[
    "supervised",
    "dpo",
    "reward_model",
    "kto",
    "orpo",
    "simpo",
    "grpo",
    "reinforcement",
    "rloo",
    "ppo",
]


class RewardModelRef(_Strict):
    """A trained reward model on the worker's disk: its base and its adapter folder."""

    base: str
    adapter: str | None = None


class TrainSpec(_Strict):
    """Everything one run needs; what ``python -m trainer_core run spec.json`` reads."""

    method: MethodType = "supervised"
    model: str = Field(description="Local model folder (Hugging Face format) or a hub id.")
    train_file: str = Field(description="Path of the training JSONL file.")
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
            resolved_cls = METHODS[data.get("method", "supervised")][1]
            data = {**data, "hyperparameters": resolved_cls.model_validate(data["hyperparameters"])}
        return data
