"""Supervised rows from a JSONL file, tokenized into ``input_ids`` and a ``completion_mask``.

Three row formats are accepted (docs/methods.md names them as the file validator does):

- ``chat``: ``{"messages": [{"role", "content"}, ...]}``; content is a string or a list of
  ``{"type": "text", "text": ...}`` parts. Loss on assistant turns only (an assistant message
  with ``"weight": 0`` is not trained on, as in OpenAI's format); with
  ``assistant_only_loss=False``, on every token.
- ``prompt_completion``: ``{"prompt": str | messages, "completion": str | messages}``; loss on
  the completion only, which ends with EOS; with ``completion_only_loss=False``, on every token.
- ``text``: ``{"text": str}``; loss on every token, EOS appended.

``completion_mask[t] == 1`` means token ``t`` is a target of the loss (predicted from the
tokens before it), so position 0 never counts.

How assistant turns are found: the chat template is rendered on message prefixes, and the
tokens that ``messages[:i+1]`` adds beyond ``messages[:i]`` + the generation prompt are turn
``i``'s. This needs nothing from the template (no ``{% generation %}`` markers), so it works
with hub templates as they are. Some templates render an earlier turn differently once later
turns follow (e.g. dropping reasoning), so a prefix rendering need not be a token prefix of
the whole conversation; positions are then taken from the longest common prefix with it (and
the turn's end from the longest run of the whole conversation that ends the turn's own
rendering), so the span stays inside what the template renders for the whole conversation.
Prompt/completion rows use the same common-prefix rule, as TRL does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

Message = dict[str, Any]


@dataclass(frozen=True)
class SupervisedExample:
    input_ids: list[int]
    completion_mask: list[int]  # 1 = this token is a target of the loss
    line: int  # 1-based line of the row in its file


@dataclass(frozen=True)
class SupervisedData:
    examples: list[SupervisedExample]
    n_rows: int
    n_truncated: int  # rows cut to max_seq_len (kept if any loss token survived)
    n_dropped: int  # rows with no loss token left after truncation


def load_supervised(
    path: str | Path,
    tokenizer: Any,
    max_seq_len: int,
    *,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
) -> SupervisedData:
    """Read and tokenize a supervised JSONL file. Raises ValueError naming the bad line.

    ``completion_only_loss`` / ``assistant_only_loss`` as in ``tokenize_row``.
    """
    examples: list[SupervisedExample] = []
    n_rows = n_truncated = n_dropped = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            n_rows += 1
            try:
                row = json.loads(line)
                input_ids, completion_mask = tokenize_row(
                    row,
                    tokenizer,
                    completion_only_loss=completion_only_loss,
                    assistant_only_loss=assistant_only_loss,
                )
            except (ValueError, TypeError, KeyError, TemplateError) as e:
                raise ValueError(f"line {line_no}: {e}") from e
            if sum(completion_mask[1:]) == 0:
                raise ValueError(f"line {line_no}: the row has no token to train on")
            if len(input_ids) > max_seq_len:
                n_truncated += 1
                # Keep the start: the prompt is what the completion is conditioned on.
                input_ids, completion_mask = input_ids[:max_seq_len], completion_mask[:max_seq_len]
                if sum(completion_mask[1:]) == 0:
                    n_dropped += 1
                    continue
            examples.append(SupervisedExample(input_ids, completion_mask, line_no))
    if n_rows == 0:
        raise ValueError(f"{Path(path).name} has no rows")
    return SupervisedData(examples, n_rows, n_truncated, n_dropped)


def tokenize_row(
    row: Any,
    tokenizer: Any,
    *,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
) -> tuple[list[int], list[int]]:
    """``(input_ids, completion_mask)`` of one row in any supervised format.

    ``assistant_only_loss=False`` counts every token of a chat row, and
    ``completion_only_loss=False`` every token of a prompt/completion row (the tokens are the
    same either way; only the mask changes).
    """
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        input_ids, completion_mask = _tokenize_chat(
            _messages(row["messages"]), tokenizer, row.get("tools")
        )
        return input_ids, completion_mask if assistant_only_loss else [1] * len(input_ids)
    if "prompt" in row and "completion" in row:
        input_ids, completion_mask = _tokenize_prompt_completion(
            row["prompt"], row["completion"], tokenizer
        )
        return input_ids, completion_mask if completion_only_loss else [1] * len(input_ids)
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise ValueError('"text" must be a non-empty string')
        input_ids = _with_eos(_encode(tokenizer, text), tokenizer)
        return input_ids, [1] * len(input_ids)
    raise ValueError('a row needs "messages", "prompt" and "completion", or "text"')


def _tokenize_chat(
    messages: list[Message], tokenizer: Any, tools: Any = None
) -> tuple[list[int], list[int]]:
    input_ids = _render(tokenizer, messages, tools=tools)
    completion_mask = [0] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        # A conversation that opens with an assistant turn has no prefix to render.
        start = 0
        if i > 0:
            prompt_ids = _render(tokenizer, messages[:i], tools=tools, add_generation_prompt=True)
            start = _common_prefix_len(prompt_ids, input_ids)
        end = _turn_end(_render(tokenizer, messages[: i + 1], tools=tools), input_ids, start)
        completion_mask[start:end] = [1] * max(0, end - start)
    return input_ids, completion_mask


def _turn_end(turn_ids: list[int], input_ids: list[int], start: int) -> int:
    """Where the turn that ``turn_ids`` ends with (from ``start``) ends in ``input_ids``."""
    end = _common_prefix_len(turn_ids, input_ids)
    if end == len(turn_ids):
        return end  # the rendering is a token prefix of the whole: the usual case
    # The template renders this turn differently once later turns follow it (Qwen3 drops an
    # empty <think></think>, reasoning templates strip the thinking). Take the longest
    # stretch of the whole conversation, from the turn's start, that ends the turn's own
    # rendering: its content and end-of-turn tokens as they really appear.
    new_ids = turn_ids[start:]
    for k in range(len(new_ids), 0, -1):
        if input_ids[start : start + k] == new_ids[-k:]:
            return max(end, start + k)
    return end


def _tokenize_prompt_completion(
    prompt: Any, completion: Any, tokenizer: Any
) -> tuple[list[int], list[int]]:
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError('"completion" must not be empty')
        # Tokenized together, as the model will see them; a merge across the boundary
        # counts as prompt (the common prefix stops before it), as in TRL.
        prompt_ids = _encode(tokenizer, prompt)
        input_ids = _with_eos(_encode(tokenizer, prompt + completion), tokenizer)
    else:
        # Conversational: a bare string on either side is a user / assistant message.
        prompt_messages = _messages(
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        )
        completion_messages = _messages(
            [{"role": "assistant", "content": completion}]
            if isinstance(completion, str)
            else completion
        )
        prompt_ids = _render(tokenizer, prompt_messages, add_generation_prompt=True)
        input_ids = _render(tokenizer, prompt_messages + completion_messages)
    start = _common_prefix_len(prompt_ids, input_ids)
    return input_ids, [0] * start + [1] * (len(input_ids) - start)


def _messages(value: Any) -> list[Message]:
    """Check a message list and flatten list-of-parts content into a string."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError('every message needs a string "role"')
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = "".join(_text_part(part) for part in content)
        elif content is not None and not isinstance(content, str):
            raise ValueError("message content must be a string or a list of text parts")
        if message.get("weight", 1) not in (0, 1):
            raise ValueError('"weight" must be 0 or 1')
        messages.append(message)
    return messages


def _text_part(part: Any) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or "text" not in part:
        raise ValueError('content parts must be {"type": "text", "text": ...}')
    return str(part["text"])


def _render(
    tokenizer: Any,
    messages: list[Message],
    *,
    tools: Any = None,
    add_generation_prompt: bool = False,
) -> list[int]:
    # The template adds any BOS itself, so no special tokens are added on top of it.
    shown = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return list(
        tokenizer.apply_chat_template(
            shown,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Plain text gets the tokenizer's own special tokens (e.g. Llama's BOS), as in TRL.
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _with_eos(input_ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or (input_ids and input_ids[-1] == eos):
        return input_ids
    return [*input_ids, eos]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
