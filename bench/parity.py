"""Parity with TRL: the same tiny model, data, seed and hyperparameters, step by step.

    .venv/bin/python -m bench.parity [--methods supervised dpo reward_model] [--steps 20]
                                     [--size tiny] [--markdown FILE]

For each method and adapter (LoRA, full), ours runs first through ``trainer_core.run``,
recording the order it served the rows in and the weights it started from (``runs.Capture``).
TRL then trains on the rows in that order (sequential sampler) from those weights, in fp32,
with torch's plain AdamW and the same schedule, and both logs are compared at every step:
``|ours − TRL| / max(|ours|, |TRL|)`` per metric, the largest over the steps.

A method whose module does not exist yet is reported as missing, not failed. Exit status 1
when any compared metric misses ``--tolerance`` (1e-4 relative by default; DPO's reward
statistics with an absolute floor of ``REWARD_FLOOR``, see ``within``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.common import preference_rows, sft_rows, tiny_model, write_jsonl
from bench.report import machine, publish, versions
from bench.runs import TRL_NAMES, Capture, run_ours, run_trl
from trainer_core.specs import (
    AdapterSpec,
    DpoHyperparameters,
    RewardModelHyperparameters,
    SupervisedHyperparameters,
    TrainSpec,
)

BATCH_SIZE = 4
COMMON_HP: dict[str, Any] = {
    "n_epochs": 1,
    "batch_size": BATCH_SIZE,
    "learning_rate_multiplier": 1.0,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
}
# Learning rates large enough that a tiny random model moves visibly in 20 steps.
LEARNING_RATES = {"lora": 1e-3, "full": 1e-4}


@dataclass(frozen=True)
class Case:
    method: str
    label: str  # shown in the table
    rows: Callable[[int], list[dict[str, Any]]]  # n rows -> rows
    hyperparameters: Callable[[float], Any]  # learning rate -> resolved hyperparameters


def _sft(lr: float) -> SupervisedHyperparameters:
    return SupervisedHyperparameters(**COMMON_HP, learning_rate=lr)


def _dpo(loss_type: str) -> Callable[[float], DpoHyperparameters]:
    def make(lr: float) -> DpoHyperparameters:
        return DpoHyperparameters(
            **COMMON_HP,
            learning_rate=lr,
            beta=0.1,
            loss_type=[loss_type],
            loss_weights=None,
            label_smoothing=0.0,
            precompute_ref_log_probs=False,
        )

    return make


def _reward(lr: float) -> RewardModelHyperparameters:
    return RewardModelHyperparameters(
        **COMMON_HP, learning_rate=lr, center_rewards_coefficient=0.01
    )


def _sft_data(n: int) -> list[dict[str, Any]]:
    return sft_rows(n, seed=1, max_sentences=6)


def _pref_data(n: int) -> list[dict[str, Any]]:
    return preference_rows(n, seed=2, max_sentences=5)


CASES: dict[str, list[Case]] = {
    "supervised": [Case("supervised", "supervised", _sft_data, _sft)],
    "dpo": [
        Case("dpo", f"dpo ({loss})", _pref_data, _dpo(loss)) for loss in ("sigmoid", "ipo", "hinge")
    ],
    "reward_model": [Case("reward_model", "reward model", _pref_data, _reward)],
}


def method_exists(method: str) -> bool:
    return importlib.util.find_spec(f"trainer_core.methods.{method}") is not None


@dataclass
class Result:
    case: Case
    adapter: str
    steps: int
    values: dict[str, list[tuple[float, float]]]  # metric -> (ours, TRL) at every step
    tokens_match: bool  # TRL trained on exactly the non-padding tokens we did
    note: str = ""

    @property
    def worst(self) -> dict[str, tuple[float, float, int]]:
        """metric -> (max rel. diff, max abs. diff, the step of the max rel. diff)."""
        worst = {}
        for name, pairs in self.values.items():
            diffs = [(rel(a, b), abs(a - b), step) for step, (a, b) in enumerate(pairs, start=1)]
            top = max(diffs)
            worst[name] = (top[0], max(d[1] for d in diffs), top[2])
        return worst

    @property
    def losses(self) -> list[tuple[float, float]]:
        """(ours, TRL) train_loss per step."""
        return self.values.get("train_loss", [])


def rel(a: float, b: float) -> float:
    """Relative difference; below 1e-8 apart counts as equal (values that are exactly 0 in
    exact arithmetic, like DPO's rewards at step 1, come out as ±1e-9 in floats)."""
    if abs(a - b) < 1e-8:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare(case: Case, adapter: str, steps: int, size: str, workdir: Path) -> Result:
    rows = case.rows(steps * BATCH_SIZE)
    train_file = write_jsonl(workdir / f"{case.method}.jsonl", rows)
    spec = TrainSpec(
        method=case.method,  # type: ignore[arg-type]
        model=str(tiny_model(size)),
        train_file=str(train_file),
        seed=0,
        max_seq_len=512,
        adapter=AdapterSpec(type=adapter, r=8, alpha=16, dropout=0.0),  # type: ignore[arg-type]
        hyperparameters=case.hyperparameters(LEARNING_RATES[adapter]),
        checkpoint_every=10_000,
        num_threads=2,
    )
    capture = Capture()
    ours = run_ours(spec, capture)
    theirs = run_trl(spec, rows, max_steps=steps, capture=capture)
    if len(ours.steps) != steps or len(theirs.steps) != steps:
        n = min(len(ours.steps), len(theirs.steps))
        return Result(case, adapter, n, {}, False, "a run stopped early")
    pairs = list(zip(ours.steps, theirs.steps, strict=True))
    values = {
        name: [(a[name], b[name]) for a, b in pairs]
        for name in TRL_NAMES[case.method].values()
        if name != "num_tokens" and name in ours.steps[0] and name in theirs.steps[0]
    }
    # num_tokens is an integer count: TRL's (non-padding tokens so far) must equal ours exactly.
    tokens_match = all(a.get("num_tokens") == b.get("num_tokens") for a, b in pairs)
    return Result(case, adapter, steps, values, tokens_match)


# DPO's reward statistics are β times a difference of two log-prob sums of order 1e2, so
# their fp32 rounding is ~1e-6 absolute (about one ulp of those sums) whatever their value;
# near zero a relative bound alone measures that noise (``rel``'s 1e-8 is the same idea for
# exact zeros). They pass with |Δ| ≤ tolerance·|x| + REWARD_FLOOR; every other metric (losses,
# gradient norms, log-probs, the reward model's) must meet the relative bound alone.
REWARD_FLOOR = 1e-5


def within(name: str, ours: float, theirs: float, tolerance: float) -> bool:
    if name.startswith("rewards/"):
        return abs(ours - theirs) <= tolerance * max(abs(ours), abs(theirs)) + REWARD_FLOOR
    return rel(ours, theirs) <= tolerance


def verdict(r: Result, tolerance: float) -> str:
    if not r.worst:
        return f"**no** ({r.note})"
    misses = [
        f"{name} {worst:.1e} rel. ({absolute:.0e} abs.) at step {step}"
        for name, (worst, absolute, step) in r.worst.items()
        if not all(within(name, a, b, tolerance) for a, b in r.values[name])
    ]
    if not r.tokens_match:
        misses.append("num_tokens differ")
    return "yes" if not misses else "**no**: " + "; ".join(misses)


def table(results: list[Result], tolerance: float) -> str:
    """One row per method and adapter: the largest relative difference over every step."""
    lines = [
        "| method | adapter | steps | train_loss | grad_norm | learning_rate | other metrics "
        "(worst) | num_tokens | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.worst:
            lines.append(
                f"| {r.case.label} | {r.adapter} | {r.steps} | | | | | | {verdict(r, tolerance)} |"
            )
            continue
        named = {"train_loss", "grad_norm", "learning_rate", "epoch"}
        others = {k: v for k, v in r.worst.items() if k not in named}
        other = max(others.items(), key=lambda kv: kv[1][0]) if others else None
        other_text = f"{other[1][0]:.1e} ({other[0]})" if other else "—"
        lines.append(
            f"| {r.case.label} | {r.adapter} | {r.steps} | {r.worst['train_loss'][0]:.1e} | "
            f"{r.worst['grad_norm'][0]:.1e} | {r.worst['learning_rate'][0]:.1e} | {other_text} | "
            f"{'equal' if r.tokens_match else 'differ'} | {verdict(r, tolerance)} |"
        )
    return "\n".join(lines)


def loss_table(result: Result) -> str:
    """The per-step train_loss of one comparison, ours beside TRL's."""
    lines = [
        f"Per-step train_loss, {result.case.label} / {result.adapter}:",
        "",
        "| step | ours | TRL | rel. diff |",
        "|---|---|---|---|",
    ]
    for step, (a, b) in enumerate(result.losses, start=1):
        lines.append(f"| {step} | {a:.7f} | {b:.7f} | {rel(a, b):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--adapters", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="tiny", choices=["tiny", "1m", "30m"])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    results, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            if not method_exists(method):
                missing.append(method)
                continue
            for case in CASES[method]:
                for adapter in args.adapters:
                    print(f"-- {case.label} / {adapter}", file=sys.stderr, flush=True)
                    results.append(compare(case, adapter, args.steps, args.size, Path(tmp)))
    text = table(results, args.tolerance)
    if results and results[0].losses:
        text += "\n\n" + loss_table(results[0])
    if missing:
        text += "\n\nNot compared (no trainer_core.methods module yet): " + ", ".join(missing)
    header = (
        f"{date.today().isoformat()}; {machine()}; {versions()}; model `{args.size}`; "
        f"{args.steps} steps of batch {BATCH_SIZE}"
    )
    publish(header, text, args.markdown)
    failed = any(verdict(r, args.tolerance) != "yes" for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
