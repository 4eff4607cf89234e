"""One training run of ours or of TRL on a spec, reporting per-step metrics, time and tokens.

``run_ours`` goes through ``trainer_core.run`` like a job does. For parity it can also record
the order in which our run served the rows and the adapter it started from, so that TRL can be
given the same order (a sequential sampler over the reordered rows) and the same initial
weights: ``Capture``. It records them by wrapping the loop's ``apply_adapter`` (every method
builds its policy through ``loop.policy``) and the method module's collate function, from the
outside; nothing in ``trainer_core`` knows about it.

Metric names are ours; TRL's are renamed (``TRL_NAMES``).
"""

from __future__ import annotations

import importlib
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import TrlRecorder, lora_config, peak_rss_mib, trl_common_args

# TRL log key -> our metric name, per method (the preference methods log TRL's names).
_COMMON = {
    "loss": "train_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
    "num_tokens": "num_tokens",
}
_DPO = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
TRL_NAMES: dict[str, dict[str, str]] = {
    "supervised": {**_COMMON, "mean_token_accuracy": "train_mean_token_accuracy"},
    "dpo": {**_COMMON, **{n: n for n in [*_DPO, "logps/chosen", "logps/rejected"]}},
    "reward_model": {
        **_COMMON,
        **{n: n for n in ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"]},
    },
}

# The function each method module batches its rows with (wrapped to record the order).
COLLATE_NAMES = {
    "supervised": "make_batch",
    "dpo": "collate_pairs",
    "reward_model": "collate_pairs",
}


@dataclass
class Run:
    steps: list[dict[str, float]]  # one dict of metrics per optimizer step, in our names
    seconds: float  # wall time of the training steps (model and data loading excluded)
    tokens: int  # non-padding tokens trained on in that time
    peak_rss_mib: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Capture:
    """What our run did that TRL must repeat: row order (0-based file rows, one list per
    micro-batch) and the trainable weights it started from."""

    order: list[list[int]] = field(default_factory=list)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)


class _TimingSink:
    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []
        self.events: list[str] = []
        self.began = 0.0
        self.last = 0.0

    def start(self, total_steps: int) -> None:
        self.began = time.perf_counter()

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.last = time.perf_counter()
        self.points.append((step, dict(values)))

    def event(self, message: str, *, level: str = "info", data: Any = None) -> None:
        self.events.append(message)


class _NoStore:
    """Checkpoints are thrown away (their time is outside the timed window anyway)."""

    def save(self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool) -> None:
        pass


def run_ours(spec: Any, capture: Capture | None = None) -> Run:
    import trainer_core

    module = importlib.import_module(f"trainer_core.methods.{spec.method}")
    loop = importlib.import_module("trainer_core.loop")
    patches: list[tuple[Any, str, Callable[..., Any]]] = []
    if capture is not None:
        real_apply, real_collate = loop.apply_adapter, getattr(module, COLLATE_NAMES[spec.method])

        def apply_and_keep(model: Any, adapter: Any, *args: Any, **kw: Any) -> Any:
            wrapped = real_apply(model, adapter, *args, **kw)
            capture.initial = {
                name: p.detach().clone()
                for name, p in wrapped.named_parameters()
                if p.requires_grad
            }
            return wrapped

        def collate_and_keep(rows: Any, *args: Any, **kw: Any) -> Any:
            if not torch.is_grad_enabled():  # a reference or evaluation pass: not a step
                return real_collate(rows, *args, **kw)
            capture.order.append([row.line - 1 for row in rows])
            return real_collate(rows, *args, **kw)

        patches = [
            (loop, "apply_adapter", apply_and_keep),
            (module, COLLATE_NAMES[spec.method], collate_and_keep),
        ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    sink = _TimingSink()
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        result = trainer_core.run(spec, sink, _NoStore())  # type: ignore[arg-type]
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    steps = [{"step": float(step), **values} for step, values in sink.points]
    return Run(steps, sink.last - sink.began, result.trained_tokens, peak_rss_mib())


def run_trl(
    spec: Any,
    rows: list[dict[str, Any]],
    *,
    max_steps: int,
    capture: Capture | None = None,
) -> Run:
    """TRL on the same spec. With ``capture``: our row order and initial weights, torch's
    plain AdamW; without: TRL's own random order and its default (fused) AdamW."""
    import datasets
    from transformers import PrinterCallback
    from transformers.utils import logging as transformers_logging

    from trainer_core.models import load_tokenizer

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # TRL's own deprecations

    if capture is not None:
        rows = [rows[i] for batch in capture.order for i in batch]
    tokenizer = load_tokenizer(spec.model)
    out_dir = Path(tempfile.mkdtemp(prefix="trl-"))
    common = trl_common_args(
        spec.hyperparameters,
        out_dir=out_dir,
        seed=spec.seed,
        max_steps=max_steps,
        sequential=capture is not None,
        exact_optimizer=capture is not None,
    )
    peft_config = None
    if spec.adapter.type == "lora":
        task = "SEQ_CLS" if spec.method == "reward_model" else "CAUSAL_LM"
        peft_config = lora_config(spec.adapter, task)
    recorder = TrlRecorder()
    trainer = trl_trainer(spec, tokenizer, common, rows, peft_config, recorder)
    trainer.remove_callback(PrinterCallback)  # it prints every log line
    if capture is not None:
        _copy_initial(trainer.model, capture.initial)
    trainer.train()
    names = TRL_NAMES[spec.method]
    steps = [
        {
            "step": float(log["step"]),
            **{ours: log[theirs] for theirs, ours in names.items() if theirs in log},
        }
        for log in recorder.logs
    ]
    tokens = int(recorder.logs[-1].get("num_tokens", 0)) if recorder.logs else 0
    return Run(steps, recorder.step_times[-1] - recorder.began, tokens, peak_rss_mib())


def trl_trainer(
    spec: Any,
    tokenizer: Any,
    common: dict[str, Any],
    rows: list[dict[str, Any]],
    peft_config: Any,
    callback: Any,
) -> Any:
    """TRL's trainer for ``spec.method`` (not GRPO) on ``rows``, with ``common`` arguments and
    one callback: built the same way for the CPU parity/speed runs and the GPU benchmark."""
    from datasets import Dataset

    from trainer_core.models import load_model

    trainer_cls, args, model = _TRL_SETUPS[spec.method](spec, tokenizer, common, load_model)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )


