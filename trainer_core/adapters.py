"""What gets trained (a LoRA adapter via peft, or every weight) and how it is saved and reloaded.

The saved folder loads on its own: under LoRA it is a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``, for ``PeftModel.from_pretrained`` on the base model); under full
fine-tuning it is a complete Hugging Face model folder. Both also carry the tokenizer, so a
downloaded adapter needs nothing else from the job (under LoRA it is a copy of the base's).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from trainer_core import lora_matmul
from trainer_core.models import load_model
from trainer_core.specs import AdapterSpec


def apply_adapter(
    model: nn.Module,
    spec: AdapterSpec,
    *,
    task_type: TaskType = TaskType.CAUSAL_LM,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter, or return it as is for full fine-tuning.

    LoRA's A matrices are initialised from torch's global RNG, so seed before calling.

    ``task_type=TaskType.SEQ_CLS`` is for a sequence-classification model (a reward model):
    peft then leaves its fresh head (``score`` or ``classifier``) out of "all-linear" and
    trains and saves it whole (it joins ``modules_to_save``): a new head must be learnt from
    scratch, and a low-rank update would leave a random matrix mostly random (TRL recommends
    ``modules_to_save=["score"]``). Any other ``modules_to_save`` are trained whole too.
    """
    if spec.type == "full":
        return model
    config = LoraConfig(
        r=spec.r,
        # peft annotates int, but only ever computes alpha / r, so a float alpha is fine.
        lora_alpha=spec.alpha,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        # "all-linear" is peft's shorthand: every linear layer but the output head.
        target_modules=spec.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    with _without_peft_deprecation_warning():
        wrapped = get_peft_model(model, config)  # type: ignore[arg-type]
    lora_matmul.install(wrapped)
    return wrapped


def save_adapter(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save what was trained into ``folder`` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    # PeftModel.save_pretrained writes only the adapter; a plain model writes everything.
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)


def load_trained(
    base: str,
    adapter_dir: str | Path | None,
    *,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model a saved adapter folder describes, in eval mode.

    A PEFT folder is applied to ``base``; a full model folder is loaded by itself;
    ``None`` gives the base model.
    """
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise ValueError(f"adapter folder {str(adapter_dir)!r} does not exist")
    model: nn.Module
    if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
        model = load_model(base, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
        with _without_peft_deprecation_warning():
            model = PeftModel.from_pretrained(model, str(adapter_dir))  # type: ignore[arg-type]
    else:
        source = str(adapter_dir) if adapter_dir is not None else base
        model = load_model(source, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
    model.eval()
    return model


@contextmanager
def _without_peft_deprecation_warning() -> Iterator[None]:
    # peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` when it wraps
    # a model; the warning says nothing about the run, so keep it out of the job's log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield
