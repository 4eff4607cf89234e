"""Which tokens count in the SFT loss, for every row format, and batching."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core.batching import collate, epoch_steps, steps_per_epoch
from trainer_core.supervised_data import SupervisedExample, load_supervised, tokenize_row

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
]


def counted_spans(tokenizer: Any, input_ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive counted tokens."""
    spans: list[list[int]] = []
    for i, (token, counted) in enumerate(zip(input_ids, mask, strict=True)):
        if counted:
            if i == 0 or not mask[i - 1]:
                spans.append([])
            spans[-1].append(token)
    return [tokenizer.decode(span) for span in spans]


def test_chat_counts_assistant_turns_and_their_end_token_only(tokenizer: Any) -> None:
    input_ids, mask = tokenize_row({"messages": CONVERSATION}, tokenizer)

    assert counted_spans(tokenizer, input_ids, mask) == ["Hello!<|im_end|>", "It is 4.<|im_end|>"]
    # Token by token: the counted tokens are exactly those of the two assistant contents,
    # each followed by the end-of-turn token; headers, system and user text are not.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [
        *tokenizer.encode("Hello!", add_special_tokens=False),
        im_end,
        *tokenizer.encode("It is 4.", add_special_tokens=False),
        im_end,
    ]
    assert [t for t, m in zip(input_ids, mask, strict=True) if m] == expected
    not_counted = tokenizer.decode([t for t, m in zip(input_ids, mask, strict=True) if not m])
    assert not_counted == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_content_parts_and_zero_weight(tokenizer: Any) -> None:
    messages = copy.deepcopy(CONVERSATION)
    messages[2]["weight"] = 0
    messages[4]["content"] = [{"type": "text", "text": "It is "}, {"type": "text", "text": "4."}]

    input_ids, mask = tokenize_row({"messages": messages}, tokenizer)

    assert counted_spans(tokenizer, input_ids, mask) == ["It is 4.<|im_end|>"]


# Hub templates as they ship (Llama 3 without its BOS, Qwen2.5's ChatML with the newline after
# each turn), applied to our tokenizer: the rule needs nothing from the template.
HUB_TEMPLATES = {
    "llama3": (
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}",
        ["Hello!<|eot_id|>", "It is 4.<|eot_id|>"],
    ),
    "qwen2.5": (
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + "
        "message.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        ["Hello!<|im_end|>\n", "It is 4.<|im_end|>\n"],
    ),
}


@pytest.mark.parametrize("name", sorted(HUB_TEMPLATES))
def test_chat_with_hub_templates(tokenizer: Any, name: str) -> None:
    template, expected = HUB_TEMPLATES[name]
    hub_like = copy.copy(tokenizer)
    hub_like.chat_template = template

    input_ids, mask = tokenize_row({"messages": CONVERSATION}, hub_like)

    assert counted_spans(hub_like, input_ids, mask) == expected


def test_chat_template_that_rerenders_earlier_turns(tokenizer: Any) -> None:
    # Like Qwen3: the last assistant turn gets an empty think block that disappears once
    # later turns follow, so a prefix rendering is not a token prefix of the whole.
    qwen3_like = copy.copy(tokenizer)
    qwen3_like.chat_template = (
        "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
        "{%- if m['role'] == 'assistant' and loop.last %}<think></think>{% endif -%}"
        "{{ m['content'] }}<|im_end|>{%- endfor -%}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
    )

    input_ids, mask = tokenize_row({"messages": CONVERSATION}, qwen3_like)

    assert counted_spans(qwen3_like, input_ids, mask) == [
        "Hello!<|im_end|>",
        "<think></think>It is 4.<|im_end|>",
    ]


def test_prompt_completion_counts_completion_and_eos(tokenizer: Any) -> None:
    input_ids, mask = tokenize_row({"prompt": "The sky is", "completion": " blue."}, tokenizer)

    assert counted_spans(tokenizer, input_ids, mask) == [" blue.<|im_end|>"]
    assert tokenizer.decode(input_ids) == "The sky is blue.<|im_end|>"


def test_conversational_prompt_completion(tokenizer: Any) -> None:
    row = {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}

    input_ids, mask = tokenize_row(row, tokenizer)

    assert counted_spans(tokenizer, input_ids, mask) == ["It is 4.<|im_end|>"]


def test_text_counts_everything_and_eos(tokenizer: Any) -> None:
    input_ids, mask = tokenize_row({"text": "the cat sees a red apple"}, tokenizer)

    assert all(mask)
    assert tokenizer.decode(input_ids) == "the cat sees a red apple<|im_end|>"


def test_truncation_keeps_start_and_drops_rows_without_loss_tokens(
    tokenizer: Any, write_rows: Any
) -> None:
    long_prompt = "the cat sees a red apple " * 20
    path = write_rows(
        [
            {"prompt": long_prompt, "completion": " yes"},  # completion cut off: dropped
            {"text": long_prompt},  # truncated, kept
            {"prompt": "Hi", "completion": " there"},  # untouched
        ]
    )

    data = load_supervised(path, tokenizer, max_seq_len=16)

    assert (data.n_rows, data.n_truncated, data.n_dropped) == (3, 2, 1)
    assert [e.line for e in data.examples] == [2, 3]
    kept = data.examples[0]
    assert len(kept.input_ids) == 16
    assert tokenizer.decode(kept.input_ids).startswith("the cat sees")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2"),
        ('{"messages": [{"role": "user", "content": "no answer"}]}', "line 2: the row has no"),
        ('{"messages": [{"content": "x"}]}', 'line 2: every message needs a string "role"'),
        ('{"foo": 1}', 'line 2: a row needs "messages"'),
    ],
)
def test_bad_row_names_its_line(
    tokenizer: Any, write_rows: Any, bad_line: str, message: str
) -> None:
    path: Path = write_rows([{"text": "fine"}])
    path.write_text(path.read_text() + bad_line + "\n")

    with pytest.raises(ValueError, match=message):
        load_supervised(path, tokenizer, max_seq_len=64)


