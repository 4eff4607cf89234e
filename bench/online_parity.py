"""Parity of our GRPO and RLOO arithmetic with TRL 1.16's, on identical rollouts.

    .venv/bin/python -m bench.online_parity [--size tiny] [--markdown FILE]

Sampling is random, so two trainers never see the same completions by themselves; here both
are handed the same ones. A rollout is sampled once (our ``generate``, some rows cut at an
EOS so that lengths differ), its rewards are fixed numbers (one group with all rewards equal),
and then:

- TRL: a ``GRPOTrainer`` / ``RLOOTrainer`` whose ``_generate`` returns that rollout and whose
  one reward function returns those rewards runs its own ``_generate_and_score_completions``
  (rewards → advantages, old / reference log-probs, RLOO's KL-in-reward) and
  ``_compute_loss`` (log-probs on logits / temperature, ratio, clipping, KL, aggregation).
- Ours: ``rl_losses`` on ``generation.rollout_logps`` of the same model, as the methods call
  them.

To make the ratio and clipping matter, π_old is perturbed (the same tensor is given to both),
and the reference is the model with perturbed weights (the same module for both), so the
KL terms are not 0. Compared: the advantages, the loss, every parameter's gradient (max
|Δ| over all of them, relative to the largest gradient entry), and the kl / clip metrics. The
prompts all have one length: TRL's training forward does not pass position ids, so with left
padding its log-probs would differ from those the sampler used (ours follow the mask).

Exit status 1 when a compared number misses ``--tolerance`` (1e-4, absolute on advantages and
loss, relative on gradients).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.common import tiny_model
from bench.report import machine, publish, versions
from trainer_core.generation import Rollout, generate, rollout_logps
from trainer_core.models import load_model_and_tokenizer
from trainer_core.reference import ReferenceModel
from trainer_core.rl_losses import (
    group_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
    sequence_k1,
)

G = 4  # num_generations
PROMPTS = 3
C = 12  # max_completion_length
TEMPERATURE = 0.7
EPSILON, EPSILON_HIGH = 0.2, 0.28
SEED = 0


@dataclass
class Row:
    method: str
    case: str
    advantages: float  # max |Δ|
    loss: float  # |Δ|
    ours_loss: float
    grad: float  # max |Δ| / max |g|
    metrics: float  # max |Δ| over kl and clip ratio
    clip_ratio: float

    def worst(self) -> float:
        return max(self.advantages, self.loss, self.grad, self.metrics)


# -- the shared rollout ------------------------------------------------------------------------


def shared_rollout(model: Any, tokenizer: Any) -> tuple[Rollout, list[float]]:
    """Our sample of PROMPTS × G completions, rows 1, 5, 6 cut short with an EOS; rewards with
    one group (the second) all equal."""
    prompts = same_length_prompts(tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    rollout = generate(
        model,
        tokenizer,
        prompts,
        num_generations=G,
        max_completion_length=C,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        generator=generator,
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask, is_eos = rollout.completion_ids.clone(), rollout.completion_mask.clone(), []
    for row, cut in {1: 3, 5: 7, 6: 1}.items():
        ids[row, cut] = eos
        ids[row, cut + 1 :] = pad
        mask[row, cut + 1 :] = 0
    is_eos = [bool(ids[r, int(mask[r].sum()) - 1] == eos) for r in range(ids.size(0))]
    texts = [tokenizer.decode(ids[r, mask[r].bool()], skip_special_tokens=True) for r in range(12)]
    shared = Rollout(
        rollout.prompt_ids, rollout.prompt_mask, ids, mask, torch.tensor(is_eos), texts
    )
    rewards = torch.rand(PROMPTS * G, generator=generator).tolist()
    rewards[G : 2 * G] = [0.5] * G
    return shared, rewards


def same_length_prompts(tokenizer: Any) -> list[list[int]]:
    """PROMPTS chat prompts that tokenize to one length (see the module docstring)."""
    by_length: dict[int, list[list[int]]] = {}
    for i in range(100):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Say something about number {i}."}],
            add_generation_prompt=True,
            return_dict=False,
        )
        by_length.setdefault(len(ids), []).append(list(ids))
        if len(by_length[len(ids)]) == PROMPTS:
            return by_length[len(ids)]
    raise RuntimeError("no prompts of one length")


def perturbed(values: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return values + scale * torch.randn(values.shape, generator=generator)


def perturbed_model_(model: Any, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# -- TRL, fed the shared rollout -----------------------------------------------------------------


def trl_trainer(
    method: str, model_path: Path, rollout: Rollout, rewards: list[float], **config: Any
) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (
        (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    prompt_rows = [r for r in range(0, PROMPTS * G)]
    prompt_ids = [
        rollout.prompt_ids[r][rollout.prompt_mask[r].bool()].tolist() for r in prompt_rows
    ]
    completion_ids = [
        rollout.completion_ids[r][rollout.completion_mask[r].bool()].tolist() for r in prompt_rows
    ]

    class Injected(trainer_cls):  # type: ignore[misc, valid-type]
        def _generate(self, prompts: list[Any]) -> Any:
            if method == "rloo":  # RLOOTrainer's _generate returns less
                return prompt_ids, completion_ids, rollout.texts
            return prompt_ids, completion_ids, None, rollout.texts, None, {}, None, None

    def fixed_rewards(prompts: Any, completions: Any, **kwargs: Any) -> list[float]:
        return list(rewards)

    fixed_rewards.__name__ = "fixed"
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"Say something about number {i}."}]}
            for i in range(PROMPTS)
        ]
    )
    args = config_cls(
        output_dir=tempfile.mkdtemp(prefix="alignd-online-parity-"),
        per_device_train_batch_size=PROMPTS * G,
        num_generations=G,
        max_completion_length=C,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH if method == "grpo" else EPSILON,
        num_iterations=2,  # so that the trainer takes π_old from its inputs
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        **config,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Injected(
            model=str(model_path),
            reward_funcs=[fixed_rewards],
            args=args,
            train_dataset=data,
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def grads_of(model: Any, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return flat


def last_metric(trainer: Any, name: str) -> float:
    values = trainer._metrics["train"].get(name) or [0.0]
    return float(values[-1])


# -- one comparison per configuration --------------------------------------------------------


def reference_logps(ref_model: Any, rollout: Rollout) -> torch.Tensor:
    """(N, C) π_ref's log-probs of the completions, scored as the methods score them."""
    with ReferenceModel(ref_model, disable_adapter=False).scoring() as model:
        per_token_logps, _ = rollout_logps(model, rollout, temperature=TEMPERATURE)
    return per_token_logps


