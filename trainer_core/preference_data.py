"""Preference rows from a JSONL file, tokenized into a prompt and two completions.

Two row formats are accepted (the file validator calls both ``preference``):

- OpenAI's DPO format: ``{"input": {"messages": [...], "tools"?: [...]},
  "preferred_output": [assistant messages], "non_preferred_output": [assistant messages]}``.
- TRL's: ``{"prompt"?: str | messages, "chosen": str | messages, "rejected": str | messages}``.
  Without ``"prompt"`` the prompt is implicit: the leading messages (or, for strings, the
  leading characters) that ``chosen`` and ``rejected`` share, as TRL's ``extract_prompt``.
  If any of the three is a message list the row is conversational, and a bare string is then a
  user message (prompt) or an assistant message (chosen/rejected), as in ``trainer_core.supervised_data``.

Either may carry a numeric ``"margin"`` (reward modelling: how much better chosen is).

Tokenization follows TRL's DPOTrainer: the prompt alone (chat: with the generation prompt),
prompt+chosen and prompt+rejected are tokenized as wholes, and the completion starts where the
token sequences diverge (the common-prefix rule, so a merge across the boundary or a template
that renders the prompt differently never puts prompt tokens in a completion). Plain strings
get EOS appended, so the model learns to stop; chat completions end with whatever the template
closes a turn with.

Truncation keeps the start of each side (prompt+chosen, prompt+rejected) at ``max_seq_len``;
a pair with no completion token left on either side is dropped and counted.

KTO's unpaired rows ``{"prompt", "completion", "label": bool}`` load with ``load_unpaired``,
which also takes preference rows (each pair becomes a desirable and an undesirable row).

``collate_pairs`` stacks a micro-batch as TRL's ``DataCollatorForPreference`` does: all
chosen rows, then all rejected rows, right-padded, so one forward pass scores both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from trainer_core import shared_prompt
from trainer_core.supervised_data import (
    Message,
    _common_prefix_len,
    _encode,
    _messages,
    _render,
    _with_eos,
)


@dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]
    # Completion tokens only (what follows the prompt), ending with EOS / the end-of-turn
    # token unless truncation cut them.
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None  # the row's optional "margin" column (reward modelling)
    line: int  # 1-based line of the row in its file

    @property
    def padded_length(self) -> int:
        """The row length this pair pads to: its longer side (chosen and rejected share a
        batch), which is what length-grouped batching sorts by."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """The row length of this pair with the prompt once (``shared_prompt``)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def pair_lengths(examples: Sequence[PreferenceExample], *, one_row: bool) -> list[int]:
    """What length-grouped batching sorts pairs by: the one-row length where the model runs a
    pair as one row (``shared_prompt``), else the pair's longer side."""
    return [e.shared_length if one_row else e.padded_length for e in examples]


@dataclass(frozen=True)
class PreferenceData:
    examples: list[PreferenceExample]
    n_rows: int
    n_truncated: int  # pairs with a side cut to max_seq_len (kept or dropped)
    n_dropped: int  # pairs with no completion token left on a side after truncation


@dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool  # True = desirable
    line: int

    @property
    def padded_length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class UnpairedData:
    examples: list[UnpairedExample]
    n_rows: int  # unpaired rows; a preference row counts as two
    n_truncated: int
    n_dropped: int


# -- loading -------------------------------------------------------------------------------


def load_preference(path: str | Path, tokenizer: Any, max_seq_len: int) -> PreferenceData:
    """Read and tokenize a preference JSONL file. Raises ValueError naming the bad line."""
    examples: list[PreferenceExample] = []
    n_rows = n_truncated = n_dropped = 0
    for line_no, row in _rows(path):
        n_rows += 1
        try:
            if not isinstance(row, dict) or not _is_preference(row):
                raise ValueError(
                    'a row needs "input", "preferred_output" and "non_preferred_output", '
                    'or "chosen" and "rejected"'
                )
            prompt_ids, chosen_ids, rejected_ids = tokenize_pair(row, tokenizer)
            margin = _margin(row)
        except (ValueError, TypeError, KeyError, TemplateError) as e:
            raise ValueError(f"line {line_no}: {e}") from e
        chosen_kept = _truncate(prompt_ids, chosen_ids, max_seq_len)
        rejected_kept = _truncate(prompt_ids, rejected_ids, max_seq_len)
        if chosen_kept is not chosen_ids or rejected_kept is not rejected_ids:
            n_truncated += 1
            if not _has_target(prompt_ids, chosen_kept) or not _has_target(
                prompt_ids, rejected_kept
            ):
                n_dropped += 1
                continue
        examples.append(PreferenceExample(prompt_ids, chosen_kept, rejected_kept, margin, line_no))
    if n_rows == 0:
        raise ValueError(f"{Path(path).name} has no rows")
    return PreferenceData(examples, n_rows, n_truncated, n_dropped)


