"""Each method's hyperparameters, twice: as a job body may give them, and as a run uses them.

The *request* classes mirror the OpenAI job body: every hyperparameter may be a number or
``"auto"``, and ``DEFAULTS`` says what "auto" becomes where it does not depend on the data
or the adapter. The *resolved* classes hold concrete values only; they are what a job stores
and shows, and what a method module trains with. ``trainer_core.registry`` pairs them per
method and resolves one into the other.

The field descriptions are the reference users read (they reach ``/openapi.json``);
docs/methods.md has the formulas behind them. No torch here: the API imports this module.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Auto = Literal["auto"]
LrScheduler = Literal["linear", "cosine", "constant"]

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
GrpoScaleRewards = Literal["group", "batch", "none"]
GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

# What each field means, shared by its request and resolved forms (and by every method that
# has it), so that the two schemas never describe one field two ways.
N_EPOCHS = "Passes over the training file."
BATCH_SIZE = (
    "Examples per micro-batch (packed rows with packing; prompts for the online methods). "
    "auto: min(8, number of examples)."
)
LR_MULTIPLIER = (
    "Scales the method's base learning rate (docs/methods.md: e.g. 2e-4 for supervised LoRA)."
)
LEARNING_RATE = "The peak learning rate: the method's base rate times learning_rate_multiplier."
GRAD_ACCUMULATION = "Micro-batches per optimizer step (the loss is normalised over the step)."
WARMUP_RATIO = "Fraction of the steps over which the learning rate warms up linearly from 0."
LR_SCHEDULER = "How the learning rate decays after warm-up."
WEIGHT_DECAY = "AdamW's decoupled weight decay."
MAX_GRAD_NORM = "Gradients are clipped to this global L2 norm."
PACKING = (
    "Best-fit-decreasing packing of several examples into one max_seq_len row; attention "
    "never crosses examples."
)
COMPLETION_ONLY = "prompt/completion rows: the loss covers the completion only (else every token)."
ASSISTANT_ONLY = "chat rows: the loss covers the assistant turns only (else every token)."
DPO_BETA = "Strength of the pull towards the reference: higher keeps the policy closer to it."
DPO_LOSS_TYPE = (
    "One loss, or several combined with loss_weights (e.g. ['sigmoid', 'sft']): "
    + ", ".join(DPO_LOSS_TYPES)
    + "."
)
DPO_LOSS_WEIGHTS = "One weight per loss_type; null weighs each loss 1."
LABEL_SMOOTHING = "Probability that a preference label is flipped (robust, exo_pair, cdpo)."
PRECOMPUTE_REF = (
    "One no-grad pass of the reference before training; the reference then costs nothing."
)
CENTER_REWARDS = (
    "c in c * mean((r_chosen + r_rejected)^2), which keeps rewards centred (0.01 is usual)."
)
KTO_BETA = "Strength of the pull towards the reference."
DESIRABLE_WEIGHT = "Weight of the desirable rows' loss; balance it when the labels are not."
UNDESIRABLE_WEIGHT = "Weight of the undesirable rows' loss; balance it when the labels are not."
ORPO_BETA = "lambda of the paper: the weight of the odds-ratio term beside the NLL."
SIMPO_BETA = "Scale of the length-normalised reward margin (the paper uses 2.0-2.5)."
SIMPO_GAMMA = "Target reward margin (the paper uses 0.5-1.5)."
MAX_COMPLETION = (
    "Longest sampled completion, in tokens (below max_seq_len, which holds the prompt)."
)
TEMPERATURE = "Sampling temperature; log-probs are computed on logits / temperature."
TOP_P = "Nucleus sampling: keep the smallest set of tokens with this much probability."
TOP_K = "Sample among the k most likely tokens; 0 turns it off."
NUM_GENERATIONS = "Completions sampled per prompt: the group whose mean is the baseline."
EPSILON = "Clipping of the importance ratio: [1 - epsilon, 1 + epsilon_high]."
EPSILON_HIGH = "Upper clipping bound (DAPO: 0.28); null means epsilon."
GRPO_BETA = "KL coefficient to the reference (0: no reference at all, TRL's default)."
SCALE_REWARDS = "Advantages divided by the std of the group's, the batch's rewards, or by nothing."
GRPO_LOSS_TYPE = "How per-token losses are aggregated: grpo, bnpo, dr_grpo or dapo."
NUM_ITERATIONS = "Optimizer passes over each rollout (> 1 uses importance ratios against it)."
MASK_TRUNCATED = "Leave completions that never produced EOS out of the loss."
COMPUTE_MULTIPLIER = "OpenAI's knob: num_generations is max(2, round(8 * compute_multiplier))."
EVAL_INTERVAL = "OpenAI's: training steps between evaluations (1-100000, or auto); stored."
EVAL_SAMPLES = "OpenAI's: completions per validation prompt (1-10000, or auto); stored."
REASONING_EFFORT = (
    "OpenAI's; no effect on these models (a value other than default adds a warning event)."
)
RLOO_BETA = "KL coefficient, folded into the reward (TRL: 0.05)."
NORMALIZE_ADVANTAGES = "Whiten the leave-one-out advantages over the batch."
NUM_PPO_EPOCHS = "Optimizer passes over each rollout."
PPO_GAMMA = "Discount of GAE."
PPO_LAM = "lambda of GAE."
CLIPRANGE = "Clipping of the policy's importance ratio."
CLIPRANGE_VALUE = "Clipping of the value head's change, around its rollout value."
VF_COEF = "Weight of the value loss."
KL_COEF = "Per-token KL penalty to the reference, subtracted from the reward."
WHITEN_REWARDS = "Whiten the per-token rewards before GAE."
MISSING_EOS_PENALTY = (
    "Subtracted from the score of a completion that never produced EOS (e.g. 1.0); null: none."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests: what a job body may say (numbers or "auto") ---------------------------------


class CommonRequest(_Strict):
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

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = Field("auto", description=N_EPOCHS)
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field("auto", description=BATCH_SIZE)
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description=LR_MULTIPLIER
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        "auto", description=GRAD_ACCUMULATION
    )
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        "auto", description=WARMUP_RATIO
    )
    lr_scheduler: LrScheduler | Auto = Field("auto", description=LR_SCHEDULER)
    weight_decay: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        "auto", description=WEIGHT_DECAY
    )
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6)] | Auto = Field(
        "auto", description=MAX_GRAD_NORM
    )

    @classmethod
    def finish_resolving(cls, values: dict[str, Any]) -> dict[str, Any]:
        """What a method derives from its other resolved values; most derive nothing."""
        return values


class SupervisedHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CommonRequest.DEFAULTS,
        "packing": False,
        "completion_only_loss": True,
        "assistant_only_loss": True,
    }

    packing: bool | Auto = Field("auto", description=PACKING)
    completion_only_loss: bool | Auto = Field("auto", description=COMPLETION_ONLY)
    assistant_only_loss: bool | Auto = Field("auto", description=ASSISTANT_ONLY)


class DpoHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CommonRequest.DEFAULTS,
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "precompute_ref_log_probs": False,
    }

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field("auto", description=DPO_BETA)
    loss_type: (
        Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]
        | Annotated[
            list[Literal[DPO_LOSS_TYPES]],  # type: ignore[valid-type]
            Field(min_length=1, max_length=len(DPO_LOSS_TYPES)),
        ]
        | Auto
    ) = Field("auto", description=DPO_LOSS_TYPE)
    loss_weights: (
        Annotated[
            list[Annotated[float, Field(ge=0, le=100)]],
            Field(min_length=1, max_length=len(DPO_LOSS_TYPES)),
        ]
        | Auto
        | None
    ) = Field("auto", description=DPO_LOSS_WEIGHTS)
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] | Auto = Field(
        "auto", description=LABEL_SMOOTHING
    )
    precompute_ref_log_probs: bool | Auto = Field("auto", description=PRECOMPUTE_REF)

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

    @classmethod
    def finish_resolving(cls, values: dict[str, Any]) -> dict[str, Any]:
        # One loss type given as a bare name trains as a list of one.
        if isinstance(values["loss_type"], str):
            values["loss_type"] = [values["loss_type"]]
        return values


class RewardModelHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CommonRequest.DEFAULTS,
        "center_rewards_coefficient": 0.0,
    }

    center_rewards_coefficient: Annotated[float, Field(ge=0, le=10)] | Auto = Field(
        "auto", description=CENTER_REWARDS
    )


class KtoHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CommonRequest.DEFAULTS,
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field("auto", description=KTO_BETA)
    desirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description=DESIRABLE_WEIGHT
    )
    undesirable_weight: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description=UNDESIRABLE_WEIGHT
    )


class OrpoHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {**CommonRequest.DEFAULTS, "beta": 0.1}

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field("auto", description=ORPO_BETA)


class SimpoHyperparametersRequest(CommonRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {**CommonRequest.DEFAULTS, "beta": 2.0, "gamma": 0.5}

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field("auto", description=SIMPO_BETA)
    gamma: Annotated[float, Field(ge=0, le=100)] | Auto = Field("auto", description=SIMPO_GAMMA)


class SamplingRequest(CommonRequest):
    """What the online methods share: how completions are sampled from the policy."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CommonRequest.DEFAULTS,
        "max_completion_length": 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    }

    max_completion_length: Annotated[int, Field(ge=1, le=32768)] | Auto = Field(
        "auto", description=MAX_COMPLETION
    )
    temperature: Annotated[float, Field(gt=0, le=10)] | Auto = Field(
        "auto", description=TEMPERATURE
    )
    top_p: Annotated[float, Field(gt=0, le=1)] | Auto = Field("auto", description=TOP_P)
    top_k: Annotated[int, Field(ge=0, le=100000)] | Auto = Field("auto", description=TOP_K)


