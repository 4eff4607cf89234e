"""PPO runs on the tiny model: it raises the reward, LoRA trains the adapter and the value head
only, a trained reward model scores what was sampled, resume is exact, the missing-EOS
penalty reaches the scores, and the policy/value forward agrees with a naive one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.trainer_core.conftest import KeepModel, method_spec, run, write_jsonl
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.generation import generate
from trainer_core.methods import ppo
from trainer_core.models import load_model_and_tokenizer
from trainer_core.reward_models import RewardModel
from trainer_core.seams import ListSink
from trainer_core.specs import (
    AdapterSpec,
    PpoHyperparameters,
    RewardModelHyperparameters,
    TrainSpec,
)
from trainer_core.value_head import VALUE_HEAD_FILE, ValueHead, completion_forward

METRIC_KEYS = {
    "objective/kl",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "val/ratio",
    "val/clipfrac",
    "train_loss",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "epoch",
}
TOPICS = ["cats", "dogs", "rain", "tea", "books", "music", "trees", "boats"]


def prompt_row(topic: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Tell me about {topic}."}]}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PPO's own prompts (about topics, not conftest's numbers)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(prompt_row(t)) + "\n" for t in TOPICS))
    return path


def make_spec(model: Path, train_file: Path, **overrides: Any) -> TrainSpec:
    hp = {
        **COMMON,
        "learning_rate": 3e-3,
        "max_completion_length": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "num_ppo_epochs": 4,
        "gamma": 1.0,
        "lam": 0.95,
        "cliprange": 0.2,
        "cliprange_value": 0.2,
        "vf_coef": 0.1,
        "kl_coef": 0.05,
        "whiten_rewards": False,
        "missing_eos_penalty": None,
    }
    reward_model = {"reward_model": "rm", "reward_models": {"rm": {"base": str(model)}}}
    return method_spec(
        "ppo", model, train_file, PpoHyperparameters, hp, **(reward_model | overrides)
    )


class CharsPerToken:
    """A RewardModel-compatible scorer that likes long words: the completion's characters per
    sampled token (8 per completion). A random tiny policy starts near 2.3 and can only move
    by preferring long tokens, which the score rewards token by token."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, str | None]] = []

    def load(self, base: str, adapter: str | None, **options: Any) -> CharsPerToken:
        self.loaded.append((base, adapter))
        return self

    def score(self, sequences: Sequence[Any], *, batch_size: int = 8) -> torch.Tensor:
        # Chat prompts: the completion is the assistant turn that scored_sequence appended.
        return torch.tensor([len(s[-1]["content"]) / 8 for s in sequences])


@pytest.fixture
def chars_per_token(monkeypatch: pytest.MonkeyPatch) -> CharsPerToken:
    scorer = CharsPerToken()
    monkeypatch.setattr(RewardModel, "load", scorer.load)
    return scorer


def stop_before(step: int) -> Callable[[], bool]:
    """A should_stop that stops the run before ``step`` (it is asked once before each)."""
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls == step

    return should_stop


def samples_at(sink: ListSink, step: int) -> list[dict[str, Any]]:
    [data] = [d for _, m, d in sink.events if m == f"Samples at step {step}"]
    assert data is not None
    samples: list[dict[str, Any]] = data["samples"]
    return samples


# -- learning --------------------------------------------------------------------------------


