"""Speed and peak memory of our GRPO and RLOO beside TRL's, on the same tiny models and prompts.

    .venv/bin/python -m bench.online_speed [--sizes 1m 30m] [--methods grpo rloo]
                                           [--adapters lora full] [--markdown FILE]

Each configuration (size × method × adapter × trainer) runs in its own subprocess, so its
peak RSS is its own. A run takes ``STEPS[size]`` optimizer steps of ``PROMPTS_PER_STEP``
prompts × ``NUM_GENERATIONS`` completions of at most ``MAX_COMPLETION_LENGTH`` tokens, in fp32
on 2 torch threads, rewarded by a length function (graders' ``length`` for ours, the same
formula as a Python callable for TRL). Tokens/s counts the non-padding prompt and completion
tokens of the rollouts (TRL's ``num_tokens``) over the wall time from the first step to the
last (model loading excluded). The random models almost never emit EOS, so both sides
generate the full 16 tokens per completion.

Held equal: the hyperparameters each method's defaults give (GRPO: β = 0, dapo; RLOO:
β = 0.05, so both load a reference), one optimizer step per rollout (TRL's
``steps_per_generation`` = 1), no gradient checkpointing, fp32. What differs is how the work
is done: TRL samples with ``model.generate`` on G copies of every prompt and scores whole
padded rows; ours prefills each prompt once and samples G times from its cache (on merged
LoRA weights), and scores the completions on top of one shared forward of each prompt
(``trainer_core.generation``).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import warnings
from datetime import date
from pathlib import Path
from typing import Any

from bench.common import _sentences, peak_rss_mib, tiny_model, write_jsonl
from bench.contention import Config, measure, speed_parser, table
from bench.report import machine, publish, versions

PROMPTS_PER_STEP = 8  # our batch_size; TRL's per_device_train_batch_size is this × G
NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 16
THREADS = 2
STEPS = {"1m": 40, "30m": 8}  # ~20-60 s per configuration on 2 cores
LENGTH_TARGET = 20  # characters


def prompt_rows(n: int) -> list[dict[str, Any]]:
    """Chat prompts of 1-3 generated sentences (~15-45 tokens with the template)."""
    rng = random.Random(5)
    return [
        {"prompt": [{"role": "user", "content": _sentences(rng, rng.randint(1, 3)) + " Go on:"}]}
        for _ in range(n)
    ]


def hyperparameters(config: Config, steps: int) -> Any:
    from trainer_core.specs import GrpoHyperparameters, RlooHyperparameters

    common: dict[str, Any] = {
        "n_epochs": 1,
        "batch_size": PROMPTS_PER_STEP,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 1e-5 if config.adapter == "lora" else 1e-6,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "linear",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "num_generations": NUM_GENERATIONS,
        "epsilon": 0.2,
        "num_iterations": 1,
    }
    if config.method == "grpo":
        return GrpoHyperparameters(
            **common,
            epsilon_high=None,
            beta=0.0,
            scale_rewards="group",
            loss_type="dapo",
            mask_truncated_completions=False,
        )
    return RlooHyperparameters(**common, beta=0.05, normalize_advantages=False)


def run_ours_online(config: Config, rows: list[dict[str, Any]], steps: int) -> dict[str, float]:
    from bench.runs import run_ours
    from trainer_core.specs import AdapterSpec, TrainSpec

    with tempfile.TemporaryDirectory() as tmp:
        spec = TrainSpec(
            method=config.method,  # type: ignore[arg-type]
            model=str(tiny_model(config.size)),
            train_file=str(write_jsonl(Path(tmp) / "prompts.jsonl", rows)),
            seed=0,
            max_seq_len=256,
            adapter=AdapterSpec(type=config.adapter),  # type: ignore[arg-type]
            hyperparameters=hyperparameters(config, steps),
            reward_functions=[{"type": "length", "name": "length", "target": LENGTH_TARGET}],
            checkpoint_every=10_000,
            log_every=1,
            num_threads=THREADS,
        )
        run = run_ours(spec)
    return {
        "tokens_per_second": run.tokens_per_second,
        "peak_rss_mib": run.peak_rss_mib,
        "seconds": run.seconds,
        "tokens": run.tokens,
        "steps": len(run.steps),
    }


def run_trl_online(config: Config, rows: list[dict[str, Any]], steps: int) -> dict[str, float]:
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as transformers_logging
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from bench.common import TrlRecorder, lora_config
    from trainer_core.specs import AdapterSpec

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    hp = hyperparameters(config, steps)

    def length(completions: list[Any], **kwargs: Any) -> list[float]:
        # graders' "length": 1 / (1 + |chars − target| / target)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1 / (1 + abs(len(t) - LENGTH_TARGET) / LENGTH_TARGET) for t in texts]

    config_cls, trainer_cls = (
        (GRPOConfig, GRPOTrainer) if config.method == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    extra: dict[str, Any] = (
        {"loss_type": "dapo", "scale_rewards": "group", "epsilon_high": 0.2}
        if config.method == "grpo"
        else {"normalize_advantages": False}
    )
    args = config_cls(
        output_dir=tempfile.mkdtemp(prefix="trl-online-"),
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=hp.beta,
        epsilon=hp.epsilon,
        num_iterations=1,
        learning_rate=hp.learning_rate,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        max_steps=steps,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )
    recorder = TrlRecorder()
    peft_config = lora_config(AdapterSpec()) if config.adapter == "lora" else None
    trainer = trainer_cls(
        model=str(tiny_model(config.size)),
        reward_funcs=[length],
        args=args,
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        callbacks=[recorder],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    tokens = int(recorder.logs[-1].get("num_tokens", 0))
    seconds = recorder.step_times[-1] - recorder.began
    return {
        "tokens_per_second": tokens / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "seconds": seconds,
        "tokens": tokens,
        "steps": len(recorder.step_times),
    }


def worker(config: Config) -> dict[str, float]:
    import torch

    torch.set_num_threads(THREADS)
    steps = STEPS[config.size]
    rows = prompt_rows(steps * PROMPTS_PER_STEP)
    if config.trainer == "ours":
        return run_ours_online(config, rows, steps)
    return run_trl_online(config, rows, steps)


def main(argv: list[str] | None = None) -> int:
    parser = speed_parser(
        __doc__.split("\n\n")[0],
        sizes=list(STEPS),
        methods=["grpo", "rloo"],
        method_choices=["grpo", "rloo"],
    )
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(Config(**json.loads(args.worker)))))
        return 0

    for size in args.sizes:
        tiny_model(size)  # built once here, not inside the timed subprocesses
    results = measure(
        "bench.online_speed",
        sizes=args.sizes,
        methods=args.methods,
        adapters=args.adapters,
        threads=THREADS,
        repeats=args.repeats,
        tries=args.tries,
    )
    header = (
        f"{date.today().isoformat()}; {machine()}; {versions()}; {PROMPTS_PER_STEP} prompts × "
        f"{NUM_GENERATIONS} completions of {MAX_COMPLETION_LENGTH} tokens per step, fp32, "
        f"{THREADS} torch threads, steps per run {STEPS}"
    )
    text = table(results)
    publish(header, text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
