"""Rollouts on the tiny model (``generation``) and the prompt-only rows they start from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core import generation
from trainer_core.generation import generate, rollout_logps
from trainer_core.models import load_model
from trainer_core.prompt_data import load_prompts

QUESTIONS = ["Hi", "What is 2 + 2? Please answer with care.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    return load_model(str(tiny_model))


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        for q in QUESTIONS
    ]


def sample(model: Any, tokenizer: Any, prompts: list[list[int]], **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "num_generations": 2,
        "max_completion_length": 12,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "generator": torch.Generator().manual_seed(0),
    }
    return generate(model, tokenizer, prompts, **(options | overrides))


def test_left_padding_and_prompt_major_rows(model: Any, tokenizer: Any, prompts: Any) -> None:
    rollout = sample(model, tokenizer, prompts, num_generations=3)
    assert rollout.prompt_ids.shape == (9, max(len(p) for p in prompts))
    for row in range(9):
        prompt = prompts[row // 3]  # rows i*G .. i*G+G-1 are prompt i's
        width = rollout.prompt_ids.size(1)
        assert rollout.prompt_ids[row, width - len(prompt) :].tolist() == prompt
        assert rollout.prompt_mask[row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        assert (rollout.prompt_ids[row, : width - len(prompt)] == tokenizer.pad_token_id).all()
    assert model.training  # the mode it came in is given back


def test_eos_stops_a_row_and_masks_everything_after_it(
    model: Any, tokenizer: Any, prompts: Any
) -> None:
    """With a list of 41 EOS ids (of 512) some rows stop early, at different steps."""
    eos_ids = [tokenizer.eos_token_id, *range(100, 140)]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_ids
    try:
        rollout = sample(model, tokenizer, prompts, num_generations=4, max_completion_length=10)
    finally:
        model.generation_config.eos_token_id = saved
    assert rollout.is_eos.any() and not rollout.is_eos.all()
    for row in range(rollout.completion_ids.size(0)):
        ids = rollout.completion_ids[row].tolist()
        mask = rollout.completion_mask[row].tolist()
        stops = [t for t, token in enumerate(ids) if token in eos_ids]
        if rollout.is_eos[row]:
            end = stops[0] + 1  # the EOS itself counts
            assert mask == [1] * end + [0] * (len(ids) - end)
            assert all(token == tokenizer.pad_token_id for token in ids[end:])
        else:
            assert not stops and mask == [1] * len(ids) and len(ids) == 10
        kept = [token for token, m in zip(ids, mask, strict=True) if m]
        assert rollout.texts[row] == tokenizer.decode(kept, skip_special_tokens=True)


def test_max_completion_length_is_respected(model: Any, tokenizer: Any, prompts: Any) -> None:
    rollout = sample(model, tokenizer, prompts, max_completion_length=5)
    assert rollout.completion_ids.shape == (6, 5)
    assert (rollout.completion_mask.sum(-1) <= 5).all()


def test_micro_batches_split_the_rows_in_order(model: Any, tokenizer: Any, prompts: Any) -> None:
    rollout = sample(model, tokenizer, prompts)  # 6 rows
    chunks, parts = rollout.micro_batches(4)
    assert [rows.tolist() for rows in chunks] == [[0, 1], [2, 3], [4], [5]]
    for rows, part in zip(chunks, parts, strict=True):
        assert part.texts == [rollout.texts[i] for i in rows.tolist()]
        lengths = rollout.completion_mask[rows].sum(-1)
        assert part.completion_ids.size(1) == int(lengths.max())  # padding columns trimmed
    # More micro-batches than rows: one row each, none empty.
    assert [rows.tolist() for rows in rollout.micro_batches(8)[0]] == [[i] for i in range(6)]


def test_same_seed_same_completions(model: Any, tokenizer: Any, prompts: Any) -> None:
    first = sample(model, tokenizer, prompts)
    again = sample(model, tokenizer, prompts)
    other = sample(model, tokenizer, prompts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert first.texts == again.texts
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # The G samples of one prompt differ from each other (one prefill, G draws).
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])


@pytest.mark.parametrize(
    "options",
    [{"temperature": 1e-5}, {"top_k": 1}, {"top_p": 1e-6}],
    ids=["cold", "top_k_1", "top_p_tiny"],
)
def test_greedy_limits_equal_transformers_greedy_generate(
    model: Any, tokenizer: Any, prompts: Any, options: dict[str, Any]
) -> None:
    rollout = sample(model, tokenizer, prompts, max_completion_length=8, **options)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=tokenizer.pad_token_id,
    )[:, width:]
    assert torch.equal(rollout.completion_ids[0::2], expected)
    assert torch.equal(rollout.completion_ids[1::2], expected)


@pytest.mark.parametrize("share_prompts", [None, False], ids=["shared", "whole-rows"])
@pytest.mark.parametrize("head", ["chunked", "logits"])
def test_rollout_logps_are_the_sampling_distribution(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    head: str,
    share_prompts: bool | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each row's log-probs equal log_softmax(logits / T) of that row run alone, unpadded,
    with full logits: the shift, the temperature and the left padding are all right. Through
    the vocabulary-chunked head and through the model's own logits (the fallback where the
    chunked head does not apply), each prompt run once for its G rows or every row whole."""
    if head == "logits":
        monkeypatch.setattr(generation, "causal_lm_parts", lambda model: None)
    rollout = sample(model, tokenizer, prompts, temperature=0.7)
    with torch.no_grad():
        batched, entropies = rollout_logps(
            model, rollout, temperature=0.7, with_entropy=True, share_prompts=share_prompts
        )
        for row in range(rollout.completion_ids.size(0)):
            length = int(rollout.completion_mask[row].sum())
            prompt = prompts[row // 2]
            ids = torch.tensor([prompt + rollout.completion_ids[row, :length].tolist()])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7  # (length, V)
            logp = torch.log_softmax(logits, -1)  # (length, V)
            alone = logp.gather(-1, ids[0, len(prompt) :, None])[:, 0]
            torch.testing.assert_close(batched[row, :length], alone, atol=1e-5, rtol=1e-5)
            assert entropies is not None
            entropy = -(logp.exp() * logp).sum(-1)  # (length,)
            torch.testing.assert_close(entropies[row, :length], entropy, atol=1e-5, rtol=1e-5)
    assert entropies is not None and entropies.shape == batched.shape
    assert (entropies[rollout.completion_mask.bool()] > 0).all()


# -- prompt-only rows ------------------------------------------------------------------------


def test_prompt_rows_in_each_format(tokenizer: Any, write_rows: Callable[..., Path]) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    path = write_rows(
        [
            {"messages": messages, "answer": "blue"},
            {"prompt": messages},
            {"prompt": "Once upon a time"},
        ]
    )
    data = load_prompts(path, tokenizer, max_prompt_length=64)
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert data.examples[0].prompt_ids == list(chat)
    assert data.examples[0].item == {"messages": messages, "answer": "blue"}  # graders read it
    assert data.examples[1].prompt_ids == list(chat)
    assert data.examples[2].prompt_ids == tokenizer("Once upon a time")["input_ids"]
    assert [e.line for e in data.examples] == [1, 2, 3]
    assert (data.n_rows, data.n_truncated) == (3, 0)


def test_long_prompts_keep_their_end(tokenizer: Any, write_rows: Callable[..., Path]) -> None:
    messages = [{"role": "user", "content": "word " * 40}]
    path = write_rows([{"messages": messages}])
    full = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )
    data = load_prompts(path, tokenizer, max_prompt_length=10)
    assert data.examples[0].prompt_ids == full[-10:]  # the generation prompt survives
    assert data.n_truncated == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"completion": "x"},
        {"prompt": ""},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ],
)
def test_a_bad_row_names_its_line(
    tokenizer: Any, write_rows: Callable[..., Path], bad: dict[str, Any]
) -> None:
    path = write_rows([{"prompt": "fine"}, bad])
    with pytest.raises(ValueError, match=r"^line 2: "):
        load_prompts(path, tokenizer, max_prompt_length=16)