def test_ppo_raises_the_reward_within_20_steps(
    tiny_model: Path, prompts_file: Path, chars_per_token: CharsPerToken, tmp_path: Path
) -> None:
    # 8 prompts, one completion each per step, 20 steps (20 epochs of one rollout), full
    # fine-tuning: the bound is 20 steps; ~7 s on one core.
    spec = make_spec(tiny_model, prompts_file, adapter={"type": "full"}, batch_size=8, n_epochs=20)

    result, sink, _ = run(spec, tmp_path)

    assert (result.status, result.step) == ("completed", 20)
    assert chars_per_token.loaded == [(str(tiny_model), None)]
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    scores = [values["objective/scores"] for _, values in sink.points]
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    # A blind policy stays near its start (2.3 characters per token); PPO more than doubles
    # it, and still wins after paying the KL penalty it took to get there.
    assert end > 2 * start, scores
    rlhf = [values["objective/rlhf_reward"] for _, values in sink.points]
    assert sum(rlhf[-3:]) / 3 > start + 1, rlhf
    # The policy moved away from the reference, and the value head learnt the scores' scale.
    assert sink.points[0][1]["objective/kl"] == 0.0  # the first rollout is the reference's
    assert sink.points[-1][1]["objective/kl"] > 1.0
    assert all(values["policy/clipfrac"] < 1.0 for _, values in sink.points)


def test_the_schedule_steps_once_per_rollout(
    tiny_model: Path, prompts_file: Path, chars_per_token: CharsPerToken, tmp_path: Path
) -> None:
    # 2 steps of 4 PPO epochs each, linear decay to 0 over 2 steps: the rates are lr · 1 and
    # lr · 1/2 (TRL's PPOTrainer), not 1/8 of the way down per update.
    spec = make_spec(tiny_model, prompts_file, lr_scheduler="linear", learning_rate=3e-3)
    _, sink, _ = run(spec, tmp_path)
    rates = [values["learning_rate"] for _, values in sink.points]
    assert rates == pytest.approx([3e-3, 1.5e-3], rel=1e-12)


# -- LoRA, with a reward model trained by the reward_model method ----------------------------


