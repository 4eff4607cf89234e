"""One job in several processes: data parallelism and DeepSpeed's ZeRO stages 0-3.

A method that supports it (``distributed`` in its ``trainer_core.registry`` row) calls these
functions in place of its single-process ones; with one process and ZeRO off every function
is the plain version (``loss.backward()``, ``optim.optimizer_step``), so the single-process
path is unchanged.

How a step is split, so that N processes compute what one process would:

- Every rank builds the same plan of optimizer steps (it is a function of the seed and the
  epoch), and takes its share of every micro-batch (``share``: rows ``rank::world_size``).
  Every rank runs the same number of forward/backward passes per step, which ZeRO-2/3
  need (their gradient hooks are collectives); a rank whose share of a short micro-batch
  is empty runs one row with weight 0.
- The loss keeps the normalisers of the whole step (tokens, pairs), so the ranks' losses
  add up to the single-process loss. DeepSpeed averages gradients over the ranks, so each
  rank's loss is multiplied by ``world_size`` (``backward``): the averaged gradient is the
  sum, i.e. the single-process gradient.
- ZeRO stage 0 with several processes is plain data parallelism without DeepSpeed: the
  gradients are summed over the ranks (all-reduce) before the single-process step.
- Gradient accumulation is ours, not DeepSpeed's: ``managed_gradient_accumulation`` is off
  each micro-batch's ``engine.backward`` only accumulates, and the one
  ``engine.step()`` of an optimizer step reduces, clips (``gradient_clipping``), steps AdamW
  and the schedule. A step may then hold fewer micro-batches (the last of an epoch).
- Metrics are sums over each rank's rows, added up over the ranks (``all_reduce_sum``),
  so rank 0 logs what a single process would.
- Only rank 0 writes metrics, events and checkpoints (the others get ``seams.NullSink``);
  checkpoints are gathered first (ZeRO-3 parameters, every rank's optimizer partition)
  and written in the single-process format (``checkpoint.py``): a checkpoint saved here
  resumes under DeepSpeed or in one process alike.

The process group is set up from the environment the launcher gives each rank (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, nccl on
GPUs. ZeRO-3 needs it before the model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from trainer_core import placement
from trainer_core.optim import optimizer_step as single_optimizer_step
from trainer_core.placement import Placement, local_device, place
from trainer_core.specs import ResourcesSpec

T = TypeVar("T")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class Distributed:
    """This process's place in the job (rank 0 of 1 when the job runs in one process)."""

    rank: int = 0
    world_size: int = 1
    resources: ResourcesSpec = dataclasses.field(default_factory=ResourcesSpec)
    engine: Any = None  # the DeepSpeedEngine, once ``wrap`` made one
    # The trainable parameters in the single-process optimizer's order, and that optimizer's
    # empty state_dict: the layout a portable checkpoint is written in.
    ordered_params: list[nn.Parameter] = dataclasses.field(default_factory=list)
    optimizer_layout: dict[str, Any] = dataclasses.field(default_factory=dict)
    # This rank's device and precision, and fp16's loss scaler outside DeepSpeed (under
    # DeepSpeed its config scales the loss).
    placement: Placement = dataclasses.field(default_factory=Placement)
    scaler: torch.amp.GradScaler | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> int:
        return self.resources.zero_stage

    @property
    def comm_device(self) -> torch.device:
        """Where the tensors of our own collectives live: nccl reduces CUDA tensors only."""
        return self.placement.device


def setup(resources: ResourcesSpec) -> Distributed:
    """Join the job's process group (when the job runs under DeepSpeed or in several
    processes), on this rank's device: ``cuda:<LOCAL_RANK>`` with nccl, else the CPU with gloo.
    """
    # Before the group: nccl binds each rank to the current CUDA device (``place`` sets it).
    where = place(resources)
    # DeepSpeed scales fp16 losses itself; elsewhere fp16 needs our scaler.
    scaler = where.grad_scaler() if resources.zero_stage == 0 else None
    if not resources.distributed:
        return Distributed(resources=resources, placement=where, scaler=scaler)
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if local_device().type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        resources=resources,
        placement=where,
        scaler=scaler,
    )


