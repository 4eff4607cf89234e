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

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import preference_rows, sft_rows, tiny_model, write_jsonl
from bench.parity import machine, method_exists, versions

BATCH_SIZE = 8
THREADS = 2
MAX_SEQ_LEN = 512
# Optimizer steps per run: ~20-60 s per configuration on 2 cores.
STEPS = {"1m": 60, "30m": 10}
# Other processes' CPU use (in cores) above which a run counts as disturbed.
CONTENDED = 0.2
# Sentences (~9 tokens each) per prompt / completion: rows of ~20 to ~250 tokens.
MAX_SENTENCES = 12


@dataclass(frozen=True)
class Config:
    size: str
    method: str
    adapter: str
    trainer: str  # "ours" or "trl"

    @property
    def name(self) -> str:
        return f"{self.method} {self.adapter} {self.size} {self.trainer}"


def rows_for(method: str, n: int) -> list[dict[str, Any]]:
    if method == "supervised":
        return sft_rows(n, seed=3, max_sentences=MAX_SENTENCES)
    return preference_rows(n, seed=4, max_sentences=MAX_SENTENCES)


def spec_for(config: Config, train_file: Path) -> Any:
    from trainer_core.specs import METHODS, AdapterSpec, TrainSpec

    resolved_cls = METHODS[config.method][1]
    extra: dict[str, Any] = {
        "supervised": {},
        "dpo": {
            "beta": 0.1,
            "loss_type": ["sigmoid"],
            "loss_weights": None,
            "label_smoothing": 0.0,
            "precompute_ref_log_probs": False,
        },
        "reward_model": {"center_rewards_coefficient": 0.0},
    }[config.method]
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


def busy_fraction(seconds: float = 2.0) -> float:
    """How busy the machine's CPUs were over the next ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(limit: float = 180.0) -> float:
    """Wait (up to ``limit`` s) until other processes leave the CPUs idle; other jobs on a
    2-core machine halve a run's speed. Returns the busy fraction last seen."""
    deadline = time.monotonic() + limit
    busy = busy_fraction()
    while busy > 0.1 and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our finished children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def launch(config: Config) -> dict[str, float] | None:
    """Run ``config`` in a subprocess; ``others`` in the result is how many CPU cores other
    processes kept busy meanwhile (a run with others > CONTENDED is not a clean measure)."""
    command = [sys.executable, "-m", "bench.speed", "--worker", json.dumps(config.__dict__)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    busy0, ours0 = _cpu_seconds()
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - began
    busy1, ours1 = _cpu_seconds()
    if done.returncode != 0:
        print(f"{config.name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["others"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall
    return result


def summary(config_runs: list[dict[str, float]]) -> dict[str, float] | None:
    """The clean runs (all runs if none was clean): the best tokens/s (other jobs only ever
    slow a run down) and the mean peak RSS (which varies ±5% from run to run)."""
    if not config_runs:
        return None
    clean = [r for r in config_runs if r["others"] <= CONTENDED] or config_runs
    best = max(clean, key=lambda r: r["tokens_per_second"])
    return {
        **best,
        "peak_rss_mib": sum(r["peak_rss_mib"] for r in clean) / len(clean),
        "runs": len(clean),
    }


def table(results: dict[Config, dict[str, float] | None]) -> str:
    lines = [
        "| method | adapter | model | ours tok/s | TRL tok/s | speed-up | ours peak RSS | "
        "TRL peak RSS | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = sorted({(c.method, c.adapter, c.size) for c in results})
    for method, adapter, size in pairs:
        ours = results.get(Config(size, method, adapter, "ours"))
        trl = results.get(Config(size, method, adapter, "trl"))
        if ours is None or trl is None:
            lines.append(f"| {method} | {adapter} | {size} | failed | | | | | |")
            continue
        mark = {k: " †" if v["others"] > CONTENDED else "" for k, v in (("o", ours), ("t", trl))}
        lines.append(
            f"| {method} | {adapter} | {size} | {ours['tokens_per_second']:,.0f}{mark['o']} | "
            f"{trl['tokens_per_second']:,.0f}{mark['t']} | "
            f"{ours['tokens_per_second'] / trl['tokens_per_second']:.2f}× | "
            f"{ours['peak_rss_mib']:,.0f} MiB | {trl['peak_rss_mib']:,.0f} MiB | "
            f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1m", "30m"], choices=list(STEPS))
    parser.add_argument("--methods", nargs="+", default=["supervised", "dpo", "reward_model"])
    parser.add_argument("--adapters", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=1, help="clean runs per configuration")
    parser.add_argument("--tries", type=int, default=4, help="runs at most per configuration")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(Config(**json.loads(args.worker)))))
        return 0

    methods = [m for m in args.methods if method_exists(m)]
    missing = [m for m in args.methods if m not in methods]
    for size in args.sizes:
        tiny_model(size)  # built once here, not inside the timed subprocesses
    runs: dict[Config, list[dict[str, float]]] = {}
    clean_runs: dict[Config, int] = {}
    for size in args.sizes:
        for method in methods:
            for adapter in args.adapters:
                # Alternating TRL and ours, each after the machine is quiet, until both have
                # ``repeats`` clean runs (no other process busy meanwhile) or the tries run
                # out.
                pair = [Config(size, method, adapter, t) for t in ("trl", "ours")]
                for _ in range(args.tries):
                    for config in pair:
                        if clean_runs.get(config, 0) >= args.repeats:
                            continue
                        busy = wait_for_quiet()
                        run = launch(config)
                        print(f"-- {config.name} (busy {busy:.0%}): {run}", file=sys.stderr)
                        runs.setdefault(config, [])
                        if run is not None:
                            runs[config].append(run)
                            clean_runs[config] = clean_runs.get(config, 0) + (
                                run["others"] <= CONTENDED
                            )
    results = {config: summary(config_runs) for config, config_runs in runs.items()}
    text = table(results)
    if any(r is not None and r["others"] > CONTENDED for r in results.values()):
        text += "\n\n† other processes kept the CPUs busy during every run of this one."
    if missing:
        text += "\n\nNot measured (no trainer_core.methods module yet): " + ", ".join(missing)
    header = (
        f"{machine()}; {versions()}; batch {BATCH_SIZE}, fp32, {THREADS} torch threads, "
        f"steps per run {STEPS}"
    )
    print(header + "\n\n" + text)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