def _copy_initial(model: Any, initial: Mapping[str, torch.Tensor]) -> None:
    """Start TRL's model from our initial trainable weights (LoRA's A is random)."""
    params = dict(model.named_parameters())
    missing = [name for name in initial if name not in params]
    if missing:
        raise RuntimeError(f"TRL's model has no parameter {missing[0]!r}")
    with torch.no_grad():
        for name, value in initial.items():
            params[name].copy_(value)


# Per method: TRL's trainer class, its config (our hyperparameters in TRL's names) and the
# model it starts from; run_trl builds the trainer the same way for all of them.
_TrlSetup = tuple[Any, Any, Any]


def _sft_setup(
    spec: Any, tokenizer: Any, common: dict[str, Any], load_model: Callable[[str], Any]
) -> _TrlSetup:
    from trl import SFTConfig, SFTTrainer

    hp = spec.hyperparameters
    args = SFTConfig(
        **common,
        max_length=spec.max_seq_len,
        completion_only_loss=hp.completion_only_loss,
        assistant_only_loss=False,
        packing=hp.packing,
        dataset_num_proc=None,
    )
    return SFTTrainer, args, load_model(spec.model)


def _dpo_setup(
    spec: Any, tokenizer: Any, common: dict[str, Any], load_model: Callable[[str], Any]
) -> _TrlSetup:
    from trl import DPOConfig, DPOTrainer

    hp = spec.hyperparameters
    args = DPOConfig(
        **common,
        max_length=spec.max_seq_len,
        beta=hp.beta,
        loss_type=list(hp.loss_type),
        loss_weights=hp.loss_weights,
        label_smoothing=hp.label_smoothing,
        precompute_ref_log_probs=hp.precompute_ref_log_probs,
        dataset_num_proc=None,
    )
    return DPOTrainer, args, load_model(spec.model)


def _reward_setup(
    spec: Any, tokenizer: Any, common: dict[str, Any], load_model: Callable[[str], Any]
) -> _TrlSetup:
    from trl import RewardConfig, RewardTrainer

    from trainer_core.reward_models import load_reward_base

    hp = spec.hyperparameters
    args = RewardConfig(
        **common,
        max_length=spec.max_seq_len,
        center_rewards_coefficient=hp.center_rewards_coefficient or None,
        dataset_num_proc=None,
    )
    return RewardTrainer, args, load_reward_base(spec.model, pad_token_id=tokenizer.pad_token_id)


_TRL_SETUPS: dict[str, Callable[..., _TrlSetup]] = {
    "supervised": _sft_setup,
    "dpo": _dpo_setup,
    "reward_model": _reward_setup,
}