def test_shared_prompt_forward_gives_the_gradients_of_whole_rows(
    model: Any, tokenizer: Any, prompts: Any
) -> None:
    """``rollout_logps`` runs each prompt once for its G completions; the gradient of the
    completions' log-probs must equal that of one forward over the whole padded rows."""
    rollout = sample(model, tokenizer, prompts, num_generations=3, max_completion_length=6)
    mask = rollout.completion_mask.float()

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss.backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return flat

    shared, _ = rollout_logps(model, rollout, temperature=0.9)
    ids, attention = rollout.input_ids, rollout.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits / 0.9
    p = rollout.prompt_ids.size(1)
    whole = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, ids[:, p:, None])[..., 0]
    torch.testing.assert_close(shared * mask, whole * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grads((shared * mask).sum()), grads((whole * mask).sum()), atol=1e-5, rtol=1e-4
    )


def test_lora_sampling_merges_for_the_rollout_only(
    tiny_model: Path, tokenizer: Any, prompts: Any
) -> None:
    """Under LoRA the sampler runs on merged weights: greedy completions equal peft's own
    (unmerged) greedy generate, and afterwards every parameter is the same object with the
    same value."""
    from trainer_core.adapters import apply_adapter
    from trainer_core.specs import AdapterSpec

    policy = apply_adapter(load_model(str(tiny_model)), AdapterSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    before = {name: (param, param.detach().clone()) for name, param in policy.named_parameters()}
    rollout = sample(policy, tokenizer, prompts[:1], temperature=1e-5, max_completion_length=8)
    ids = torch.tensor([prompts[0]])
    expected = policy.generate(input_ids=ids, do_sample=False, max_new_tokens=8)[:, ids.size(1) :]
    assert torch.equal(rollout.completion_ids[:1], expected)
    for name, param in policy.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1]), name


