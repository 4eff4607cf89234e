"""What the online methods (GRPO, RLOO, PPO) tell the user about a rollout: TRL's reward and
completion metrics, and a few sampled completions as an event every ``SAMPLES_EVERY`` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trainer_core.generation import Rollout
from trainer_core.prompt_data import PromptExample
from trainer_core.rl_losses import nanstd
from trainer_core.seams import MetricSink

SAMPLES_EVERY = 10  # steps between "Samples at step N" events (and the first step)
SAMPLES_SHOWN = 4
SAMPLE_CHARS = 500


def reward_metrics(
    rewards: torch.Tensor, per_function: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """``reward``, ``reward_std`` (unbiased) and ``rewards/<name>/mean`` of one rollout."""
    metrics = {
        "reward": float(torch.nanmean(rewards)),
        "reward_std": float(nanstd(rewards)) if rewards.numel() > 1 else 0.0,
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = float(
            torch.nanmean(torch.tensor(list(values), dtype=torch.float32))
        )
    return metrics


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """Lengths in tokens (EOS included) and the share of completions cut at the limit."""
    return length_metrics(rollout.completion_mask.sum(-1).float(), rollout.is_eos)


def length_metrics(lengths: torch.Tensor, is_eos: torch.Tensor) -> dict[str, float]:
    """``completion_metrics`` of completions with these ``lengths`` (N,) and ``is_eos`` (N,)."""
    return {
        "completions/mean_length": float(lengths.float().mean()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": 1.0 - float(is_eos.float().mean()),
    }


def report_samples(
    sink: MetricSink,
    step: int,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    rollout: Rollout,
    **columns: torch.Tensor,
) -> None:
    """A few prompt / completion rows of the rollout (N = B·G rows, prompt-major), each with
    its value of every ``columns`` tensor (N,): a reward, a score, whether it ended with EOS.
    Texts are cut to ``SAMPLE_CHARS``."""
    g = len(rollout.texts) // len(examples)
    samples = []
    # One completion of each prompt first, then the second ones, ...
    rows = sorted(range(len(rollout.texts)), key=lambda r: (r % g, r // g))[:SAMPLES_SHOWN]
    for row in rows:
        prompt = tokenizer.decode(examples[row // g].prompt_ids, skip_special_tokens=True)
        samples.append(
            {
                "prompt": prompt[-SAMPLE_CHARS:],  # the end is what was asked
                "completion": rollout.texts[row][:SAMPLE_CHARS],
                **{name: values[row].item() for name, values in columns.items()},
            }
        )
    sink.event(f"Samples at step {step}", data={"samples": samples})