class GrpoHyperparametersRequest(SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **SamplingRequest.DEFAULTS,
        "num_generations": 8,
        "epsilon": 0.2,
        "epsilon_high": None,
        "beta": 0.0,
        "scale_rewards": "group",
        "loss_type": "dapo",
        "num_iterations": 1,
        "mask_truncated_completions": False,
    }

    num_generations: Annotated[int, Field(ge=2, le=256)] | Auto = Field(
        "auto", description=NUM_GENERATIONS
    )
    epsilon: Annotated[float, Field(gt=0, lt=1)] | Auto = Field("auto", description=EPSILON)
    epsilon_high: Annotated[float, Field(gt=0, lt=10)] | Auto | None = Field(
        "auto", description=EPSILON_HIGH
    )
    beta: Annotated[float, Field(ge=0, le=10)] | Auto = Field("auto", description=GRPO_BETA)
    scale_rewards: GrpoScaleRewards | Auto = Field("auto", description=SCALE_REWARDS)
    loss_type: GrpoLossType | Auto = Field("auto", description=GRPO_LOSS_TYPE)
    num_iterations: Annotated[int, Field(ge=1, le=16)] | Auto = Field(
        "auto", description=NUM_ITERATIONS
    )
    mask_truncated_completions: bool | Auto = Field("auto", description=MASK_TRUNCATED)