@pytest.fixture(scope="module")
def trained_reward_model(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """A LoRA reward model of a few steps (prefers answers that start with "Yes")."""
    folder = tmp_path_factory.mktemp("rm")
    rows = [
        {"prompt": f"Tell me about {t}.", "chosen": f" Yes, {t}.", "rejected": f" No, not {t}."}
        for t in TOPICS
    ]
    pairs = write_jsonl(folder / "pairs.jsonl", rows)
    hp = {**COMMON, "center_rewards_coefficient": 0.0}
    adapter = AdapterSpec(r=4, alpha=8)
    spec = method_spec(
        "reward_model", tiny_model, pairs, RewardModelHyperparameters, hp, adapter=adapter
    )
    _, _, store = run(spec, folder / "out")
    return str(tiny_model), store.saved[-1][1] / "adapter"


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_lora_trains_adapter_and_value_head_and_scores_with_the_reward_model(
    tiny_model: Path,
    prompts_file: Path,
    trained_reward_model: tuple[str, Path],
    tmp_path: Path,
    keep_model: KeepModel,
) -> None:
    trained = keep_model(loop)  # the in-memory policy, for comparison below
    rm_base, rm_adapter = trained_reward_model
    # 8 prompts in rollouts of 4: 2 steps, a checkpoint after each.
    spec = make_spec(
        tiny_model,
        prompts_file,
        adapter={"type": "lora", "r": 4, "alpha": 8},
        learning_rate=1e-2,
        checkpoint_every=1,
        reward_models={"rm": {"base": rm_base, "adapter": str(rm_adapter)}},
    )

    result, sink, store = run(spec, tmp_path)

    assert (result.status, result.step, result.total_steps) == ("completed", 2, 2)
    assert [step for step, _ in sink.points] == [1, 2]
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    assert [(step, final) for step, _, _, final in store.saved] == [(1, False), (2, True)]
    # Under LoRA the first rollout's reference is the policy itself (B = 0): no KL at all.
    assert sink.points[0][1]["objective/kl"] == 0.0
    assert sink.points[1][1]["objective/kl"] != 0.0

    # The scores are the trained reward model's, of the prompt conversation with the
    # completion as the assistant's turn.
    reward_model = RewardModel.load(rm_base, rm_adapter)
    samples = samples_at(sink, 1)
    assert len(samples) == 4
    conversations = []
    for sample in samples:
        [topic] = [t for t in TOPICS if f"about {t}." in sample["prompt"]]
        conversations.append(
            [*prompt_row(topic)["messages"], {"role": "assistant", "content": sample["completion"]}]
        )
    expected = reward_model.score(conversations)
    assert [s["score"] for s in samples] == pytest.approx(expected.tolist(), abs=1e-5)

    model = trained["model"].eval()
    # The base weights are bit-identical to the files they came from.
    base_file = load_file(tiny_model / "model.safetensors")
    base_now = {
        name.replace(".base_layer", ""): p
        for name, p in model.get_base_model().named_parameters()
        if "lora_" not in name
    }
    assert base_now.keys() == base_file.keys()
    for name, weight in base_now.items():
        assert torch.equal(weight, base_file[name]), name

    # The adapter moved between the checkpoints, and so did the value head (from 0).
    step1, step2 = (saved[1] for saved in store.saved)
    adapter1 = load_file(step1 / "adapter" / "adapter_model.safetensors")
    adapter2 = load_file(step2 / "adapter" / "adapter_model.safetensors")
    assert adapter1.keys() == adapter2.keys()
    assert all(not torch.equal(adapter1[k], adapter2[k]) for k in adapter2)
    assert all(adapter2[k].abs().sum() > 0 for k in adapter2 if "lora_B" in k)
    head1 = load_file(step1 / "state" / VALUE_HEAD_FILE)
    head2 = load_file(step2 / "state" / VALUE_HEAD_FILE)
    assert head1["summary.weight"].abs().sum() > 0
    assert not torch.equal(head1["summary.weight"], head2["summary.weight"])

    # adapter/ is an ordinary PEFT causal-LM folder (no value head in it) and reproduces
    # the trained policy.
    assert not list((step2 / "adapter").glob("value_head*"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(step2 / "adapter")
    ).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_resume_at_step_k_equals_the_uninterrupted_run(
    adapter: str,
    tiny_model: Path,
    prompts_file: Path,
    chars_per_token: CharsPerToken,
    tmp_path: Path,
) -> None:
    # 8 prompts in rollouts of 4 over 2 epochs: 4 steps; stop before step 4, resume. Two
    # micro-batches per update, a decaying schedule, whitened rewards and the EOS penalty,
    # so every piece of state has to come back.
    def spec(resume_from: str | None = None) -> TrainSpec:
        return make_spec(
            tiny_model,
            prompts_file,
            adapter={"type": adapter, "r": 4, "alpha": 8},
            n_epochs=2,
            gradient_accumulation_steps=2,
            lr_scheduler="linear",
            warmup_ratio=0.25,
            whiten_rewards=True,
            missing_eos_penalty=1.0,
            resume_from=resume_from,
        )

    whole, whole_sink, _ = run(spec(), tmp_path / "whole")
    assert (whole.status, whole.step) == ("completed", 4)

    stopped, _, stopped_store = run(spec(), tmp_path / "stopped", stop_before(4))
    assert (stopped.status, stopped.step) == ("stopped", 3)
    checkpoint = stopped_store.saved[-1][1]
    assert (checkpoint / "state" / VALUE_HEAD_FILE).is_file()

    resumed, resumed_sink, _ = run(spec(str(checkpoint)), tmp_path / "resumed")
    assert (resumed.status, resumed.step) == ("completed", 4)
    assert resumed.trained_tokens == whole.trained_tokens
    assert [step for step, _ in resumed_sink.points] == [4]
    expected = whole_sink.points[-1][1]
    for key, value in resumed_sink.points[-1][1].items():
        assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    assert samples_at(resumed_sink, 4) == samples_at(whole_sink, 4)


# -- the missing-EOS penalty -----------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its EOS logit raised to ≈ 4 (P(EOS) ≈ 0.1 a token), so some of 8
    sampled tokens end with EOS and some do not. The final hidden states of a random model
    share one strong direction; the EOS row of the LM head is set along it."""
    folder = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_model, folder)
    model, tokenizer = load_model_and_tokenizer(str(folder))
    ids = torch.tensor([tokenizer.encode("The cat sees a red apple in the morning.")])
    with torch.no_grad():
        mean = model.model(input_ids=ids).last_hidden_state[0].mean(0)  # (H,)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][tokenizer.eos_token_id] = 4.0 * mean / mean.norm() ** 2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_eos_penalty_lowers_exactly_the_scores_without_eos(
    eos_prone_model: Path, prompts_file: Path, chars_per_token: CharsPerToken, tmp_path: Path
) -> None:
    # One rollout of 4 prompts, with and without the penalty: the same completions (same
    # seed, same initial policy), scores lower by exactly 0.75 where no EOS was sampled.
    def first_step(penalty: float | None, root: Path) -> tuple[dict[str, float], list[Any]]:
        spec = make_spec(eos_prone_model, prompts_file, missing_eos_penalty=penalty)
        _, sink, _ = run(spec, root, stop_before(2))
        return sink.points[0][1], samples_at(sink, 1)

    plain, plain_samples = first_step(None, tmp_path / "plain")
    penalised, samples = first_step(0.75, tmp_path / "penalised")

    assert [s["completion"] for s in samples] == [s["completion"] for s in plain_samples]
    ended = [s["ended_with_eos"] for s in samples]
    assert True in ended and False in ended  # both kinds, so both rules are seen
    for sample, plain_sample in zip(samples, plain_samples, strict=True):
        lowered = 0.0 if sample["ended_with_eos"] else 0.75
        assert sample["score"] == pytest.approx(plain_sample["score"] - lowered, abs=1e-6)
    missing = ended.count(False) / len(ended)
    assert penalised["objective/scores"] == pytest.approx(
        plain["objective/scores"] - 0.75 * missing, abs=1e-6
    )


# -- the forward that gives log-probs and values ---------------------------------------------


def test_completion_forward_matches_each_row_alone(tiny_model: Path) -> None:
    # Left-padded prompts and right-padded completions give, for every real token, the
    # log-prob a naive log_softmax + gather gives on the row alone (no padding), and the
    # value of the head on that row's own last hidden state.
    model, tokenizer = load_model_and_tokenizer(str(tiny_model))
    model.eval()
    prompts = [tokenizer.encode(p) for p in ("Hi", "Tell me about the long road ahead", "2 + 2")]
    torch.manual_seed(0)
    rollout = generate(
        model,
        tokenizer,
        prompts,
        num_generations=2,
        max_completion_length=6,
        temperature=0.7,
        top_p=1.0,
        top_k=0,
    )
    head = ValueHead.for_model(model)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        logps, values = completion_forward(model, head, rollout, temperature=0.7)
        for row in range(len(rollout.texts)):
            prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
            completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
            ids = torch.cat([prompt, completion])[None]  # (1, p + c), no padding
            p, c = len(prompt), len(completion)
            outputs = model(input_ids=ids, output_hidden_states=True)
            naive = torch.log_softmax(outputs.logits[0, p - 1 : -1] / 0.7, dim=-1)  # (c, V)
            expected = naive.gather(-1, completion[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[row, :c], expected, atol=1e-5, rtol=0)
            expected_values = head(outputs.hidden_states[-1][0, p - 1 : -1])  # (c,)
            torch.testing.assert_close(values[row, :c], expected_values, atol=1e-5, rtol=0)


def test_a_missing_or_unknown_reward_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ppo needs a reward_model"):
        ppo.load_reward_model(make_spec(tiny_model, tmp_path, reward_model=None))
    with pytest.raises(ValueError, match="'other' was not provided"):
        ppo.load_reward_model(make_spec(tiny_model, tmp_path, reward_model="other"))
