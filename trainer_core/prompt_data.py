"""Prompt-only rows from a JSONL file, tokenized for the online methods (GRPO, RLOO, PPO).

Accepted rows (the file validator's ``prompt_only`` format):

- ``{"messages": [...]}``: a conversation that does not end on the assistant; rendered with
  the chat template and its generation prompt, so the model continues as the assistant.
- ``{"prompt": [...messages]}``: the same.
- ``{"prompt": "text"}``: raw text, tokenized with the tokenizer's own special tokens (as TRL
  does for non-conversational prompts).

Every other key of the row stays in ``PromptExample.item`` for the graders (``{{item.X}}``).

A prompt longer than ``max_prompt_length`` keeps its *end* (left truncation, TRL's
``truncation_side="left"`` for prompts): the generation prompt and the last user turn are what
the completion is conditioned on. ``training_prompts`` loads a job's training file so, with
``max_seq_len`` as that limit, and reports what it cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from trainer_core.seams import MetricSink
from trainer_core.specs import TrainSpec
from trainer_core.supervised_data import _encode, _messages, _render


@dataclass(frozen=True)
class PromptExample:
    prompt_ids: list[int]
    item: dict[str, Any]  # the whole dataset row
    line: int  # 1-based line of the row in its file


@dataclass(frozen=True)
class PromptData:
    examples: list[PromptExample]
    n_rows: int
    n_truncated: int  # prompts cut to max_prompt_length (their start dropped)


def training_prompts(
    spec: TrainSpec, tokenizer: Any, sink: MetricSink, *, validated: bool = False
) -> PromptData:
    """The job's training prompts, each cut to its last ``spec.max_seq_len`` tokens, with a
    warning for the prompts cut and, unless the method ``validated`` it (GRPO's eval pass,
    ``rollout_validation``), for a validation file (not used by the other methods yet).

    ``max_seq_len`` bounds the prompt only; the completion adds up to
    ``max_completion_length`` on top. OpenAI's reinforcement jobs have no sequence limit, and
    their default 64-token completions must run beside any max_seq_len, so the two limits
    are not taken from one budget.
    """
    max_prompt_length = spec.max_seq_len
    data = load_prompts(spec.train_file, tokenizer, max_prompt_length)
    if data.n_truncated:
        sink.event(
            f"Truncated {data.n_truncated} prompts to their last {max_prompt_length} tokens",
            level="warning",
            data={"truncated": data.n_truncated, "max_prompt_length": max_prompt_length},
        )
    if spec.validation_file is not None and not validated:
        sink.event("The validation file is not used by this method yet", level="warning")
    return data


def load_prompts(path: str | Path, tokenizer: Any, max_prompt_length: int) -> PromptData:
    """Read and tokenize a prompt-only JSONL file. Raises ValueError naming the bad line."""
    if max_prompt_length < 1:
        raise ValueError("max_prompt_length must be at least 1")
    examples: list[PromptExample] = []
    n_rows = n_truncated = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            n_rows += 1
            try:
                row = json.loads(line)
                prompt_ids = tokenize_prompt(row, tokenizer)
            except (ValueError, TypeError, KeyError, TemplateError) as e:
                raise ValueError(f"line {line_no}: {e}") from e
            if not prompt_ids:
                raise ValueError(f"line {line_no}: the prompt has no tokens")
            if len(prompt_ids) > max_prompt_length:
                n_truncated += 1
                prompt_ids = prompt_ids[-max_prompt_length:]
            examples.append(PromptExample(prompt_ids, row, line_no))
    if n_rows == 0:
        raise ValueError(f"{Path(path).name} has no rows")
    return PromptData(examples, n_rows, n_truncated)


def tokenize_prompt(row: Any, tokenizer: Any) -> list[int]:
    """The prompt token ids of one row (see the module docstring for the formats)."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        prompt = row["messages"]
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError('"prompt" must not be empty')
            return _encode(tokenizer, prompt)
    else:
        raise ValueError('a prompt row needs "prompt" or "messages"')
    messages = _messages(prompt)
    if messages[-1]["role"] == "assistant":
        raise ValueError("a prompt conversation must not end with an assistant turn")
    return _render(tokenizer, messages, tools=row.get("tools"), add_generation_prompt=True)
