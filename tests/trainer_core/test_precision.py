"""The ``resources`` fields that shape a forward pass (``trainer_core.placement``): bf16 mixed
precision learns what fp32 learns and saves fp32 weights, gradient checkpointing changes
nothing but memory, fp16 is refused without a GPU, and fp16's loss scaler steps as the plain
step does.

bf16 runs go through ``python -m trainer_core run`` in a fresh process with
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: on a VM whose CPU advertises AMX but whose hypervisor
does not enable it (this machine), oneDNN's AMX bf16 kernels die of SIGILL, and the cap must
be set before oneDNN first looks at the CPU (docs/operations.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import trainer_core
from tests.trainer_core.cli_run import CPU_BF16_ENV, final_adapter, run_cli
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.optim import optimizer_step
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import ResourcesSpec, TrainSpec

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")

# bf16 keeps 8 bits of mantissa: a first-step loss within 2% of fp32 is bf16 rounding, not a bug.
BF16_RTOL = 2e-2


def hyperparameters(**extra: Any) -> dict[str, Any]:
    return {**COMMON, "n_epochs": 5, **extra}


def pair_rows() -> list[dict[str, Any]]:
    """A learnable preference: the chosen answer names the prompt's animal."""
    animals = ["cat", "dog", "fish", "bird", "owl", "goat"]
    return [
        {
            "prompt": f"The animal is the {animal}. Name it:",
            "chosen": f" yes, {animal}",
            "rejected": f" yes, {animals[(i + k) % len(animals)]}",
        }
        for i, animal in enumerate(animals)
        for k in (1, 2)
    ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in pair_rows()))
    return path


def base_spec(tiny_model: Path, train_file: Path, method: str, **hp: Any) -> dict[str, Any]:
    return {
        "method": method,
        "model": str(tiny_model),
        "train_file": str(train_file),
        "seed": 0,
        "max_seq_len": 128,
        "num_threads": 1,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": hyperparameters(**hp),
    }


@pytest.mark.slow
def test_bf16_supervised_learns_like_fp32_and_saves_fp32(
    tmp_path: Path, tiny_model: Path, facts_file: Path
) -> None:
    spec = base_spec(tiny_model, facts_file, "supervised")
    fp32 = run_cli(tmp_path, "fp32", spec, env=CPU_BF16_ENV)
    bf16 = run_cli(tmp_path, "bf16", {**spec, "resources": {"precision": "bf16"}}, env=CPU_BF16_ENV)
    assert len(bf16) == len(fp32) == 10
    first32, first16 = fp32[0]["train_loss"], bf16[0]["train_loss"]
    assert first16 == pytest.approx(first32, rel=BF16_RTOL)
    assert first16 != first32  # autocast really ran: bf16 rounding shows in the loss
    # It learns (on this seed fp32 goes 6.185 -> 5.129 in 10 steps, bf16 6.185 -> 5.059), and
    # as much as fp32 does: rounding shifts the path, not where it goes.
    assert bf16[-1]["train_loss"] < bf16[0]["train_loss"] - 0.5
    assert bf16[-1]["train_loss"] == pytest.approx(fp32[-1]["train_loss"], rel=0.05)
    # Master weights stay fp32: the saved adapter is fp32, and it is near the fp32 run's.
    weights16, weights32 = final_adapter(tmp_path, "bf16"), final_adapter(tmp_path, "fp32")
    assert weights16.keys() == weights32.keys()
    assert {w.dtype for w in weights16.values()} == {torch.float32}


