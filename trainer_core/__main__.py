"""``python -m trainer_core``: run a spec file, or build a tiny model, without the service.

python -m trainer_core run spec.json [--output DIR] [--metrics FILE]
python -m torch.distributed.run --standalone --nproc-per-node 2 -m trainer_core run spec.json

Under a launcher (``RANK`` set) only rank 0 reports and writes; the others compute.
python -m trainer_core create-tiny DEST [--size tiny|1m|30m] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import TrainSpec
from trainer_core.tiny_models import SIZES, create_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_core",
        description="Run a TrainSpec file, or build a tiny model, without the service.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train as a TrainSpec JSON file says")
    run.add_argument("spec", type=Path, help="TrainSpec JSON file")
    run.add_argument(
        "--output",
        type=Path,
        default=Path("checkpoints"),
        help="folder for checkpoints: step-N/ and final/ (default: ./checkpoints)",
    )
    run.add_argument("--metrics", type=Path, help="also write every metric point here (JSON)")
    tiny = commands.add_parser("create-tiny", help="build a random tiny Llama-style model")
    tiny.add_argument("dest", type=Path, help="folder to write the model into")
    tiny.add_argument("--size", choices=sorted(SIZES), default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "create-tiny":
        print(create_tiny_model(args.dest, size=args.size, seed=args.seed))
        return 0

    from trainer_core import distributed
    from trainer_core import run as run_training
    from trainer_core.seams import NullSink

    spec = TrainSpec.model_validate_json(args.spec.read_text())
    main_rank = int(os.environ.get("RANK", "0")) == 0
    sink = ListSink(echo=True)
    result = run_training(
        spec, sink if main_rank else NullSink(), FolderCheckpointStore(args.output)
    )
    distributed.teardown()
    if not main_rank:
        return 0
    if args.metrics is not None:
        args.metrics.write_text(json.dumps([{"step": s, **v} for s, v in sink.points]))
    print(
        json.dumps(
            {
                "status": result.status,
                "step": result.step,
                "total_steps": result.total_steps,
                "trained_tokens": result.trained_tokens,
                "final_metrics": result.final_metrics,
                "output": str(args.output),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