def test_collate_pads_right_and_masks_padding() -> None:
    examples = [
        SupervisedExample([5, 6, 7], [0, 1, 1], line=1),
        SupervisedExample([8, 9], [0, 1], line=2),
    ]

    batch = collate(examples, pad_token_id=0)

    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.completion_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    assert (batch.num_tokens, batch.num_loss_tokens) == (5, 3)


def test_epoch_order_is_seeded_per_epoch_and_covers_every_example() -> None:
    def plan(epoch: int, seed: int = 3) -> list[list[list[int]]]:
        return epoch_steps(10, batch_size=3, gradient_accumulation_steps=2, seed=seed, epoch=epoch)

    rng_before = torch.get_rng_state()
    first = plan(0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a private generator, not torch's
    assert first == plan(0)  # deterministic
    assert first != plan(1)  # reshuffled each epoch
    assert first != plan(0, seed=4)
    # 10 rows → micro-batches of 3,3,3,1 → steps of 2 micro-batches each.
    assert [[len(mb) for mb in step] for step in first] == [[3, 3], [3, 1]]
    assert sorted(i for step in first for mb in step for i in mb) == list(range(10))
    assert steps_per_epoch(10, 3, 2) == len(first)


def test_loss_switches_count_every_token(tokenizer: Any, write_rows: Any) -> None:
    chat = {"messages": CONVERSATION}
    pair = {"prompt": "The sky is", "completion": " blue."}

    chat_ids, chat_mask = tokenize_row(chat, tokenizer, assistant_only_loss=False)
    pair_ids, pair_mask = tokenize_row(pair, tokenizer, completion_only_loss=False)

    assert chat_ids == tokenize_row(chat, tokenizer)[0] and all(chat_mask)
    assert pair_ids == tokenize_row(pair, tokenizer)[0] and all(pair_mask)
    # Each switch is about its own format only.
    assert tokenize_row(chat, tokenizer, completion_only_loss=False) == tokenize_row(
        chat, tokenizer
    )
    assert tokenize_row(pair, tokenizer, assistant_only_loss=False) == tokenize_row(pair, tokenizer)
    # load_supervised passes them on; a chat row without a trained turn becomes trainable.
    no_answer = {"messages": [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0}]}
    path = write_rows([pair, no_answer])
    with pytest.raises(ValueError, match="line 2: the row has no token to train on"):
        load_supervised(path, tokenizer, max_seq_len=64)
    data = load_supervised(
        path, tokenizer, max_seq_len=64, completion_only_loss=False, assistant_only_loss=False
    )
    assert [e.completion_mask for e in data.examples] == [
        [1] * len(e.input_ids) for e in data.examples
    ]


def test_length_grouped_steps_hold_rows_of_similar_length() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(40)]  # 40 distinct lengths in 1..100

    def plan(batch_size: int, accumulation: int, seed: int = 0) -> list[list[list[int]]]:
        return epoch_steps(
            40,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            seed=seed,
            epoch=0,
            lengths=lengths,
        )

    steps = plan(4, 1)
    assert plan(4, 1) == steps and plan(4, 1, seed=1) != steps
    assert sorted(i for step in steps for mb in step for i in mb) == list(range(40))
    # All 40 rows fit one window (16 steps of 4), so steps are consecutive runs of the sorted
    # lengths: no two steps overlap in length.
    spans = sorted((min(lengths[i] for i in s[0]), max(lengths[i] for i in s[0])) for s in steps)
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(spans))
    # The steps themselves are shuffled, not served longest first.
    longest = [max(lengths[i] for i in s[0]) for s in steps]
    assert longest not in (sorted(longest), sorted(longest, reverse=True))
    # Grouping is by optimizer step: 1 x 4 accumulation trains the same rows in each step.
    assert [sorted(i for mb in s for i in mb) for s in plan(1, 4)] == [sorted(s[0]) for s in steps]
    # A short step stays last (and holds the shortest rows of its window).
    uneven = epoch_steps(
        10, batch_size=4, gradient_accumulation_steps=1, seed=0, epoch=0, lengths=lengths[:10]
    )
    assert [len(step[0]) for step in uneven] == [4, 4, 2]
    assert max(lengths[i] for i in uneven[-1][0]) <= min(
        lengths[i] for i in uneven[0][0] + uneven[1][0]
    )


def test_length_grouping_cuts_padding() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(400)]

    def padded_tokens(grouped: bool) -> int:
        steps = epoch_steps(
            400,
            batch_size=8,
            gradient_accumulation_steps=1,
            seed=0,
            epoch=0,
            lengths=lengths if grouped else None,
        )
        return sum(len(mb) * max(lengths[i] for i in mb) for step in steps for mb in step)

    real = sum(lengths)
    assert padded_tokens(grouped=False) > 1.5 * real
    assert padded_tokens(grouped=True) < 1.1 * real