def teardown() -> None:
    """Leave the job's process group, if this process joined one, before it exits. PyTorch
    asks for it; without it a rank that had finished its run sometimes aborted at exit
    ("terminate called without an active exception", SIGABRT) while its process group's
    threads were still being torn down (seen once in a two-process ppo run under
    `make test`). Only after a run that returned: a peer that died may never answer."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(d: Distributed, *, batch_size: int, max_grad_norm: float) -> dict[str, Any]:
    """The DeepSpeed config of a job: ZeRO stage, precision, clipping; accumulation is ours.

    bf16/fp16 are DeepSpeed's own mixed precision: the engine keeps the module in half
    precision and fp32 master weights in the optimizer's partitions (fp16 with its dynamic
    loss scale); our forwards still run under ``placement``'s autocast, so a frozen fp32
    reference computes like the policy. Checkpoints hold the fp32 masters (``gathered``).
    """
    r = d.resources
    zero: dict[str, Any] = {"stage": r.zero_stage}
    if r.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        # Only sets DeepSpeed's bookkeeping of samples; our batches are what they are.
        "train_micro_batch_size_per_gpu": max(1, math.ceil(batch_size / d.world_size)),
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        # Our AdamW (torch's): the same optimizer as in one process, so the curves match.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": r.precision == "bf16"},
        "fp16": {"enabled": r.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def wrap(
    d: Distributed,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    batch_size: int,
    max_grad_norm: float,
) -> None:
    """Hand the model, optimizer and schedule to DeepSpeed (no-op in one process).

    Forward passes keep calling the model itself: DeepSpeed's ZeRO-3 hooks live on its
    modules. ``backward`` and ``optimizer_step`` go through the engine.
    """
    if d.zero_stage == 0:
        return  # one process, or plain data parallelism (``optimizer_step`` sums the gradients)
    # Taken before DeepSpeed swaps the groups' parameters for its flat partitions.
    d.ordered_params = [p for group in optimizer.param_groups for p in group["params"]]
    d.optimizer_layout = optimizer.state_dict()
    import deepspeed

    d.engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(d, batch_size=batch_size, max_grad_norm=max_grad_norm),
    )


def share(d: Distributed, indices: Sequence[int]) -> tuple[list[int], float]:
    """This rank's rows of a micro-batch, and the weight of its loss (0 for a stand-in row)."""
    mine = list(indices[d.rank :: d.world_size])
    if mine:
        return mine, 1.0
    # Too few rows for every rank: run one anyway (the collectives need every rank), weighted 0.
    return [indices[0]], 0.0


def backward(d: Distributed, loss: torch.Tensor, *, last: bool) -> None:
    """Backward of one micro-batch; ``last``: the last micro-batch of the optimizer step."""
    if d.engine is None:
        placement.backward(loss, d.scaler)
        return
    # DeepSpeed averages gradients over the ranks; our losses already add up to the whole.
    d.engine.backward(loss * d.world_size, scale_wrt_gas=False)
    if d.zero_stage == 3 and not last:
        # ZeRO-3 counts micro-batches in ``engine.forward`` (a second backward otherwise
        # overwrites the first's partitioned gradients); our forwards call the model itself.
        d.engine.optimizer.clear_backward_seen_flag()


