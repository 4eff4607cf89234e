"""The eval pass of the online methods that learn from graders (OpenAI's reinforcement
``eval_interval`` / ``eval_samples``; our GRPO, which runs the same module, with their "auto").

Every ``eval_interval`` optimizer steps, each validation prompt is sampled ``eval_samples``
times from the policy as it is after that step, the completions are scored by the job's
graders (``spec.reward_functions``, as training scores its rollouts), and the mean reward over
all of them is ``valid_reward``: a value of that step's metric point (so of ``GET
.../metrics`` and of the results file's columns).

The pass samples in eval mode without grad, from a generator of its own seeded with the run's
seed and the step: the training sampler's RNG (saved in checkpoints) is left untouched, and a
resumed run logs the values the uninterrupted one did.

"auto" (documented in docs/methods.md): ``eval_interval`` gives about ten passes a run
(⌈total_steps / 10⌉ steps apart), ``eval_samples`` one completion per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from trainer_core import loop
from trainer_core.generation import generate
from trainer_core.prompt_data import PromptExample, load_prompts
from trainer_core.reward_scoring import RewardScorer
from trainer_core.specs import GrpoHyperparameters, ReinforcementHyperparameters

AUTO_PASSES = 10
AUTO_SAMPLES = 1


@dataclass
class RolloutValidation:
    """The pass of one run: its validation prompts, cadence and scorer."""

    examples: list[PromptExample]
    interval: int
    samples: int
    hp: GrpoHyperparameters
    scorer: RewardScorer

    @classmethod
    def of(
        cls, run: loop.Run[Any], hp: GrpoHyperparameters, scorer: RewardScorer
    ) -> RolloutValidation | None:
        """The run's pass, scored by the method's ``scorer``; None without a validation file."""
        spec = run.spec
        if spec.validation_file is None:
            return None
        interval: int | str = "auto"
        samples: int | str = "auto"
        if isinstance(hp, ReinforcementHyperparameters):
            interval, samples = hp.eval_interval, hp.eval_samples
        data = load_prompts(spec.validation_file, run.tokenizer, spec.max_seq_len)
        return cls(
            examples=data.examples,
            interval=(
                interval
                if isinstance(interval, int)
                else max(1, math.ceil(run.total_steps / AUTO_PASSES))
            ),
            samples=samples if isinstance(samples, int) else AUTO_SAMPLES,
            hp=hp,
            scorer=scorer,
        )

    def __call__(self, run: loop.Run[Any]) -> dict[str, float]:
        """``{"valid_reward": mean}`` at a step of the cadence, ``{}`` at any other."""
        if run.step % self.interval != 0:
            return {}
        model = run.model
        device = next(model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(run.spec.seed * 1_000_003 + run.step)
        total, count = 0.0, 0
        batch = self.hp.batch_size
        # On the job's device and under its autocast, as training samples.
        with loop.evaluating(model), run.where.autocast():
            for start in range(0, len(self.examples), batch):
                examples = self.examples[start : start + batch]
                rollout = generate(
                    model,
                    run.tokenizer,
                    [e.prompt_ids for e in examples],
                    num_generations=self.samples,
                    max_completion_length=self.hp.max_completion_length,
                    temperature=self.hp.temperature,
                    top_p=self.hp.top_p,
                    top_k=self.hp.top_k,
                    generator=generator,
                )  # B·samples rows, prompt-major
                items = [e.item for e in examples for _ in range(self.samples)]
                scores = self.scorer(items, rollout.texts)
                total += float(sum(scores.total))
                count += len(scores.total)
        return {"valid_reward": total / count}
