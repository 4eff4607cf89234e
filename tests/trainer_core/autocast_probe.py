"""``python -m tests.trainer_core.autocast_probe SPEC OUT``: run a TrainSpec file in this
process, as ``python -m trainer_core run`` does, and write to OUT (JSON) its metric points and
the dtypes of the outputs of every linear layer, apart by whether grad was on (the training
forwards) or off (sampling, old and reference log-probs, scoring).

It observes and replaces nothing: one global forward hook reads the linear layers' outputs. A bf16 run needs ``ONEDNN_MAX_CPU_ISA`` set before the process starts
(``cli_run.CPU_BF16_ENV``), hence a process of its own.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trainer_core
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import TrainSpec


def main(spec_path: str, out_path: str) -> None:
    seen: dict[str, set[str]] = {"grad": set(), "no_grad": set()}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        # Every linear layer's output (projections, MLPs, heads): the training forwards reach
        # the LM head through trainer_core.vocab_chunks, whose outputs carry no ``logits``.
        # Scalar heads (out_features 1: PPO's value head, kept fp32 on purpose, and a reward
        # model's score) are left out: the question is where the transformer ran.
        if isinstance(module, nn.Linear) and module.out_features > 1:
            seen["grad" if torch.is_grad_enabled() else "no_grad"].add(str(output.dtype))

    handle = nn.modules.module.register_module_forward_hook(record)
    spec = TrainSpec.model_validate_json(Path(spec_path).read_text())
    sink = ListSink()
    with tempfile.TemporaryDirectory() as folder:
        trainer_core.run(spec, sink, FolderCheckpointStore(Path(folder)))
    handle.remove()
    result = {
        "points": [{"step": step, **values} for step, values in sink.points],
        "linear": {key: sorted(values) for key, values in seen.items()},
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