def load_unpaired(path: str | Path, tokenizer: Any, max_seq_len: int) -> UnpairedData:
    """Read KTO rows (``{"prompt", "completion", "label"}``) or preference rows (each pair
    gives a True and a False row). Raises ValueError naming the bad line."""
    examples: list[UnpairedExample] = []
    n_rows = n_truncated = n_dropped = 0
    for line_no, row in _rows(path):
        try:
            if not isinstance(row, dict):
                raise ValueError("a row must be a JSON object")
            sides: list[tuple[list[int], list[int], bool]]
            if _is_preference(row):
                prompt_ids, chosen_ids, rejected_ids = tokenize_pair(row, tokenizer)
                sides = [(prompt_ids, chosen_ids, True), (prompt_ids, rejected_ids, False)]
            elif "completion" in row and "label" in row:
                if not isinstance(row["label"], bool):
                    raise ValueError('"label" must be true or false')
                if "prompt" not in row:
                    raise ValueError('the row has no "prompt"')
                prompt_ids, completion_ids = _tokenize_prompt_completion(
                    row["prompt"], row["completion"], tokenizer, row.get("tools")
                )
                sides = [(prompt_ids, completion_ids, row["label"])]
            else:
                raise ValueError(
                    'a row needs "prompt", "completion" and "label", or a preference pair'
                )
        except (ValueError, TypeError, KeyError, TemplateError) as e:
            raise ValueError(f"line {line_no}: {e}") from e
        for prompt_ids, completion_ids, label in sides:
            n_rows += 1
            kept = _truncate(prompt_ids, completion_ids, max_seq_len)
            if kept is not completion_ids:
                n_truncated += 1
                if not _has_target(prompt_ids, kept):
                    n_dropped += 1
                    continue
            examples.append(UnpairedExample(prompt_ids, kept, label, line_no))
    if n_rows == 0:
        raise ValueError(f"{Path(path).name} has no rows")
    return UnpairedData(examples, n_rows, n_truncated, n_dropped)


