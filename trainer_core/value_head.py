"""PPO's critic: a scalar value head V(s_t) on the policy's own last hidden states.

TRL's old ``AutoModelForCausalLMWithValueHead`` in its simplest form: one ``nn.Linear(hidden,
1)`` read at every position of the policy's final (normed) hidden state, so the value shares
the policy's backbone (under LoRA the adapter and the head train; under full fine-tuning every
weight and the head). One forward pass gives both the log-probs of the completion and its
values (``completion_forward``). TRL's later PPOTrainer used a separate value model instead
(twice the memory; Huang et al. 2024, https://arxiv.org/abs/2403.17031, discuss both).

The head starts at zero: V = 0 everywhere, so the first advantages are (γλ-discounted)
rewards-to-go, and the value loss sends no gradient into the shared backbone before the head
has learnt anything. It is saved as one safetensors file beside the trainer state, never inside the
adapter folder, so that folder stays an ordinary causal LM (``PeftModel.from_pretrained`` or
``AutoModelForCausalLM.from_pretrained``); the head is only needed to resume PPO. A run's
checkpoints go through ``WithValueHead``, which writes it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer_core.generation import (
    Rollout,
    _accepts_logits_to_keep,
    _whole_rows_hidden,
    position_ids,
)
from trainer_core.logprobs import next_token_logps
from trainer_core.seams import CheckpointStore
from trainer_core.vocab_chunks import causal_lm_parts

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b, from hidden states (B, T, H) to values (B, T)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    @classmethod
    def for_model(cls, model: nn.Module) -> ValueHead:
        """A zero head sized for ``model``'s hidden states (a causal LM, PEFT-wrapped or not)."""
        config = model.config.get_text_config()  # type: ignore[union-attr,operator]
        return cls(int(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The head stays fp32 whatever the backbone's dtype, under autocast too: values are
        # regression targets, and bf16's 8-bit mantissa would round the returns they chase.
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.summary(hidden_states).squeeze(-1)  # (B, T, 1) -> (B, T)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(state, folder / VALUE_HEAD_FILE)

    def load(self, folder: Path) -> None:
        """Load the weights ``save`` wrote into ``folder``."""
        self.load_state_dict(load_file(folder / VALUE_HEAD_FILE))


class WithValueHead:
    """The CheckpointStore a PPO checkpoint goes through: it writes the value head into the
    finished folder's ``state/`` and hands the folder on (``adapter/`` stays a causal LM)."""

    def __init__(self, store: CheckpointStore, value_head: ValueHead) -> None:
        self.store = store
        self.value_head = value_head

    def save(self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool) -> None:
        self.value_head.save(folder / "state")
        self.store.save(step, folder, metrics, final=final)


def completion_forward(
    model: nn.Module, value_head: ValueHead, rollout: Rollout, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps (N, C), values (N, C))`` of the rollout's completion tokens.

    ``generation.rollout_logps`` plus the values, from the same forward: column t is
    completion token t, its log-prob under ``logits / temperature`` (the distribution it was
    sampled from), and V of the state before it (the last hidden state at position P − 1 + t).
    Positions count real tokens only, as in ``generate``; only C + 1 positions reach the LM
    head. The log-probs are computed exactly as ``rollout_logps`` computes them, so the
    reference (scored by that) and the policy agree to the bit while they are the same model.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # (N, P + C)
    n, c = rollout.completion_ids.shape
    parts = causal_lm_parts(model)
    if parts is not None:  # the head chunked over the vocabulary (vocab_chunks)
        states = _whole_rows_hidden(parts, rollout)  # (N, C, H): the states before tokens
        scored = parts.token_logps(
            states.reshape(n * c, -1), rollout.completion_ids.reshape(-1), temperature=temperature
        )
        return scored.logps.view(n, c), value_head(states)  # (N, C), (N, C)
    keep = {"logits_to_keep": c + 1} if _accepts_logits_to_keep(model) else {}
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        output_hidden_states=True,
        **keep,
    )
    logits = outputs.logits[:, -(c + 1) :] / temperature  # (N, C + 1, V)
    per_token_logps = next_token_logps(logits, input_ids[:, -(c + 1) :])  # (N, C)
    hidden = outputs.hidden_states[-1][:, -(c + 1) : -1]  # (N, C, H): the states before tokens
    return per_token_logps, value_head(hidden)  # (N, C), (N, C)
