"""create_tiny_model: offline, deterministic, and a usable chat model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from trainer_core.tiny_models import create_tiny_model


def file_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(tiny_model: Path, tmp_path: Path) -> None:
    again = create_tiny_model(tmp_path / "again", seed=0)
    other = create_tiny_model(tmp_path / "other", seed=1)

    hashes = file_hashes(tiny_model)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= hashes.keys()
    assert file_hashes(again) == hashes
    other_hashes = file_hashes(other)
    assert other_hashes["model.safetensors"] != hashes["model.safetensors"]
    # The tokenizer depends on the size only, so models of one size share a vocabulary.
    assert other_hashes["tokenizer.json"] == hashes["tokenizer.json"]


def test_tiny_model_shape(tiny_model: Path, tokenizer: Any) -> None:
    config = AutoConfig.from_pretrained(tiny_model, local_files_only=True)

    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer) == 512
    assert config.eos_token_id == tokenizer.eos_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    size = (tiny_model / "model.safetensors").stat().st_size / 4  # fp32 parameters
    assert 200_000 < size < 500_000


def test_chat_template_renders(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
    ]

    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)

    assert full == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>"
    )
    assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # Special tokens are single tokens; any byte string round-trips.
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    text = "naïve café 東京 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_unknown_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model size"):
        create_tiny_model(tmp_path, size="7b")