def tokenize_pair(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` of one preference row (either format)."""
    tools = row.get("tools")
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    else:
        source = row["input"]
        if not isinstance(source, dict):
            raise ValueError('"input" must be {"messages": [...]}')
        prompt, tools = source["messages"], source.get("tools", tools)
        chosen, rejected = row["preferred_output"], row["non_preferred_output"]
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str | list):
            raise ValueError(f'"{name}" must be a string or a list of messages')
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise ValueError(f'"{name}" must not be empty')

    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        prompt_ids = _encode(tokenizer, prompt)
        prompt_chosen = _with_eos(_encode(tokenizer, prompt + chosen), tokenizer)
        prompt_rejected = _with_eos(_encode(tokenizer, prompt + rejected), tokenizer)
    else:
        prompt_messages = _as_messages(prompt, "user")
        prompt_ids = _render(tokenizer, prompt_messages, tools=tools, add_generation_prompt=True)
        prompt_chosen = _render(
            tokenizer, prompt_messages + _as_messages(chosen, "assistant"), tools=tools
        )
        prompt_rejected = _render(
            tokenizer, prompt_messages + _as_messages(rejected, "assistant"), tools=tools
        )
    # TRL's rule: the completion begins where either side first leaves the rendered prompt,
    # so both completions are scored after the same context.
    start = min(
        _common_prefix_len(prompt_ids, prompt_chosen),
        _common_prefix_len(prompt_ids, prompt_rejected),
    )
    chosen_ids, rejected_ids = prompt_chosen[start:], prompt_rejected[start:]
    if not chosen_ids or not rejected_ids:
        raise ValueError("a completion renders to no tokens after the prompt")
    return prompt_ids[:start], chosen_ids, rejected_ids


def _tokenize_prompt_completion(
    prompt: Any, completion: Any, tokenizer: Any, tools: Any
) -> tuple[list[int], list[int]]:
    if not isinstance(prompt, str | list) or not isinstance(completion, str | list):
        raise ValueError('"prompt" and "completion" must be strings or lists of messages')
    if not completion:
        raise ValueError('"completion" must not be empty')
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = _encode(tokenizer, prompt)
        input_ids = _with_eos(_encode(tokenizer, prompt + completion), tokenizer)
    else:
        prompt_messages = _as_messages(prompt, "user")
        prompt_ids = _render(tokenizer, prompt_messages, tools=tools, add_generation_prompt=True)
        input_ids = _render(
            tokenizer, prompt_messages + _as_messages(completion, "assistant"), tools=tools
        )
    start = _common_prefix_len(prompt_ids, input_ids)
    if start == len(input_ids):
        raise ValueError("the completion renders to no tokens after the prompt")
    return prompt_ids[:start], input_ids[start:]


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split the shared start of ``chosen`` and ``rejected`` off as the prompt (TRL's
    ``extract_prompt``): common leading messages, or common leading characters."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            raise ValueError('"chosen" and "rejected" are identical and there is no "prompt"')
        n = _common_prefix_len(chosen, rejected)  # type: ignore[arg-type]
        n = min(n, len(chosen) - 1, len(rejected) - 1)  # leave each side a character
        if n > 0 and chosen[n - 1] == " ":
            n -= 1  # the completion keeps its leading space, as TRL's
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise ValueError(
                'without a "prompt", "chosen" and "rejected" must start with the same messages'
            )
        return chosen[:n], chosen[n:], rejected[n:]
    raise ValueError('without a "prompt", "chosen" and "rejected" must both be strings or lists')


def _as_messages(value: str | list[Any], role: str) -> list[Message]:
    return _messages([{"role": role, "content": value}] if isinstance(value, str) else value)


def _is_preference(row: dict[str, Any]) -> bool:
    return bool({"chosen", "rejected", "preferred_output", "non_preferred_output"} & row.keys())


def _margin(row: dict[str, Any]) -> float | None:
    margin = row.get("margin")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise ValueError('"margin" must be a number')
    return float(margin)


def _rows(path: str | Path) -> Any:
    """``(line_no, parsed row)`` of every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"line {line_no}: not valid JSON ({e})") from e
            yield line_no, row


def _truncate(prompt_ids: list[int], completion_ids: list[int], max_seq_len: int) -> list[int]:
    """The completion cut so prompt+completion fits; the same list when nothing was cut."""
    room = max_seq_len - len(prompt_ids)
    return completion_ids if len(completion_ids) <= room else completion_ids[: max(0, room)]


def _has_target(prompt_ids: list[int], completion_ids: list[int]) -> bool:
    # Position 0 is never a target (nothing predicts it), so an empty prompt costs one token.
    return len(completion_ids) > (0 if prompt_ids else 1)


# -- batching ------------------------------------------------------------------------------


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T): all prompt+chosen rows, then all prompt+rejected rows
    attention_mask: torch.Tensor  # (2B, T), 1 = real token
    completion_mask: torch.Tensor  # (2B, T), 1 = completion token (a target of the loss)
    margin: torch.Tensor | None  # (B,) float, None when no example has a margin (missing = 0)
    num_tokens: int  # non-padding tokens
    # The same pairs as one row each, the prompt computed once (shared_prompt.py); what the
    # model actually runs where its attention takes a 4D mask.
    shared: shared_prompt.SharedPromptRows | None = None


@dataclass
class UnpairedBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B,) bool, True = desirable
    num_tokens: int


def collate_pairs(examples: Sequence[PreferenceExample], pad_token_id: int) -> PairBatch:
    """Right-pad the chosen rows then the rejected rows of ``examples`` into one batch."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples]
    rows += [(e.prompt_ids, e.rejected_ids) for e in examples]
    input_ids, attention_mask, completion_mask = _pad(rows, pad_token_id)
    margin = None
    if any(e.margin is not None for e in examples):
        margin = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)
    shared = shared_prompt.collate(examples, pad_token_id)
    num_tokens = int(attention_mask.sum())
    return PairBatch(input_ids, attention_mask, completion_mask, margin, num_tokens, shared)


def collate_unpaired(examples: Sequence[UnpairedExample], pad_token_id: int) -> UnpairedBatch:
    """Right-pad ``examples`` (prompt+completion rows) into one batch."""
    input_ids, attention_mask, completion_mask = _pad(
        [(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id
    )
    labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return UnpairedBatch(
        input_ids, attention_mask, completion_mask, labels, int(attention_mask.sum())
    )


def _pad(
    rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask), each (N, T), of (prompt, completion) rows."""
    longest = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        p, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, p:n] = 1
    return input_ids, attention_mask, completion_mask
