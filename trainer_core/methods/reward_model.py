"""Reward modelling: learn a scalar score r(x, y) that ranks the chosen completion higher.

The reward model of InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155), as
TRL 1.16's ``RewardTrainer`` trains it: the base model with a fresh one-output linear head
(``AutoModelForSequenceClassification``, ``num_labels=1``) read at the last real token, and
the Bradley–Terry loss −log σ(r_c − r_r − margin) (+ optional centring; see
``preference_losses.bradley_terry_loss``). The saved model scores completions for the online
methods: ``reward_models.RewardModel.load(...).score(...)``, or ``reward_models.score(...)``
for a one-off.

One optimizer step, top to bottom: micro-batches of pairs → chosen and rejected rows through
the model in one forward pass → rewards (2B,) → loss normalised by the pairs of the whole
step → backward → clip → AdamW step → schedule → metrics → checkpoint.

Two things TRL learnt the hard way (issues #2758, #937): the model finds "the last real
token" as the rightmost token that is not ``config.pad_token_id``, so that id is set on the
config from the tokenizer before anything runs (Llama configs have none, and pooling then
reads a padding position); and under LoRA the new head is trained and saved whole (peft's
``modules_to_save``), since a low-rank update would leave a random head mostly random.
When the tokenizer pads with EOS (it has no pad token), a row's trailing EOS counts as
padding and the reward is read one token earlier, exactly as in TRL.

Dropout is switched off, LoRA's included (TRL's ``disable_dropout=True``). One difference
from TRL 1.16: pairs longer than ``max_seq_len`` keep their start (TRL drops them; see
``preference_data``). The device, mixed precision and gradient checkpointing: ``placement``
(the forward and the loss run under its autocast); several processes: ``distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from peft import TaskType
from torch import nn

from trainer_core import loop, shared_prompt
from trainer_core.models import load_tokenizer
from trainer_core.placement import enable_gradient_checkpointing
from trainer_core.preference_data import PairBatch, collate_pairs, load_preference, pair_lengths
from trainer_core.preference_losses import RewardStats, add_stats, bradley_terry_loss
from trainer_core.reward_models import RewardModel, load_reward_base
from trainer_core.seams import RunResult
from trainer_core.specs import RewardModelHyperparameters


@loop.method(RewardModelHyperparameters)
def train(job: loop.Job, hp: RewardModelHyperparameters) -> RunResult:
    # -- model and data (seeded already, by ``loop.method``: the new head is random) -------
    spec = job.spec
    tokenizer = load_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    base = load_reward_base(
        spec.model,
        pad_token_id=tokenizer.pad_token_id,
        allow_hub=spec.allow_hub,
        trust_remote_code=spec.trust_remote_code,
    )
    enable_gradient_checkpointing(base, spec.resources.gradient_checkpointing)
    examples, valid_examples = job.load_splits(load_preference, tokenizer, unit="pairs")
    pad_token_id = tokenizer.pad_token_id
    model = job.policy(base, task_type=TaskType.SEQ_CLS)

    run: loop.Run[RewardStats] = job.start(
        model,
        tokenizer,
        rows=len(examples),
        # Pair-weighted over a logging window's steps (min/max over all of them).
        summarise=lambda window: add_stats(window).metrics(),
        checkpoint_metrics=lambda stats: loss_and_accuracy([stats], "train_"),
        validate=job.validation(
            valid_examples,
            model,
            partial(collate_pairs, pad_token_id=pad_token_id),
            partial(step_loss, model, hp.center_rewards_coefficient, 1),  # sums: normaliser 1
            partial(loss_and_accuracy, prefix="valid_"),
        ),
    )

    def collate(indices: list[int]) -> PairBatch:
        return collate_pairs([examples[i] for i in indices], pad_token_id)

    # -- one optimizer step: rewards of both answers → the loss of the step's pairs ----------
    shared = uses_shared_prompt(model)
    for micro_batches in run.steps(
        # A token budget counts both rows of a pair unless it runs as one row.
        lengths=pair_lengths(examples, one_row=shared),
        rows_per_item=1 if shared else 2,
    ):
        # Normalise by the pairs of the whole step, so accumulating micro-batches gives
        # the same gradient as one big batch, and the ranks' shares add up to it.
        pairs_in_step = sum(len(indices) for indices in micro_batches)
        loss = partial(step_loss, model, hp.center_rewards_coefficient, pairs_in_step)
        run.train_step(micro_batches, collate, loss, add_stats)

    return run.result()


def step_loss(
    model: nn.Module,
    center_rewards_coefficient: float,
    pairs_in_step: int,
    batch: PairBatch,
    share: loop.Share,
) -> tuple[torch.Tensor, RewardStats]:
    """A micro-batch's (or a rank's share of it) Bradley–Terry loss of its pairs."""
    chosen_rewards, rejected_rewards = forward(model, batch)  # (B,) each
    return bradley_terry_loss(
        chosen_rewards,
        rejected_rewards,
        batch.margin,
        center_rewards_coefficient=center_rewards_coefficient,
        normaliser=pairs_in_step,
    )


def loss_and_accuracy(stats: Sequence[RewardStats], prefix: str) -> dict[str, float]:
    """``<prefix>loss`` and ``<prefix>accuracy``, the pair means over all ``stats``."""
    metrics = add_stats(stats).metrics()
    return {f"{prefix}loss": metrics["train_loss"], f"{prefix}accuracy": metrics["accuracy"]}


def uses_shared_prompt(model: nn.Module) -> bool:
    """Whether pairs run as one row each: the attention takes a 4D mask and the head is
    ``score`` (transformers' sequence classifiers)."""
    return shared_prompt.supported(model) and shared_prompt.classifier_parts(model) is not None


def forward(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_rewards, rejected_rewards)``, (B,) each, from one pass over the 2B rows
    (fp32 whatever the autocast: rewards are compared and reported)."""
    if batch.shared is not None and uses_shared_prompt(model):
        # One row per pair, the prompt once (shared_prompt.py).
        rewards = shared_prompt.sequence_scores(model, batch.shared).squeeze(-1).float()
    else:
        rewards = (
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            .logits.squeeze(-1)  # (2B, 1) -> (2B,)
            .float()
        )
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return chosen_rewards, rejected_rewards


def evaluate(
    model_path: str,
    adapter_dir: str | Path | None,
    data_file: str,
    max_seq_len: int,
    *,
    batch_size: int = 8,
    center_rewards_coefficient: float = 0.0,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """``{"valid_loss", "valid_accuracy"}`` of a saved reward model on the pairs of
    ``data_file``: the computation of a run's checkpoint metrics, so a downloaded adapter can
    be checked against what the job reported."""
    reward_model = RewardModel.load(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    tokenizer = reward_model.tokenizer
    data = load_preference(Path(data_file), tokenizer, max_seq_len)
    return loop.evaluate(
        reward_model.model,
        data.examples,
        batch_size,
        partial(collate_pairs, pad_token_id=tokenizer.pad_token_id),
        partial(step_loss, reward_model.model, center_rewards_coefficient, 1),
        partial(loss_and_accuracy, prefix="valid_"),
    )
