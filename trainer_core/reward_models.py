"""A trained reward model, loaded to score sequences: what the online methods' reward
functions and PPO's reward read, and what ``evaluate`` of a reward-model run checks.

``load_reward_base`` builds the one-output sequence classifier the ``reward_model`` method
trains (``methods/reward_model.py``) and this module loads back: from a causal LM the
``score`` head is new, and ``config.pad_token_id`` is set from the tokenizer, since pooling
reads the last token that is not padding (see that method's docstring).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from trainer_core.adapters import _without_peft_deprecation_warning
from trainer_core.models import check_model_source, load_tokenizer
from trainer_core.supervised_data import Message, _encode, _messages, _render, _with_eos


def load_reward_base(
    model: str, *, pad_token_id: int, allow_hub: bool = False, trust_remote_code: bool = False
) -> PreTrainedModel:
    """``model`` as a one-output sequence classifier in fp32, in training mode.

    From a causal LM the ``score`` head is new (drawn from torch's RNG: seed first) and the LM
    head is unused; from a saved reward model (full fine-tuning) it is the trained one.
    ``pad_token_id`` goes on the config, as pooling reads the last token that is not it.
    """
    check_model_source(model, allow_hub=allow_hub)
    # transformers reports the head it made and the LM head it skipped; both are expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        loaded = AutoModelForSequenceClassification.from_pretrained(
            model,
            num_labels=1,
            dtype=torch.float32,
            local_files_only=not allow_hub,
            trust_remote_code=trust_remote_code,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    loaded.config.get_text_config().pad_token_id = pad_token_id
    loaded.train()
    return loaded


# What ``RewardModel.score`` takes: a plain string (tokenized as a training string is, EOS
# appended), a conversation (rendered with the chat template), or token ids as they are.
Scorable = str | Sequence[Message] | Sequence[int]


class RewardModel:
    """A trained reward model and its tokenizer, ready to score sequences (eval mode).

    Load once, score many batches (the online methods' reward function)::

        rm = RewardModel.load(base_model, "out/final/adapter")
        rewards = rm.score(["Q: 2+2? A: 4", "Q: 2+2? A: 5"])  # (2,) tensor
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        model_path: str,
        adapter_dir: str | Path | None,
        *,
        allow_hub: bool = False,
        trust_remote_code: bool = False,
        device: torch.device | None = None,
    ) -> RewardModel:
        """The reward model a run saved: ``adapter_dir`` is a checkpoint's ``adapter/`` folder
        (a PEFT folder on ``model_path``, or a full model folder), None for the untrained base.
        It scores on ``device`` (the CPU by default; an online method passes its own).

        A PEFT folder loads as ``PeftModel.from_pretrained`` on
        ``AutoModelForSequenceClassification(model_path, num_labels=1)``; its saved head
        replaces the random one.
        """
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise ValueError(f"adapter folder {str(adapter_dir)!r} does not exist")
        tokenizer = load_tokenizer(
            model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code
        )
        options = {"allow_hub": allow_hub, "trust_remote_code": trust_remote_code}
        model: nn.Module
        if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
            model = load_reward_base(model_path, pad_token_id=tokenizer.pad_token_id, **options)
            with _without_peft_deprecation_warning():
                model = PeftModel.from_pretrained(model, str(adapter_dir))
        elif adapter_dir is not None:
            # A full folder must carry its trained head; a causal LM would get a random one.
            config = json.loads((Path(adapter_dir) / "config.json").read_text())
            architectures = config.get("architectures") or []
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise ValueError(f"{str(adapter_dir)!r} does not hold a reward model")
            model = load_reward_base(
                str(adapter_dir), pad_token_id=tokenizer.pad_token_id, **options
            )
        else:
            model = load_reward_base(model_path, pad_token_id=tokenizer.pad_token_id, **options)
        if device is not None:
            model.to(device)  # type: ignore[arg-type]  # transformers types .to oddly
        return cls(model, tokenizer)

    def token_ids(self, sequence: Scorable) -> list[int]:
        """The tokens ``score`` reads for one sequence."""
        if isinstance(sequence, str):
            return _with_eos(_encode(self.tokenizer, sequence), self.tokenizer)
        items = list(sequence)
        if items and isinstance(items[0], dict):
            return _render(self.tokenizer, _messages(items))
        return [int(token) for token in items]  # type: ignore[call-overload]

    @torch.no_grad()
    def score(self, sequences: Sequence[Scorable], *, batch_size: int = 8) -> torch.Tensor:
        """Rewards (N,), fp32 on the CPU, one per sequence (prompt and completion together)."""
        ids = [self.token_ids(sequence) for sequence in sequences]
        device = next(self.model.parameters()).device
        rewards = []
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            longest = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), longest), self.tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
            logits = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            ).logits  # (b, 1)
            rewards.append(logits.squeeze(-1).float().cpu())
        return torch.cat(rewards) if rewards else torch.zeros(0)


def score(
    model_path: str,
    adapter_dir: str | Path | None,
    sequences: Sequence[Scorable],
    *,
    batch_size: int = 8,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> list[float]:
    """One-off scoring: load the reward model ``adapter_dir`` holds and score ``sequences``."""
    reward_model = RewardModel.load(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    return reward_model.score(sequences, batch_size=batch_size).tolist()
