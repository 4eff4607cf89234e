"""Loading a base model and its tokenizer from a local folder (or, when allowed, the hub).

Weights load in fp32: the trainer's correctness tests compare against fp32 references, and
mixed precision is a later, explicit choice. The hub path stays in the code but is gated by
``allow_hub`` (an operator setting): with it off, ``local_files_only=True`` guarantees that
nothing is downloaded. ``trust_remote_code`` is likewise off unless the operator turns it on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def check_model_source(model: str, *, allow_hub: bool) -> None:
    """Raise ValueError unless ``model`` is a model folder, or a hub id with the hub allowed."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json")
        return
    if not allow_hub:
        raise ValueError(
            f"model folder {model!r} does not exist (loading from the hub is turned off)"
        )


def load_tokenizer(model: str, *, allow_hub: bool = False, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``model``, with a pad token set (the EOS token when it has none).

    The pad id only fills padding positions, which the attention mask and the completion
    mask both exclude, so reusing EOS is safe.
    """
    check_model_source(model, allow_hub=allow_hub)
    tokenizer = AutoTokenizer.from_pretrained(
        model, local_files_only=not allow_hub, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str, *, allow_hub: bool = False, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The causal LM of ``model`` in fp32, in training mode."""
    check_model_source(model, allow_hub=allow_hub)
    loaded = AutoModelForCausalLM.from_pretrained(
        model,
        dtype=torch.float32,
        local_files_only=not allow_hub,
        trust_remote_code=trust_remote_code,
    )
    loaded.train()
    return loaded


def load_model_and_tokenizer(
    model: str, *, allow_hub: bool = False, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    tokenizer = load_tokenizer(model, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
    loaded = load_model(model, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
    return loaded, tokenizer
