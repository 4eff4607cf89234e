"""The rewards of sampled completions: the job's reward functions, and the trained reward
models they (or PPO) name.

GRPO and RLOO score a rollout with ``RewardScorer``: ``spec.reward_functions`` through
``graders.score``, a reward model that a function names loaded on first use and kept for the
run. PPO reads its one reward model itself (``named_reward_model``). Either way a reward
model reads ``scored_sequence``: the prompt with the completion as the assistant's turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer_core import graders
from trainer_core.placement import Placement
from trainer_core.reward_models import RewardModel, Scorable
from trainer_core.specs import TrainSpec


class RewardScorer:
    """``spec.reward_functions`` through ``graders.score``; a reward model a function names is
    loaded on first use (``spec.reward_models[name]``) onto ``where``'s device and kept for
    the run; it scores under ``where``'s autocast, as the policy computes."""

    def __init__(self, spec: TrainSpec, where: Placement | None = None) -> None:
        self.spec = spec
        self.where = where or Placement()
        self.models: dict[str, RewardModel] = {}

    def __call__(
        self, items: Sequence[Mapping[str, Any]], completions: Sequence[str]
    ) -> graders.Scores:
        return graders.score(
            self.spec.reward_functions,
            list(items),
            list(completions),
            reward_model=self.reward_model,
            http_allowed_hosts=self.spec.reward_http_allowed_hosts,
            http_timeout_s=self.spec.reward_http_timeout_s,
        )

    def reward_model(
        self, name: str, items: Sequence[Mapping[str, Any]], completions: Sequence[str]
    ) -> list[float]:
        if name not in self.models:
            self.models[name] = named_reward_model(self.spec, name, self.where)
        sequences = [scored_sequence(i, c) for i, c in zip(items, completions, strict=True)]
        with self.where.autocast():
            scores: list[float] = self.models[name].score(sequences).tolist()
        return scores


def named_reward_model(spec: TrainSpec, name: str, where: Placement | None = None) -> RewardModel:
    """The reward model ``name`` of the run, from the folders the worker fetched
    (``spec.reward_models``), on ``where``'s device (the CPU by default)."""
    ref = spec.reward_models.get(name)
    if ref is None:
        raise ValueError(f"reward model {name!r} was not provided to this run")
    return RewardModel.load(
        ref.base,
        ref.adapter,
        allow_hub=spec.allow_hub,
        trust_remote_code=spec.trust_remote_code,
        device=(where or Placement()).device,
    )


def scored_sequence(item: Mapping[str, Any], completion: str) -> Scorable:
    """What a reward model reads: the conversation with the completion as the assistant's
    turn, or the text prompt followed by the completion (TRL's rule)."""
    prompt = item.get("messages", item.get("prompt"))
    if isinstance(prompt, str):
        return prompt + completion
    return [*prompt, {"role": "assistant", "content": completion}]
