"""What both benchmarks share: tiny models built here, generated data, and TRL set up like us.

Nothing is downloaded: models come from ``trainer_core.tiny_models`` (random weights, a BPE
tokenizer trained offline) and the data is generated from a seed. TRL is the ``bench`` extra
(``pip install -e '.[train,bench]'``); the package never imports this folder.

TRL is configured to do the arithmetic we do: fp32 (``bf16=False``), no gradient
checkpointing, PyTorch AdamW with the same betas/eps/decay, the same schedule, max_length and
logging every step. ``trl_*_trainer`` take the same hyperparameter objects our specs do.
"""

from __future__ import annotations

import json
import random
import resource
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer_core.specs import AdapterSpec
from trainer_core.tiny_models import create_tiny_model

CACHE = Path(tempfile.gettempdir()) / "alignd-bench"

_SUBJECTS = [
    "the cat",
    "a small dog",
    "my friend",
    "the teacher",
    "our team",
    "the robot",
    "a bird",
    "the farmer",
]
_VERBS = [
    "sees",
    "likes",
    "reads",
    "builds",
    "finds",
    "helps",
    "paints",
    "follows",
    "answers",
    "writes",
    "opens",
    "counts",
]
_OBJECTS = [
    "a red apple",
    "the long road",
    "three green boxes",
    "a quiet song",
    "the blue door",
    "an old book",
]
_ENDINGS = [
    "in the morning",
    "after lunch",
    "every day",
    "near the lake",
    "at night",
    "before the rain",
]


def tiny_model(size: str) -> Path:
    """The tiny model of ``size`` (built once, then reused: building is deterministic)."""
    dest = CACHE / "models" / size
    if not (dest / "model.safetensors").is_file():
        create_tiny_model(dest, size=size, seed=0)
    return dest


def _sentences(rng: random.Random, n: int) -> str:
    return " ".join(
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_ENDINGS)}."
        for _ in range(n)
    )


def sft_rows(n: int, *, seed: int, max_sentences: int) -> list[dict[str, str]]:
    """Prompt/completion rows of mixed length: 1..max_sentences sentences (~9 tokens each)
    of prompt and of completion, drawn uniformly."""
    rng = random.Random(seed)
    return [
        {
            "prompt": _sentences(rng, rng.randint(1, max_sentences)) + " Go on:",
            "completion": " " + _sentences(rng, rng.randint(1, max_sentences)),
        }
        for _ in range(n)
    ]


def preference_rows(n: int, *, seed: int, max_sentences: int) -> list[dict[str, str]]:
    """Prompt/chosen/rejected rows of mixed length; the chosen answer is the longer one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, max_sentences), rng.randint(1, max_sentences)
        rows.append(
            {
                "prompt": _sentences(rng, rng.randint(1, max_sentences)) + " Go on:",
                "chosen": " " + _sentences(rng, max(a, b)),
                "rejected": " " + _sentences(rng, min(a, b)),
            }
        )
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- TRL, set up to do our arithmetic ------------------------------------------------------

# Our lr_scheduler -> transformers' (ours "constant" keeps the warmup, as theirs with warmup).
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}

# The offline methods' own hyperparameters as both trainers get them in every speed run
# (bench.speed on the CPU, bench.gpu_speed on a GPU): TRL's defaults, spelt out.
OFFLINE_EXTRA: dict[str, dict[str, Any]] = {
    "supervised": {},
    "dpo": {
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "precompute_ref_log_probs": False,
    },
    "reward_model": {"center_rewards_coefficient": 0.0},
}


def lora_config(adapter: AdapterSpec, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type=task_type,
    )


def trl_common_args(
    hp: Any, *, out_dir: Path, seed: int, max_steps: int, sequential: bool, exact_optimizer: bool
) -> dict[str, Any]:
    """TrainingArguments fields every TRL config here shares.

    ``sequential`` serves the dataset in its own order (parity feeds ours); otherwise TRL's
    default random sampler. ``exact_optimizer`` picks torch's plain AdamW as ours does
    (``adamw_torch``); otherwise TRL's default (fused AdamW on torch >= 2.8).
    """
    args: dict[str, Any] = {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": SCHEDULERS[hp.lr_scheduler],
        "warmup_steps": hp.warmup_ratio,  # < 1 is a ratio, rounded up as ours
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "num_train_epochs": hp.n_epochs,
        "max_steps": max_steps,
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "train_sampling_strategy": "sequential" if sequential else "random",
    }
    if exact_optimizer:
        args["optim"] = "adamw_torch"
    return args


class TrlRecorder:
    """A TrainerCallback (built lazily: transformers is imported only when TRL runs) keeping
    every log line and the wall time of each step."""

    def __new__(cls) -> Any:
        import time

        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):  # type: ignore[misc]
            def __init__(self) -> None:
                self.logs: list[dict[str, float]] = []
                self.began = 0.0
                self.step_times: list[float] = []

            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.began = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.step_times.append(time.perf_counter())

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs:
                    self.logs.append({"step": state.global_step, **logs})

        return _Recorder()