def compare_grpo(
    model_path: Path, loss_type: str, scale_rewards: str, beta: float, mask_truncated: bool
) -> Row:
    _, tokenizer = load_model_and_tokenizer(str(model_path))
    sampler, _ = load_model_and_tokenizer(str(model_path))
    rollout, rewards = shared_rollout(sampler, tokenizer)
    trainer = trl_trainer(
        "grpo",
        model_path,
        rollout,
        rewards,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=beta,
        mask_truncated_completions=mask_truncated,
    )
    model = trainer.model
    if beta:
        perturbed_model_(trainer.ref_model)
    inputs = trainer._generate_and_score_completions([{"prompt": None}] * (PROMPTS * G))
    old = perturbed(rollout_logps(model, rollout, temperature=TEMPERATURE)[0].detach(), 0.2, 1)
    inputs["old_per_token_logps"] = old
    trl_loss = trainer._compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    # Ours, as methods/grpo.py computes it.
    advantages, _ = group_advantages(torch.tensor(rewards), G, scale_rewards)  # type: ignore[arg-type]
    loss_mask = rollout.completion_mask
    if mask_truncated:
        loss_mask = loss_mask * rollout.is_eos.unsqueeze(1)
    ref = reference_logps(trainer.ref_model, rollout) if beta else None
    per_token_logps, _ = rollout_logps(model, rollout, temperature=TEMPERATURE)
    ours_loss, stats = grpo_loss(
        per_token_logps,
        old,
        advantages,
        loss_mask,
        epsilon_low=EPSILON,
        epsilon_high=EPSILON_HIGH,
        loss_type=loss_type,  # type: ignore[arg-type]
        max_completion_length=C,
        num_items_in_batch=float(loss_mask.sum()),
        beta=beta,
        ref_per_token_logps=ref,
    )
    our_grads = grads_of(model, ours_loss)
    means = stats.means()
    metric_gaps = [abs(means["clip_ratio"] - last_metric(trainer, "clip_ratio/region_mean"))]
    if beta:
        metric_gaps.append(abs(means["kl"] - last_metric(trainer, "kl")))
    case = f"{loss_type}, scale_rewards={scale_rewards}, β={beta}" + (
        ", mask_truncated" if mask_truncated else ""
    )
    return Row(
        "GRPO",
        case,
        float((advantages - inputs["advantages"]).abs().max()),
        abs(float(ours_loss) - float(trl_loss)),
        float(ours_loss),
        float((our_grads - trl_grads).abs().max() / trl_grads.abs().max()),
        max(metric_gaps),
        means["clip_ratio"],
    )


