"""Where each completion starts, for every preference row format; truncation; collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core.preference_data import (
    PreferenceExample,
    UnpairedExample,
    collate_pairs,
    collate_unpaired,
    load_preference,
    load_unpaired,
)

SKY = [{"role": "user", "content": "What colour is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
# The tiny model's ChatML: no newline after the final <|im_end|>.
SKY_PROMPT = "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n"


def load_one(write_rows: Any, tokenizer: Any, row: dict[str, Any], max_seq_len: int = 128) -> Any:
    data = load_preference(write_rows([row]), tokenizer, max_seq_len)
    assert (data.n_rows, data.n_truncated, data.n_dropped) == (1, 0, 0)
    return data.examples[0]


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    "row",
    [
        # OpenAI's DPO format
        {"input": {"messages": SKY}, "preferred_output": BLUE, "non_preferred_output": GREEN},
        # TRL's, explicit prompt
        {"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
        # TRL's, implicit prompt: the shared leading messages
        {"chosen": SKY + BLUE, "rejected": SKY + GREEN},
        # TRL's, a bare string prompt is a user message
        {"prompt": "What colour is the sky?", "chosen": BLUE, "rejected": GREEN},
    ],
    ids=["openai", "trl", "trl-implicit", "trl-string-prompt"],
)
def test_conversational_rows_split_at_the_generation_prompt(
    write_rows: Any, tokenizer: Any, row: dict[str, Any]
) -> None:
    example = load_one(write_rows, tokenizer, row)

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Token by token: the prompt is the rendered prompt with the generation prompt, and each
    # completion is exactly the assistant content and the end-of-turn token.
    assert example.prompt_ids == ids(tokenizer, SKY_PROMPT)
    assert example.chosen_ids == [*ids(tokenizer, "It is blue."), im_end]
    assert example.rejected_ids == [*ids(tokenizer, "It is green."), im_end]
    assert example.margin is None and example.line == 1


def test_string_rows_append_eos_and_split_where_tokens_diverge(
    write_rows: Any, tokenizer: Any
) -> None:
    example = load_one(
        write_rows, tokenizer, {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    )

    eos = tokenizer.eos_token_id
    assert example.prompt_ids == ids(tokenizer, "The sky is")
    assert example.chosen_ids == [*ids(tokenizer, " blue."), eos]
    assert example.rejected_ids == [*ids(tokenizer, " green."), eos]


def test_string_implicit_prompt_keeps_the_space_with_the_completion(
    write_rows: Any, tokenizer: Any
) -> None:
    # Common prefix "The sky is " → the prompt is "The sky is", as TRL's extract_prompt.
    example = load_one(
        write_rows, tokenizer, {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    )

    assert tokenizer.decode(example.prompt_ids) == "The sky is"
    assert tokenizer.decode(example.chosen_ids) == " blue.<|im_end|>"
    assert tokenizer.decode(example.rejected_ids) == " green.<|im_end|>"


def test_merge_across_the_boundary_counts_as_completion(write_rows: Any, tokenizer: Any) -> None:
    # "i" + "s" merge into "is": the prompt's last token is not a prefix of the whole, so the
    # completion starts where the tokens diverge and the "i" goes with it (TRL's rule).
    row = {"prompt": "The sky i", "chosen": "s blue.", "rejected": "s green."}
    example = load_one(write_rows, tokenizer, row)

    prompt_ids = ids(tokenizer, "The sky i")
    whole = ids(tokenizer, "The sky is blue.")
    assert whole[: len(example.prompt_ids)] == example.prompt_ids
    assert len(example.prompt_ids) < len(prompt_ids)  # "is" merged: the "i" left the prompt
    assert example.prompt_ids + example.chosen_ids == [*whole, tokenizer.eos_token_id]


def test_margin(write_rows: Any, tokenizer: Any) -> None:
    row = {"prompt": SKY, "chosen": BLUE, "rejected": GREEN, "margin": 2}
    assert load_one(write_rows, tokenizer, row).margin == 2.0


def test_truncation_keeps_the_start_and_drops_pairs_left_without_completion(
    write_rows: Any, tokenizer: Any
) -> None:
    row = {"prompt": "The sky is", "chosen": " blue and clear today.", "rejected": " green."}
    prompt_len = len(ids(tokenizer, "The sky is"))
    path = write_rows([row, {**row, "prompt": "the cat sees a red apple " * 10}])

    data = load_preference(path, tokenizer, prompt_len + 2)

    assert (data.n_rows, data.n_truncated, data.n_dropped) == (2, 2, 1)
    [example] = data.examples
    assert example.chosen_ids == ids(tokenizer, " blue and clear today.")[:2]
    assert example.line == 1
    assert example.rejected_ids == [*ids(tokenizer, " green."), tokenizer.eos_token_id][:2]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "chosen": "a"}, "rejected"),
        ({"chosen": "same", "rejected": "same"}, "identical"),
        ({"chosen": BLUE, "rejected": GREEN}, "start with the same messages"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
        ({"text": "hello"}, "a row needs"),
        ({"prompt": SKY, "chosen": [{"content": "no role"}], "rejected": GREEN}, "role"),
    ],
)
def test_bad_rows_name_their_line(
    write_rows: Any, tokenizer: Any, row: dict[str, Any], message: str
) -> None:
    good = {"prompt": "x", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=f"^line 2: .*{message}"):
        load_preference(write_rows([good, row]), tokenizer, 64)


def test_empty_file(write_rows: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="has no rows"):
        load_preference(write_rows([]), tokenizer, 64)


def test_unpaired_rows_and_pairs_split_into_two(write_rows: Any, tokenizer: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": SKY, "completion": GREEN, "label": False},
        {"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
    ]

    data = load_unpaired(write_rows(rows), tokenizer, 128)

    assert data.n_rows == 4 and (data.n_truncated, data.n_dropped) == (0, 0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    got = [(tokenizer.decode(e.completion_ids), e.label, e.line) for e in data.examples]
    assert got == [
        (" blue.<|im_end|>", True, 1),
        ("It is green.<|im_end|>", False, 2),
        ("It is blue.<|im_end|>", True, 3),
        ("It is green.<|im_end|>", False, 3),
    ]
    assert data.examples[1].prompt_ids == ids(tokenizer, SKY_PROMPT)
    assert data.examples[1].completion_ids[-1] == im_end
    with pytest.raises(ValueError, match=r'^line 1: "label" must be true or false'):
        load_unpaired(write_rows([{**rows[0], "label": 1}]), tokenizer, 128)


def test_collate_pairs_puts_all_chosen_then_all_rejected(tmp_path: Path) -> None:
    examples = [
        PreferenceExample([1, 2], [3, 4, 5], [6], 1.5, 1),
        PreferenceExample([7], [8], [9, 10], None, 2),
    ]

    batch = collate_pairs(examples, pad_token_id=0)

    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5],  # chosen of pair 0
        [7, 8, 0, 0, 0],  # chosen of pair 1
        [1, 2, 6, 0, 0],  # rejected of pair 0
        [7, 9, 10, 0, 0],  # rejected of pair 1
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert batch.completion_mask.tolist() == [
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
    ]
    assert batch.num_tokens == 5 + 2 + 3 + 3
    assert batch.margin is not None and batch.margin.tolist() == [1.5, 0.0]
    no_margin = collate_pairs([examples[1]], pad_token_id=0)
    assert no_margin.margin is None


def test_collate_unpaired() -> None:
    batch = collate_unpaired(
        [UnpairedExample([1], [2, 3], True, 1), UnpairedExample([4, 5], [6], False, 2)], 0
    )

    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch.completion_mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert torch.equal(batch.labels, torch.tensor([True, False]))
    assert batch.num_tokens == 6
