"""One row per preference pair, the prompt computed once: the same log-probs and rewards as
two padded rows per pair, with the rejected answer never seeing the chosen one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from trainer_core import shared_prompt
from trainer_core.methods import reward_model
from trainer_core.models import load_model, load_tokenizer
from trainer_core.preference_data import PreferenceExample, collate_pairs
from trainer_core.reference import forward_logps
from trainer_core.reward_models import load_reward_base


def pairs(pad: int) -> list[PreferenceExample]:
    """Mixed lengths, an empty prompt, and a chosen answer ending in the pad id (a tokenizer
    that pads with EOS)."""
    return [
        PreferenceExample([5, 6, 7], [8, 9, 10, 11], [12, 13], None, 1),
        PreferenceExample([20], [21, 22], [23, 24, 25, 26, 27], None, 2),
        PreferenceExample([], [30, 31, 32], [33, 34], None, 3),
        PreferenceExample([40, 41, 42, 43, 44], [45, pad], [46, 47, 48], None, 4),
    ]


def test_layout_positions_and_scored_tokens() -> None:
    """Row = prompt + chosen + rejected; positions continue the prompt in both answers; each
    answer token is scored from the position before it in its own sequence, the first from
    the prompt's last position (none when the prompt is empty)."""
    rows = shared_prompt.collate(pairs(pad=0)[:1], pad_token_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 3, 4]]
    assert rows.segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3]]
    # Kept: 2 (predicts chosen 8 and rejected 12), 3, 4, 5 (chosen 9..11), 7 (rejected 13).
    assert rows.keep.nonzero()[:, 1].tolist() == [2, 3, 4, 5, 7]
    assert rows.pick.tolist() == [0, 1, 2, 3, 0, 4]
    assert rows.targets.tolist() == [8, 9, 10, 11, 12, 13]
    assert rows.last.tolist() == [6, 8]  # chosen ends at 11, rejected at 13

    empty = shared_prompt.collate(pairs(pad=0)[2:3], pad_token_id=0)
    assert empty.targets.tolist() == [31, 32, 34]  # no predictor for either first token
    assert empty.position_ids.tolist() == [[0, 1, 2, 0, 1]]


def test_mask_lets_the_rejected_answer_see_the_prompt_but_not_the_chosen() -> None:
    mask = shared_prompt.attention_mask(torch.tensor([[1, 1, 2, 2, 3, 3, 0]]))[0, 0]
    assert mask[5].tolist() == [True, True, False, False, True, True, False]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[6].tolist() == [False] * 6 + [True]  # padding sees itself only


def test_dpo_logps_equal_the_two_row_layout(tiny_model: Path) -> None:
    """Per-token and summed log-probs of every chosen and rejected token agree with two padded
    rows per pair within fp32 rounding, and the shared rows run fewer positions (40 for 64)."""
    model = load_model(str(tiny_model))
    model.eval()
    pad = load_tokenizer(str(tiny_model)).pad_token_id
    batch = collate_pairs(pairs(pad), pad)
    assert batch.shared is not None and shared_prompt.supported(model)
    with torch.no_grad():
        per_token, logps = forward_logps(model, batch)
        per_token_two, logps_two = forward_logps(model, dataclasses.replace(batch, shared=None))
    assert (per_token != 0).sum() == (per_token_two != 0).sum() == 21
    torch.testing.assert_close(per_token, per_token_two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps, logps_two, rtol=1e-5, atol=1e-5)
    assert (batch.shared.input_ids.numel(), batch.input_ids.numel()) == (4 * 10, 8 * 8)


def test_changing_the_chosen_answer_leaves_the_rejected_logps_alone(tiny_model: Path) -> None:
    model = load_model(str(tiny_model))
    model.eval()
    first = pairs(pad=0)[:2]
    other = [dataclasses.replace(first[0], chosen_ids=[50, 51, 52, 53]), first[1]]
    with torch.no_grad():
        _, logps = forward_logps(model, collate_pairs(first, 0))
        _, changed = forward_logps(model, collate_pairs(other, 0))
    assert not torch.allclose(logps[0], changed[0])  # the chosen answer changed
    torch.testing.assert_close(logps[2:], changed[2:], rtol=0, atol=1e-6)  # rejected did not


def test_reward_scores_equal_the_classifier_on_two_rows(tiny_model: Path) -> None:
    """The score head read at each sequence's last non-pad token equals what the sequence
    classifier pools from two padded rows, including a chosen answer ending in the pad id."""
    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = load_reward_base(str(tiny_model), pad_token_id=tokenizer.pad_token_id)
    model.eval()
    assert reward_model.uses_shared_prompt(model)
    batch = collate_pairs(pairs(tokenizer.pad_token_id), tokenizer.pad_token_id)
    with torch.no_grad():
        shared = reward_model.forward(model, batch)
        two_rows = reward_model.forward(model, dataclasses.replace(batch, shared=None))
    for ours, theirs in zip(shared, two_rows, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert len(set(torch.cat(shared).tolist())) == 8  # eight different sequences scored
