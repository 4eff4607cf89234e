"""Training speed and peak memory, ours beside TRL, on the same tiny models and data.

    .venv/bin/python -m bench.speed [--sizes 1m 30m] [--methods supervised dpo reward_model]
                                    [--adapters lora full] [--markdown FILE]

Each configuration (size × method × adapter × trainer) runs in its own subprocess, so its
peak RSS is its own. A run trains ``STEPS[size]`` optimizer steps of batch 8 in fp32 on 2
torch threads over generated rows of mixed length (``common.sft_rows`` /
``preference_rows``); tokens/s counts the non-padding tokens trained on, over the wall time
from the first step to the last (model and data loading, and the final save, excluded).

Both trainers run with their own defaults for everything that is not arithmetic: TRL's
random sampler and fused AdamW, our length-grouped batches. What is held equal is what the
model computes: fp32, no gradient checkpointing (TRL's default is on, which would only make
it slower), the same batch size, max length and LoRA config.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import OFFLINE_EXTRA, preference_rows, sft_rows, tiny_model, write_jsonl
from bench.contention import Config, measure, speed_parser, table
from bench.parity import method_exists
from bench.report import machine, publish, versions

BATCH_SIZE = 8
THREADS = 2
MAX_SEQ_LEN = 512
# Optimizer steps per run: ~20-60 s per configuration on 2 cores.
STEPS = {"1m": 60, "30m": 10}
# Sentences (~9 tokens each) per prompt / completion: rows of ~20 to ~250 tokens.
MAX_SENTENCES = 12


def rows_for(method: str, n: int) -> list[dict[str, Any]]:
    if method == "supervised":
        return sft_rows(n, seed=3, max_sentences=MAX_SENTENCES)
    return preference_rows(n, seed=4, max_sentences=MAX_SENTENCES)


def spec_for(config: Config, train_file: Path) -> Any:
    from trainer_core.registry import METHODS
    from trainer_core.specs import AdapterSpec, TrainSpec

    resolved_cls = METHODS[config.method].resolved
    extra = OFFLINE_EXTRA[config.method]
    hp = resolved_cls(
        n_epochs=1,
        batch_size=BATCH_SIZE,
        learning_rate_multiplier=1.0,
        learning_rate=1e-4 if config.adapter == "lora" else 1e-5,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        lr_scheduler="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        **extra,
    )
    return TrainSpec(
        method=config.method,  # type: ignore[arg-type]
        model=str(tiny_model(config.size)),
        train_file=str(train_file),
        seed=0,
        max_seq_len=MAX_SEQ_LEN,
        adapter=AdapterSpec(type=config.adapter),  # type: ignore[arg-type]
        hyperparameters=hp,
        checkpoint_every=10_000,
        num_threads=THREADS,
    )


def worker(config: Config) -> dict[str, float]:
    """One run in this process (the subprocess side)."""
    import torch

    from bench.runs import run_ours, run_trl

    torch.set_num_threads(THREADS)
    steps = STEPS[config.size]
    rows = rows_for(config.method, steps * BATCH_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec_for(config, write_jsonl(Path(tmp) / "train.jsonl", rows))
        run = run_ours(spec) if config.trainer == "ours" else run_trl(spec, rows, max_steps=steps)
    return {
        "tokens_per_second": run.tokens_per_second,
        "peak_rss_mib": run.peak_rss_mib,
        "seconds": run.seconds,
        "tokens": run.tokens,
        "steps": len(run.steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = speed_parser(
        __doc__.split("\n\n")[0],
        sizes=list(STEPS),
        methods=["supervised", "dpo", "reward_model"],
    )
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(Config(**json.loads(args.worker)))))
        return 0

    methods = [m for m in args.methods if method_exists(m)]
    missing = [m for m in args.methods if m not in methods]
    for size in args.sizes:
        tiny_model(size)  # built once here, not inside the timed subprocesses
    results = measure(
        "bench.speed",
        sizes=args.sizes,
        methods=methods,
        adapters=args.adapters,
        threads=THREADS,
        repeats=args.repeats,
        tries=args.tries,
    )
    text = table(results)
    if missing:
        text += "\n\nNot measured (no trainer_core.methods module yet): " + ", ".join(missing)
    header = (
        f"{machine()}; {versions()}; batch {BATCH_SIZE}, fp32, {THREADS} torch threads, "
        f"steps per run {STEPS}"
    )
    publish(header, text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