def test_merged_lora_sampling_equals_unmerged_and_leaves_the_weights(
    tiny_model: Path, tokenizer: Any, prompts: Any
) -> None:
    """Sampled (temperature 1), not greedy: the merged rollout draws the same tokens as peft's
    unmerged layers from the same generator, their log-probs agree within 1e-5, and every
    parameter afterwards is the same object with the same bits (training is unchanged)."""
    from trainer_core.adapters import apply_adapter
    from trainer_core.generation import merged_lora
    from trainer_core.specs import AdapterSpec

    policy = apply_adapter(load_model(str(tiny_model)), AdapterSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    before = {name: (param, param.detach().clone()) for name, param in policy.named_parameters()}
    merged = sample(policy, tokenizer, prompts, num_generations=3)
    unmerged = sample(policy, tokenizer, prompts, num_generations=3, merge_lora=False)
    assert merged.completion_ids.size(1) > 4  # completions long enough to mean something
    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    assert torch.equal(merged.completion_mask, unmerged.completion_mask)
    with torch.no_grad():
        unmerged_logps, _ = rollout_logps(policy, merged, temperature=1.0)
        with merged_lora(policy) as sampler:
            merged_logps, _ = rollout_logps(sampler, merged, temperature=1.0)
    mask = merged.completion_mask.bool()
    torch.testing.assert_close(merged_logps[mask], unmerged_logps[mask], atol=1e-5, rtol=1e-5)
    # The adapter is on: these are not the base model's log-probs.
    with torch.no_grad(), policy.disable_adapter():
        base_logps, _ = rollout_logps(policy, merged, temperature=1.0)
    assert (base_logps[mask] - unmerged_logps[mask]).abs().max() > 1e-2
    for name, param in policy.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1]), name


def test_sharded_sampling_draws_what_one_process_draws(
    model: Any, tokenizer: Any, prompts: Any
) -> None:
    """Two "ranks" each sampling their prompts of a rollout (``RolloutShard``: the noise of
    every row drawn, their own kept, decoding in step) draw the rows one process draws, and
    leave the RNG where one process leaves it. Run here one after the other, each from the
    seed; ``any_running`` answers what the collective would: running until the whole
    rollout's last step."""
    from trainer_core.generation import RolloutShard

    g, total = 2, 2 * len(prompts)
    torch.manual_seed(3)
    whole = sample(model, tokenizer, prompts, num_generations=g, generator=None)
    after_whole = torch.rand(4)
    steps = whole.completion_ids.size(1)
    shares = {0: [0, 2], 1: [1]}  # prompt positions rank::2
    for rank, positions in shares.items():
        rows = torch.tensor([k * g + j for k in positions for j in range(g)])
        asked: list[bool] = []

        def any_running(mine: bool, asked: list[bool] = asked) -> bool:
            asked.append(mine)
            return len(asked) < steps  # the whole rollout stops after its last step

        torch.manual_seed(3)
        part = sample(
            model,
            tokenizer,
            [prompts[k] for k in positions],
            num_generations=g,
            generator=None,
            shard=RolloutShard(rows, total, any_running),
        )
        assert torch.equal(part.completion_ids, whole.completion_ids[rows]), rank
        assert torch.equal(part.completion_mask, whole.completion_mask[rows]), rank
        assert part.texts == [whole.texts[i] for i in rows.tolist()]
        assert torch.equal(torch.rand(4), after_whole), rank


def test_the_written_out_draw_is_torch_multinomial() -> None:
    """``sample_next`` draws, from the same generator state, the tokens ``torch.multinomial``
    draws (the numbers sampling gave before it was written out), and consumes as much of the
    generator."""
    from trainer_core.generation import sample_next

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1)) * 3
    logits[0, :250] = float("-inf")
    ours_gen, torch_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        ours = sample_next(logits, temperature=0.7, top_p=1.0, top_k=0, generator=ours_gen)
        probs = (logits / 0.7).softmax(-1)
        expected = torch.multinomial(probs, 1, generator=torch_gen).squeeze(-1)
        assert torch.equal(ours, expected)
    assert (ours[0] >= 250).item()  # never a token of probability 0
    assert torch.equal(torch.rand(3, generator=ours_gen), torch.rand(3, generator=torch_gen))