def optimizer_step(
    d: Distributed,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> tuple[torch.Tensor, float]:
    """Clip, step AdamW and the schedule, clear the gradients: ``(grad_norm, learning_rate)``."""
    if d.engine is None:
        if d.world_size > 1:
            import torch.distributed as dist

            # ZeRO off: every rank holds every gradient; the sum over ranks is the step's.
            for param in params:
                if param.grad is not None:
                    dist.all_reduce(param.grad)
        return single_optimizer_step(params, optimizer, scheduler, max_grad_norm, d.scaler)
    learning_rate = float(scheduler.get_last_lr()[0])
    d.engine.step()
    norm = d.engine.get_global_grad_norm()
    return torch.tensor(float(norm) if norm is not None else math.nan), learning_rate


def all_reduce_sum(d: Distributed, stats: T) -> T:
    """A dataclass of totals, added up over the ranks: sums, but the min of ``*_min`` fields
    and the max of ``*_max`` fields (the convention of ``preference_losses.add_stats``). A
    tuple of such dataclasses is added up member by member."""
    if d.world_size == 1:
        return stats
    if isinstance(stats, tuple):
        return tuple(all_reduce_sum(d, member) for member in stats)  # type: ignore[return-value]
    import torch.distributed as dist

    fields = dataclasses.fields(stats)  # type: ignore[arg-type]
    values = [float(getattr(stats, f.name)) for f in fields]
    # One SUM and one MAX reduction (min as the max of the negation).
    sign = [-1.0 if f.name.endswith("_min") else 1.0 for f in fields]
    extreme = [f.name.endswith(("_min", "_max")) for f in fields]
    sums = torch.tensor(
        [0.0 if e else v for v, e in zip(values, extreme, strict=True)],
        dtype=torch.float64,
        device=d.comm_device,
    )
    peaks = torch.tensor(
        [s * v if e else -math.inf for v, s, e in zip(values, sign, extreme, strict=True)],
        dtype=torch.float64,
        device=d.comm_device,
    )
    dist.all_reduce(sums)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    totals = {}
    for i, f in enumerate(fields):
        total = sign[i] * float(peaks[i]) if extreme[i] else float(sums[i])
        old = getattr(stats, f.name)
        totals[f.name] = (
            torch.tensor(total, dtype=old.dtype)
            if isinstance(old, torch.Tensor)
            else type(old)(round(total) if isinstance(old, int) else total)
        )
    return dataclasses.replace(stats, **totals)  # type: ignore[type-var]


def nothing(stats: T) -> T:
    """Stats that add nothing (those of a stand-in row ``share`` gave a rank with no rows):
    zero sums, +inf for ``*_min`` and -inf for ``*_max``; a tuple of them, member by member."""
    if isinstance(stats, tuple):
        return tuple(nothing(member) for member in stats)  # type: ignore[return-value]
    totals = {}
    for f in dataclasses.fields(stats):  # type: ignore[arg-type]
        old = getattr(stats, f.name)
        value = math.inf if f.name.endswith("_min") else -math.inf if f.name.endswith("_max") else 0
        totals[f.name] = (
            torch.tensor(value, dtype=old.dtype if old.is_floating_point() else torch.float64)
            if isinstance(old, torch.Tensor) and f.name.endswith(("_min", "_max"))
            else torch.zeros_like(old)
            if isinstance(old, torch.Tensor)
            else type(old)(value)
        )
    return dataclasses.replace(stats, **totals)  # type: ignore[type-var]


def shard_frozen(d: Distributed, model: nn.Module) -> nn.Module:
    """A frozen model (DPO's reference under full fine-tuning) sharded like the policy under
    ZeRO-3, so that it does not cost every rank a whole copy; otherwise as it is."""
    if d.zero_stage != 3:
        return model
    import deepspeed

    config = deepspeed_config(d, batch_size=1, max_grad_norm=0.0)
    config.pop("gradient_clipping")
    engine, *_ = deepspeed.initialize(model=model, config=config)
    module: nn.Module = engine.module
    return module.eval()


def mean_over_ranks(d: Distributed, values: torch.Tensor, *, weight: float = 1.0) -> torch.Tensor:
    """The mean of ``values`` (this rank's rows of a micro-batch) over every rank's rows: what
    one process would compute over the whole micro-batch (KTO's baseline z). A collective in
    several processes; the stand-in row of a rank with no rows (``weight`` 0) counts for
    nothing. Detached across ranks (it is a baseline, not a path for gradients)."""
    if d.world_size == 1:
        return values.mean()
    import torch.distributed as dist

    totals = torch.tensor(
        [float(values.detach().sum()) * weight, values.numel() * weight],
        dtype=torch.float64,
        device=d.comm_device,
    )
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).to(dtype=values.dtype, device=values.device)


def gather_rows(
    d: Distributed, values: torch.Tensor, rows: torch.Tensor, total: int, *, weight: float = 1.0
) -> torch.Tensor:
    """(total, ...) on every rank: each rank's ``values`` (n, ...) put at its ``rows`` (n,) of
    the whole (an online rollout's per-row rewards, lengths, KL). The ranks' rows are
    disjoint; a rank's stand-in rows (``weight`` 0) add nothing. A collective in several
    processes; in one, ``values`` as they are (its rows are all of them, in order)."""
    if d.world_size == 1:
        return values
    import torch.distributed as dist

    whole = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=d.comm_device)
    if weight:
        whole[rows.to(d.comm_device)] = values.to(d.comm_device)
    dist.all_reduce(whole)
    return whole.to(values.device)