@pytest.mark.slow
def test_bf16_dpo_starts_at_log_2_and_learns(
    tmp_path: Path, tiny_model: Path, pairs_file: Path
) -> None:
    spec = base_spec(tiny_model, pairs_file, "dpo", learning_rate=1e-2, beta=0.1)
    spec["hyperparameters"] |= {
        "n_epochs": 3,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        # The reference pass before training runs under the same autocast as the policy.
        "precompute_ref_log_probs": True,
    }
    fp32 = run_cli(tmp_path, "fp32", spec, env=CPU_BF16_ENV)
    bf16 = run_cli(tmp_path, "bf16", {**spec, "resources": {"precision": "bf16"}}, env=CPU_BF16_ENV)
    assert len(bf16) == len(fp32) == 9
    # Policy and reference go through the same autocast: still exactly log 2 at step 1.
    assert bf16[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert fp32[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # It learns the preference (12 pairs, 9 steps: 0.693 -> 0.654, accuracy 0.75 at the end,
    # as in fp32), and every step stays within bf16 rounding of the fp32 run.
    assert bf16[-1]["train_loss"] < bf16[0]["train_loss"] - 0.02
    assert bf16[-1]["rewards/accuracies"] > 0.5
    for a, b in zip(fp32, bf16, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=BF16_RTOL)
    assert {w.dtype for w in final_adapter(tmp_path, "bf16").values()} == {torch.float32}


def in_process(spec: TrainSpec, root: Path) -> tuple[list[float], FolderCheckpointStore]:
    sink, store = ListSink(), FolderCheckpointStore(root)
    result = trainer_core.run(spec, sink, store)
    assert result.status == "completed"
    return [values["train_loss"] for _, values in sink.points], store


def adapter_of(store: FolderCheckpointStore) -> dict[str, torch.Tensor]:
    folder = store.root / "final" / "adapter"
    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize(
    "adapter", [{"type": "lora", "r": 8, "dropout": 0.0}, {"type": "full"}], ids=["lora", "full"]
)
def test_gradient_checkpointing_changes_nothing_but_memory(
    make_spec: Any, tmp_path: Path, adapter: dict[str, Any]
) -> None:
    """Recomputing the activations in the backward gives the same losses and the same trained
    weights (dropout is 0 in the tiny model and the adapter, so recomputation is exact)."""
    runs = {}
    for checkpointing in (False, True):
        spec = make_spec(
            adapter=adapter,
            n_epochs=2,
            resources=ResourcesSpec(gradient_checkpointing=checkpointing),
        )
        runs[checkpointing] = in_process(spec, tmp_path / str(checkpointing))
    (plain_losses, plain), (ckpt_losses, ckpt) = runs[False], runs[True]
    assert len(plain_losses) == 4 and plain_losses[-1] < plain_losses[0]
    assert ckpt_losses == pytest.approx(plain_losses, abs=1e-6)
    plain_weights, ckpt_weights = adapter_of(plain), adapter_of(ckpt)
    assert plain_weights.keys() == ckpt_weights.keys()
    for name, weight in plain_weights.items():
        torch.testing.assert_close(ckpt_weights[name], weight, rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_is_really_on(make_spec: Any, tmp_path: Path) -> None:
    """The flag reaches the model: the losses match above because recomputation is exact,
    not because nothing was recomputed."""
    from transformers import PreTrainedModel

    seen: list[bool] = []
    original = PreTrainedModel.activation_checkpointing_enable

    def spy(self: PreTrainedModel, *args: Any, **kwargs: Any) -> None:
        seen.append(kwargs["activation_checkpointing_kwargs"]["use_reentrant"])
        original(self, *args, **kwargs)
        # transformers' layers recompute only when this is set and the model is training.
        assert self.is_activation_checkpointing

    PreTrainedModel.activation_checkpointing_enable = spy  # type: ignore[method-assign]
    try:
        spec = make_spec(resources=ResourcesSpec(gradient_checkpointing=True))
        in_process(spec, tmp_path)
    finally:
        PreTrainedModel.activation_checkpointing_enable = original  # type: ignore[method-assign]
    assert seen == [False]


def test_fp16_is_refused_without_a_gpu(make_spec: Any, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 runs there")
    spec = make_spec(resources=ResourcesSpec(precision="fp16"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        trainer_core.run(spec, ListSink(), FolderCheckpointStore(tmp_path))


def linear_step(
    grad_scale: float | None, poison: bool = False
) -> tuple[torch.nn.Linear, torch.Tensor, float]:
    """One clipped AdamW step of a seeded linear layer, with or without a loss scaler."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = None
    if grad_scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=grad_scale)
    loss = (layer(torch.ones(2, 4)) ** 2).sum() * (math.inf if poison else 1.0)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = list(layer.parameters())
    norm, _ = optimizer_step(params, optimizer, scheduler, max_grad_norm=0.5, scaler=scaler)
    return layer, norm, float(scheduler.get_last_lr()[0])


def test_loss_scaler_unscales_before_clipping_and_skips_overflows() -> None:
    plain, plain_norm, plain_lr = linear_step(None)
    scaled, scaled_norm, scaled_lr = linear_step(2.0**10)
    # The norm is the unscaled one (clipping saw the true gradient) and the step is the same.
    assert float(scaled_norm) == pytest.approx(float(plain_norm), rel=1e-6)
    assert float(plain_norm) > 0.5  # so clipping did something
    torch.testing.assert_close(scaled.weight, plain.weight)
    assert scaled_lr == plain_lr == 0.05  # the schedule advanced
    # An overflowed step changes no weight and does not advance the schedule.
    torch.manual_seed(0)
    untouched = torch.nn.Linear(4, 3)
    skipped, _, skipped_lr = linear_step(2.0**10, poison=True)
    torch.testing.assert_close(skipped.weight, untouched.weight)
    assert skipped_lr == 0.1