def compare_rloo(model_path: Path, beta: float, normalize: bool) -> Row:
    _, tokenizer = load_model_and_tokenizer(str(model_path))
    sampler, _ = load_model_and_tokenizer(str(model_path))
    rollout, rewards = shared_rollout(sampler, tokenizer)
    trainer = trl_trainer(
        "rloo", model_path, rollout, rewards, beta=beta, normalize_advantages=normalize
    )
    model = trainer.model
    if beta:
        perturbed_model_(trainer.ref_model)
    inputs = trainer._generate_and_score_completions([{"prompt": None}] * (PROMPTS * G))
    trl_advantages = inputs["advantages"]
    trl_kl = last_metric(trainer, "kl")
    old_logps = perturbed(inputs["old_logps"], 0.3, 2)
    inputs["old_logps"] = old_logps
    trl_loss = trainer._compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    # Ours, as methods/rloo.py computes it.
    mask = rollout.completion_mask
    with torch.no_grad():
        old_per_token, _ = rollout_logps(model, rollout, temperature=TEMPERATURE)
    kl = None
    metric_gaps = []
    if beta:
        ref = reference_logps(trainer.ref_model, rollout)
        kl = sequence_k1(old_per_token, ref, mask)
        metric_gaps.append(abs(float(kl.sum() / mask.sum()) - trl_kl))
    advantages = rloo_advantages(torch.tensor(rewards), G, kl=kl, beta=beta, normalize=normalize)
    per_token_logps, _ = rollout_logps(model, rollout, temperature=TEMPERATURE)
    ours_loss, stats = rloo_loss(
        (per_token_logps * mask).sum(-1),
        old_logps,
        advantages,
        epsilon_low=EPSILON,
        epsilon_high=EPSILON,
    )
    our_grads = grads_of(model, ours_loss)
    clip = stats.means()["clip_ratio"]
    metric_gaps.append(abs(clip - last_metric(trainer, "clip_ratio/region_mean")))
    return Row(
        "RLOO",
        f"β={beta}, normalize_advantages={normalize}",
        float((advantages - trl_advantages).abs().max()),
        abs(float(ours_loss) - float(trl_loss)),
        float(ours_loss),
        float((our_grads - trl_grads).abs().max() / trl_grads.abs().max()),
        max(metric_gaps),
        clip,
    )


def table(rows: list[Row], tolerance: float) -> str:
    lines = [
        "| method | case | max Δ advantage | Δ loss | loss | max Δ grad (rel.) | max Δ kl, clip | "
        "clip ratio | within 1e-4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.case} | {r.advantages:.1e} | {r.loss:.1e} | {r.ours_loss:.5f} | "
            f"{r.grad:.1e} | {r.metrics:.1e} | {r.clip_ratio:.3f} | "
            f"{'yes' if r.worst() <= tolerance else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "1m", "30m"])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    model_path = tiny_model(args.size)

    rows = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        rows.append(compare_grpo(model_path, loss_type, "group", 0.0, False))
    rows.append(compare_grpo(model_path, "dapo", "batch", 0.04, False))
    rows.append(compare_grpo(model_path, "grpo", "none", 0.04, True))
    rows.append(compare_rloo(model_path, 0.05, False))
    rows.append(compare_rloo(model_path, 0.05, True))
    rows.append(compare_rloo(model_path, 0.0, False))

    header = (
        f"{date.today().isoformat()}; {machine()}; {versions()}; model {args.size}; "
        f"{PROMPTS} prompts × {G} completions of ≤ {C} tokens, temperature {TEMPERATURE}, "
        f"ε = {EPSILON} (GRPO ε_high = {EPSILON_HIGH}), π_old and π_ref perturbed"
    )
    text = table(rows, args.tolerance)
    publish(header, text, args.markdown)
    return 0 if all(r.worst() <= args.tolerance for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