def sum_float(d: Distributed, value: float) -> float:
    """``value`` added up over the ranks (a metric's sum over every rank's rows)."""
    if d.world_size == 1:
        return value
    return float(all_reduce_tensor(d, torch.tensor([value], dtype=torch.float64)).item())


def all_reduce_tensor(d: Distributed, value: torch.Tensor) -> torch.Tensor:
    """``value`` added up over the ranks (in float64 on the wire), back in its own dtype and
    device: a statistic of an online rollout summed over every rank's rows (PPO's whitening)."""
    if d.world_size == 1:
        return value
    import torch.distributed as dist

    total = value.detach().to(device=d.comm_device, dtype=torch.float64)
    dist.all_reduce(total)
    return total.to(dtype=value.dtype, device=value.device)


def sum_int(d: Distributed, value: int) -> int:
    if d.world_size == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64, device=d.comm_device)
    dist.all_reduce(total)
    return int(total.item())


def any_rank(d: Distributed, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a stop request reaches one rank, all must stop)."""
    if d.world_size == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=d.comm_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(d: Distributed) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def gathered(d: Distributed, model: nn.Module) -> Iterator[None]:
    """Every parameter whole on every rank for the duration (ZeRO-3 shards them), and the
    trained ones in fp32 (a collective under ZeRO: every rank calls it)."""
    if d.engine is None:
        yield
        return
    if d.zero_stage != 3:
        with _fp32_masters(d):
            yield
        return
    import deepspeed

    whole = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with whole, _fp32_masters(d):
        yield


@contextlib.contextmanager
def _fp32_masters(d: Distributed) -> Iterator[None]:
    """Under DeepSpeed's bf16/fp16 the module holds half-precision copies and the optimizer
    the fp32 master weights; a checkpoint must hold the masters (what one process would
    save, and what resumes without losing the low bits), so they stand in for the duration."""
    if d.resources.precision == "fp32":
        yield
        return
    from deepspeed.utils import safe_get_full_fp32_param

    masters = [safe_get_full_fp32_param(param) for param in d.ordered_params]  # collective
    held = [param.data for param in d.ordered_params]
    try:
        for param, master in zip(d.ordered_params, masters, strict=True):
            param.data = master.to(param.device)
        yield
    finally:
        for param, data in zip(d.ordered_params, held, strict=True):
            param.data = data


def optimizer_state(
    d: Distributed, optimizer: torch.optim.Optimizer, step: int, learning_rate: float
) -> dict[str, Any]:
    """The optimizer's state in the single-process (torch AdamW) layout. A collective under
    ZeRO: every rank calls it, each contributing its partition."""
    if d.engine is None:
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, param in enumerate(d.ordered_params):
        entry = {"step": torch.tensor(float(step))}
        for key in ADAM_STATES:
            full = safe_get_full_optimizer_state(param, key)
            if full is None:  # no optimizer step taken yet: AdamW's state is still empty
                break
            entry[key] = full.detach().float().cpu().clone()
        else:
            state[index] = entry
    groups = [
        {**group, "lr": learning_rate} for group in d.optimizer_layout.get("param_groups", [])
    ]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    d: Distributed, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> None:
    """Put a single-process-layout optimizer state back (into DeepSpeed's partitions under
    ZeRO). Call after ``wrap``; every rank calls it."""
    if d.engine is None:
        optimizer.load_state_dict(dict(saved))
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    state = {int(k): v for k, v in saved["state"].items()}
    if not state:
        return
    step = next(iter(state.values()))["step"]
    # AdamW builds its state at its first step; build it now so there is somewhere to load into.
    zero = d.engine.optimizer
    inner = zero.optimizer
    inner.state.clear()  # what ``resume`` loaded before the wrap, keyed by unwrapped params
    # The fp32 partitions AdamW steps: ZeRO-3 and ZeRO-1/2 name them differently.
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = zero.single_partition_of_fp32_groups
    for flat in flats:
        inner.state[flat] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    for index, param in enumerate(d.ordered_params):
        if index in state:
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(param, state[index][key], key)