class ReinforcementHyperparametersRequest(CommonRequest):
    """OpenAI's reinforcement hyperparameters; mapped onto GRPO's (docs/methods.md)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **GrpoHyperparametersRequest.DEFAULTS,
        "compute_multiplier": 1.0,
        # OpenAI echoes "auto" for these, never a number it picked: so do we.
        "eval_interval": "auto",
        "eval_samples": "auto",
        "reasoning_effort": "default",
    }

    compute_multiplier: Annotated[float, Field(gt=0, le=32)] | Auto = Field(
        "auto", description=COMPUTE_MULTIPLIER
    )
    # Unbounded, 10**30 was accepted and stored (issue 13); every number has both bounds.
    eval_interval: Annotated[int, Field(ge=1, le=100_000)] | Auto = Field(
        "auto", description=EVAL_INTERVAL
    )
    eval_samples: Annotated[int, Field(ge=1, le=10_000)] | Auto = Field(
        "auto", description=EVAL_SAMPLES
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] | Auto = Field(
        "auto", description=REASONING_EFFORT
    )

    @classmethod
    def finish_resolving(cls, values: dict[str, Any]) -> dict[str, Any]:
        # OpenAI's compute_multiplier buys more samples per prompt.
        values["num_generations"] = max(2, round(8 * values["compute_multiplier"]))
        return values


class RlooHyperparametersRequest(SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **SamplingRequest.DEFAULTS,
        "num_generations": 2,
        "epsilon": 0.2,
        "beta": 0.05,
        "normalize_advantages": False,
        "num_iterations": 1,
    }

    num_generations: Annotated[int, Field(ge=2, le=256)] | Auto = Field(
        "auto", description=NUM_GENERATIONS
    )
    epsilon: Annotated[float, Field(gt=0, lt=1)] | Auto = Field("auto", description=EPSILON)
    beta: Annotated[float, Field(ge=0, le=10)] | Auto = Field("auto", description=RLOO_BETA)
    normalize_advantages: bool | Auto = Field("auto", description=NORMALIZE_ADVANTAGES)
    num_iterations: Annotated[int, Field(ge=1, le=16)] | Auto = Field(
        "auto", description=NUM_ITERATIONS
    )


class PpoHyperparametersRequest(SamplingRequest):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **SamplingRequest.DEFAULTS,
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

    num_ppo_epochs: Annotated[int, Field(ge=1, le=64)] | Auto = Field(
        "auto", description=NUM_PPO_EPOCHS
    )
    gamma: Annotated[float, Field(ge=0, le=1)] | Auto = Field("auto", description=PPO_GAMMA)
    lam: Annotated[float, Field(ge=0, le=1)] | Auto = Field("auto", description=PPO_LAM)
    cliprange: Annotated[float, Field(gt=0, lt=1)] | Auto = Field("auto", description=CLIPRANGE)
    cliprange_value: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description=CLIPRANGE_VALUE
    )
    vf_coef: Annotated[float, Field(ge=0, le=100)] | Auto = Field("auto", description=VF_COEF)
    kl_coef: Annotated[float, Field(ge=0, le=10)] | Auto = Field("auto", description=KL_COEF)
    whiten_rewards: bool | Auto = Field("auto", description=WHITEN_REWARDS)
    missing_eos_penalty: Annotated[float, Field(ge=0, le=100)] | Auto | None = Field(
        "auto", description=MISSING_EOS_PENALTY
    )


# -- resolved: what a run trains with (no "auto" left) -------------------------------------


class CommonResolved(_Strict):
    n_epochs: int = Field(description=N_EPOCHS)
    batch_size: int = Field(description=BATCH_SIZE)
    learning_rate_multiplier: float = Field(description=LR_MULTIPLIER)
    learning_rate: float = Field(description=LEARNING_RATE)
    gradient_accumulation_steps: int = Field(description=GRAD_ACCUMULATION)
    warmup_ratio: float = Field(description=WARMUP_RATIO)
    lr_scheduler: LrScheduler = Field(description=LR_SCHEDULER)
    weight_decay: float = Field(description=WEIGHT_DECAY)
    max_grad_norm: float = Field(description=MAX_GRAD_NORM)


class SupervisedHyperparameters(CommonResolved):
    packing: bool = Field(False, description=PACKING)
    completion_only_loss: bool = Field(True, description=COMPLETION_ONLY)
    assistant_only_loss: bool = Field(True, description=ASSISTANT_ONLY)


class DpoHyperparameters(CommonResolved):
    beta: float = Field(description=DPO_BETA)
    loss_type: list[str] = Field(description=DPO_LOSS_TYPE)
    loss_weights: list[float] | None = Field(description=DPO_LOSS_WEIGHTS)
    label_smoothing: float = Field(description=LABEL_SMOOTHING)
    precompute_ref_log_probs: bool = Field(description=PRECOMPUTE_REF)


class RewardModelHyperparameters(CommonResolved):
    center_rewards_coefficient: float = Field(description=CENTER_REWARDS)


class KtoHyperparameters(CommonResolved):
    beta: float = Field(description=KTO_BETA)
    desirable_weight: float = Field(description=DESIRABLE_WEIGHT)
    undesirable_weight: float = Field(description=UNDESIRABLE_WEIGHT)


class OrpoHyperparameters(CommonResolved):
    beta: float = Field(description=ORPO_BETA)


class SimpoHyperparameters(CommonResolved):
    beta: float = Field(description=SIMPO_BETA)
    gamma: float = Field(description=SIMPO_GAMMA)


class SamplingResolved(CommonResolved):
    max_completion_length: int = Field(description=MAX_COMPLETION)
    temperature: float = Field(description=TEMPERATURE)
    top_p: float = Field(description=TOP_P)
    top_k: int = Field(description=TOP_K)


class GrpoHyperparameters(SamplingResolved):
    num_generations: int = Field(description=NUM_GENERATIONS)
    epsilon: float = Field(description=EPSILON)
    epsilon_high: float | None = Field(description=EPSILON_HIGH)
    beta: float = Field(description=GRPO_BETA)
    scale_rewards: GrpoScaleRewards = Field(description=SCALE_REWARDS)
    loss_type: GrpoLossType = Field(description=GRPO_LOSS_TYPE)
    num_iterations: int = Field(description=NUM_ITERATIONS)
    mask_truncated_completions: bool = Field(description=MASK_TRUNCATED)


class ReinforcementHyperparameters(GrpoHyperparameters):
    compute_multiplier: float = Field(description=COMPUTE_MULTIPLIER)
    eval_interval: Annotated[int, Field(ge=1)] | Auto = Field(description=EVAL_INTERVAL)
    eval_samples: Annotated[int, Field(ge=1)] | Auto = Field(description=EVAL_SAMPLES)
    reasoning_effort: str = Field(description=REASONING_EFFORT)

    @field_validator("eval_interval", "eval_samples", mode="before")
    @classmethod
    def _zero_was_auto(cls, value: Any) -> Any:
        # Jobs stored before these echoed "auto" hold 0 for it; OpenAI's schema wants >= 1.
        return "auto" if value == 0 else value


class RlooHyperparameters(SamplingResolved):
    num_generations: int = Field(description=NUM_GENERATIONS)
    epsilon: float = Field(description=EPSILON)
    beta: float = Field(description=RLOO_BETA)
    normalize_advantages: bool = Field(description=NORMALIZE_ADVANTAGES)
    num_iterations: int = Field(description=NUM_ITERATIONS)


class PpoHyperparameters(SamplingResolved):
    num_ppo_epochs: int = Field(description=NUM_PPO_EPOCHS)
    gamma: float = Field(description=PPO_GAMMA)
    lam: float = Field(description=PPO_LAM)
    cliprange: float = Field(description=CLIPRANGE)
    cliprange_value: float = Field(description=CLIPRANGE_VALUE)
    vf_coef: float = Field(description=VF_COEF)
    kl_coef: float = Field(description=KL_COEF)
    whiten_rewards: bool = Field(description=WHITEN_REWARDS)
    missing_eos_penalty: float | None = Field(description=MISSING_EOS_PENALTY)
