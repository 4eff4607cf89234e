"""One rank of a job that runs in several processes (started by ``worker.launch``).

    python -m worker.rank SPEC_JSON JOB_ID OWNER ATTEMPT      (with RANK, WORLD_SIZE, ... set)

Rank 0 reports into the database and stores checkpoints, as an in-process job does; the
other ranks compute and report nothing. SIGTERM asks for a stop: the ranks agree on it at
the next step (``distributed.any_rank``), rank 0 saves a checkpoint, and all exit 0. An
exception is written to ``rank-N.error`` in the job's folder (the working directory) for the
launcher to report, and the rank exits 1; rank 0 exits ``ABANDONED_EXIT`` when its lease on
the job ended (worker/lease.py), so that the job is left for the sweep rather than failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

from alignd.processes import die_with_parent


def main(argv: list[str]) -> int:
    spec_path, job_id, owner, attempt = argv
    rank = int(os.environ["RANK"])
    # Die with the worker process that launched us, whatever happens to it.
    die_with_parent(signal.SIGKILL)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        import trainer_core
        from trainer_core.seams import CheckpointStore, FolderCheckpointStore, MetricSink, NullSink
        from trainer_core.specs import TrainSpec

        spec = TrainSpec.model_validate_json(Path(spec_path).read_text())
        reporting: AbstractContextManager[MetricSink]
        store: CheckpointStore
        if rank == 0:
            from api.models import Job
            from api.services import Services
            from api.settings import load_settings
            from worker import integrations
            from worker.lease import Lease
            from worker.sinks import ArtifactCheckpointStore, DatabaseSink

            services = Services.build(load_settings())
            lease = Lease(services.sessions, job_id, int(attempt), services.settings.db_retry_s)
            with services.sessions() as session:
                job = session.get_one(Job, job_id)
            reporting = integrations.reporting(
                DatabaseSink(lease, owner, method=str(spec.method)),
                job_id=job_id,
                integrations=job.extensions.get("integrations", []),
                config=job.spec or {},
            )
            store = ArtifactCheckpointStore(lease, services.artifacts, owner)
        else:
            reporting = nullcontext(NullSink())
            store = FolderCheckpointStore(Path(f"rank-{rank}-unused"))
        with reporting as sink:
            result = trainer_core.run(spec, sink, store, stop.is_set)
        from trainer_core import distributed

        distributed.teardown()
    except BaseException as exc:
        traceback.print_exc()
        Path(f"rank-{rank}.error").write_text(f"{type(exc).__name__}: {exc}"[:4000])
        from worker.launch import ABANDONED_EXIT
        from worker.lease import Abandoned

        return ABANDONED_EXIT if isinstance(exc, Abandoned) else 1
    if rank == 0:
        Path("result.json").write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
