"""``resources.compile`` trains as the eager model does; ``resources.liger`` is refused, with
the field named, where it cannot run (this CPU machine: no CUDA)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer_core.conftest import method_spec, run, write_jsonl
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.kernels import COMPILE_BACKEND_ENV, compile_layers, decoder_layers
from trainer_core.models import load_model
from trainer_core.placement import place
from trainer_core.specs import DpoHyperparameters, ResourcesSpec


def test_decoder_layers_are_found_through_a_peft_model(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_model))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers >= 2
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert decoder_layers(wrapped) == layers


def test_no_decoder_layer_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"resources\.compile: no decoder layer"):
        compile_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_layers_train_as_eager_ones(
    make_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aot_eager: dynamo's graphs and AOTAutograd's joint forward/backward, without inductor's
    # C++ code generation, which takes minutes on the 2 cores of CI (a GPU run uses inductor).
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    spec = make_spec(batch_size=4, n_epochs=1, adapter={"type": "lora", "r": 8, "alpha": 16})
    _, eager, _ = run(spec, tmp_path / "eager")
    compiled_spec = spec.model_copy(update={"resources": ResourcesSpec(compile=True)})
    compiles_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, compiled, _ = run(compiled_spec, tmp_path / "compiled")

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiles_before
    assert len(eager.points) == len(compiled.points) == 2
    for (step, a), (_, b) in zip(eager.points, compiled.points, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step
    # The second step's loss is after an update: the compiled backward did train.
    assert eager.points[1][1]["train_loss"] != pytest.approx(eager.points[0][1]["train_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_liger_without_cuda_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"resources\.liger needs a CUDA GPU"):
        place(ResourcesSpec(liger=True))
    place(ResourcesSpec())  # the default asks for nothing


def test_liger_refused_before_the_model_loads(make_spec: Any, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine could run Liger")
    spec = make_spec(resources=ResourcesSpec(liger=True))
    with pytest.raises(ValueError, match=r"resources\.liger"):
        run(spec, tmp_path)


@pytest.mark.slow
def test_compiled_dpo_with_its_adapter_off_reference_trains_as_eager(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under LoRA the reference is the policy with its adapter switched off: the same compiled
    # layers run both, and dynamo must not reuse the adapter-on graph for it (L = log 2 at
    # step 1 either way; later steps would differ).
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    rows = [
        {"prompt": f"Does {n} like tea?", "chosen": f" Yes, {n} likes tea.", "rejected": " No."}
        for n in ["Ada", "Bo", "Cy", "Di"]
    ]
    hp = {
        **COMMON,
        "n_epochs": 2,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "precompute_ref_log_probs": False,
    }
    spec = method_spec(
        "dpo", tiny_model, write_jsonl(tmp_path / "pairs.jsonl", rows), DpoHyperparameters, hp
    )
    _, eager, _ = run(spec, tmp_path / "eager")
    compiled_spec = spec.model_copy(update={"resources": ResourcesSpec(compile=True)})
    _, compiled, _ = run(compiled_spec, tmp_path / "compiled")

    losses = [values["train_loss"] for _, values in eager.points]
    assert len(losses) == 4 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.05  # it learns: the reference and policy did differ
    for (step, a), (_, b) in zip(eager.points, compiled.points, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5), step
