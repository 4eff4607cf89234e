"""The training loop every method shares: functions, and one record of a run's state.

A method module keeps its own story on screen: how it batches, what it computes (log-probs,
rewards, advantages), its loss and its metrics. Everything around that story is here, once:

- ``setup``: seeding and the process group (joined before the model is built: ZeRO-3);
- ``Job.load``: the policy and its tokenizer (``load_base``, ``policy``), the training and
  validation examples with the truncation report (``load_splits``);
- ``start_run``: optimizer, schedule, resume from a checkpoint, the DeepSpeed wrap; it
  returns the ``Run``, the one object that carries the run's state from step to step;
- ``Run.steps``: the iterator over optimizer steps (or rollouts), which owns the stop check,
  the checkpoint cadence and the skipping of steps a resumed run already took;
- ``Run.shares``, ``Run.backward``, ``Run.optimizer_step``: the one backward/step path, the
  distributed one, which is plain single-process code in one process;
- ``Run.count`` and ``Run.record``: token counts and the metrics window;
- ``Job.validation`` and ``evaluate``: a validation pass (the method's own step loss over
  the validation examples, in eval mode without grad) and its metrics;
- ``Run.result``: how the run ended.

A method then reads (an offline one, in short)::

    @loop.method(XHyperparameters)
    def train(job, hp):
        model, tokenizer, examples, valid_examples = job.load(load_rows)
        run = job.start(model, tokenizer, rows=len(examples), summarise=..., validate=...)
        for micro_batches in run.steps(lengths=...):
            normaliser = ...                 # of the whole step: its tokens, pairs or rows
            loss = partial(step_loss, model, normaliser)  # the method's own algorithm
            run.train_step(micro_batches, collate_indices, loss, add_stats)
        return run.result()

``train_step`` is ``shares`` → the method's loss → ``backward`` for each micro-batch, then
``optimizer_step`` and ``record``; an online method calls those pieces itself. ``validate``
is ``job.validation``: the same step loss, its normalisers set to 1, over the validation
examples.

Shared functions, not a base class with hooks: what differs between methods is passed in as
plain values and functions (``collate``, ``loss``, ``summarise``), and each method calls the
pieces in its own order.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from trainer_core import distributed
from trainer_core.adapters import apply_adapter
from trainer_core.batching import (
    Step,
    epoch_steps,
    fixed_batches,
    split_by_tokens,
    steps_per_epoch,
)
from trainer_core.checkpoint import (
    TrainerState,
    already_done,
    reload_after_wrap,
    resume,
    save_checkpoint,
)
from trainer_core.distributed import Distributed
from trainer_core.kernels import apply_liger, compile_layers
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import (
    Placement,
    deterministic_algorithms,
    enable_gradient_checkpointing,
)
from trainer_core.reporting import TruncationCounts, report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import TrainSpec

B = TypeVar("B")
E = TypeVar("E")
S = TypeVar("S")
H = TypeVar("H")
E_co = TypeVar("E_co", covariant=True)


def seed_everything(seed: int, num_threads: int | None, *, deterministic: bool = True) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when cuBLAS starts, so
        # before the first matmul (an operator's own setting wins).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set either way: a worker process runs many jobs, and one job's choice must not leak
    # into the next. warn_only: on CUDA some kernels have no deterministic version; better
    # a warning in the log than a failed job.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def setup(spec: TrainSpec) -> Distributed:
    """Seed the run and join its process group: this rank's place, device and precision.

    First thing in a method: ZeRO-3 needs the group before the model is built.
    """
    deterministic = deterministic_algorithms(spec.resources)
    seed_everything(spec.seed, spec.num_threads, deterministic=deterministic)
    dist = distributed.setup(spec.resources)
    if dist.placement.device.type == "cuda":
        # The run's own peak (``peak_gpu_memory_gib``), not an earlier run's in this process.
        torch.cuda.reset_peak_memory_stats(dist.placement.device)
    return dist


@dataclass(frozen=True)
class Job:
    """What a method is handed (the spec, where it reports and saves, whether to stop) and
    this rank's place in the job: the record the set-up functions below take."""

    spec: TrainSpec
    sink: MetricSink
    store: CheckpointStore
    should_stop: ShouldStop
    dist: Distributed

    @property
    def where(self) -> Placement:
        return self.dist.placement

    def load_base(self) -> tuple[nn.Module, Any]:
        return load_base(self.spec)

    def load_splits(
        self, load: Callable[..., Dataset[E]], tokenizer: Any, **options: Any
    ) -> tuple[Sequence[E], Sequence[E]]:
        return load_splits(self.spec, self.sink, load, tokenizer, **options)

    def policy(self, base: nn.Module, **options: Any) -> nn.Module:
        return policy(self.spec, self.dist, base, **options)

    def load(
        self, load: Callable[..., Dataset[E]], *, dropout: bool = False, **options: Any
    ) -> tuple[nn.Module, Any, Sequence[E], Sequence[E]]:
        """``(model, tokenizer, examples, valid_examples)``: the policy (``policy`` of the
        ``load_base`` model, with ``dropout``) and its tokenizer, and the training and
        validation examples (``load_splits`` with ``load`` and its ``options``)."""
        base, tokenizer = self.load_base()
        examples, valid_examples = self.load_splits(load, tokenizer, **options)
        return self.policy(base, dropout=dropout), tokenizer, examples, valid_examples

    def validation(
        self,
        examples: Sequence[E],
        model: nn.Module,
        collate: Callable[[list[E]], B],
        loss: Callable[[B, Share], tuple[torch.Tensor, S]],
        metrics: Callable[[Sequence[S]], dict[str, float]],
    ) -> Callable[[], dict[str, float]] | None:
        """The run's validation pass for its checkpoints: ``evaluate`` of ``examples`` in
        batches of the job's ``batch_size`` on this rank's device (None without validation
        examples)."""
        if not examples:
            return None
        batch_size = self.spec.hyperparameters.batch_size
        return lambda: evaluate(model, examples, batch_size, collate, loss, metrics, self.where)

    def start(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        rows: int,
        gradient_accumulation_steps: int | None = None,
        steps_per_item: int = 1,
        **options: Any,
    ) -> Run[Any]:
        """``start_run`` over ``rows`` rows an epoch: ``batching.steps_per_epoch`` optimizer
        steps of micro-batches of ``batch_size`` rows, ``gradient_accumulation_steps`` (the
        hyperparameter by default) to a step; an online method's rollout of ``batch_size``
        prompts is one micro-batch (``gradient_accumulation_steps=1``) and ``steps_per_item``
        optimizer steps."""
        hp = self.spec.hyperparameters
        accumulation = gradient_accumulation_steps or hp.gradient_accumulation_steps
        run: Run[Any] = start_run(
            self.spec,
            self.sink,
            self.store,
            self.should_stop,
            self.dist,
            model,
            tokenizer,
            per_epoch=steps_per_epoch(rows, hp.batch_size, accumulation) * steps_per_item,
            **options,
        )
        run.rows, run.accumulation, run.steps_per_item = rows, accumulation, steps_per_item
        return run


def begin(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> Job:
    """Seed the run and join its process group: first thing in a method (ZeRO-3 needs the
    group before the model is built)."""
    return Job(spec, sink, store, should_stop, setup(spec))


def hyperparameters(spec: TrainSpec, kind: type[H]) -> H:
    """``spec.hyperparameters``, which must be of the method's ``kind``."""
    if not isinstance(spec.hyperparameters, kind):
        raise TypeError(f"method {spec.method} needs {kind.__name__}")
    return spec.hyperparameters


Method = Callable[[TrainSpec, MetricSink, CheckpointStore, ShouldStop], RunResult]


def method(kind: type[H]) -> Callable[[Callable[[Job, H], RunResult]], Method]:
    """A method's ``train(job, hp)`` as the runner calls it, ``train(spec, sink, store,
    should_stop)``: the hyperparameters checked to be the method's ``kind``, the run seeded
    and its process group joined (``begin``) before the method builds anything."""

    def wrap(train: Callable[[Job, H], RunResult]) -> Method:
        @functools.wraps(train)
        def run(
            spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
        ) -> RunResult:
            hp = hyperparameters(spec, kind)
            return train(begin(spec, sink, store, should_stop), hp)

        return run

    return wrap


def load_base(spec: TrainSpec) -> tuple[nn.Module, Any]:
    """The base model (gradient checkpointing on when the job asks) and its tokenizer."""
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    enable_gradient_checkpointing(base, spec.resources.gradient_checkpointing)
    if spec.resources.liger:
        apply_liger(base)  # checked at ``setup`` (placement.place): a CUDA GPU and the package
    return base, tokenizer


class Dataset(TruncationCounts, Protocol[E_co]):
    """What a method's data loader returns: the usable rows, and what loading cut."""

    @property
    def examples(self) -> Sequence[E_co]: ...


def load_splits(
    spec: TrainSpec,
    sink: MetricSink,
    load: Callable[..., Dataset[E]],
    tokenizer: Any,
    *,
    unit: str = "examples",
    minimum: int = 1,
    too_few: str | None = None,
    **options: Any,
) -> tuple[Sequence[E], Sequence[E]]:
    """The training examples and the validation examples (none when the job has no
    validation file), each split read with ``load(path, tokenizer, max_seq_len, **options)``
    and reported (rows cut or dropped at ``max_seq_len``).

    A split with fewer than ``minimum`` usable examples is an error: "no training pair has a
    completion token within N", or ``too_few`` (formatted with ``split`` and ``max_seq_len``).
    """

    def checked(path: str, split: str) -> Sequence[E]:
        data = load(path, tokenizer, spec.max_seq_len, **options)
        report_truncation(sink, data, split, spec.max_seq_len, unit=unit)
        if len(data.examples) < minimum:
            message = too_few or "no {split} {row} has a completion token within {max_seq_len}"
            raise ValueError(
                message.format(
                    split=split, row=unit.removesuffix("s"), max_seq_len=spec.max_seq_len
                )
            )
        return data.examples

    examples = checked(spec.train_file, "training")
    if spec.validation_file is None:
        return examples, []
    return examples, checked(spec.validation_file, "validation")


def policy(
    spec: TrainSpec, dist: Distributed, base: nn.Module, *, dropout: bool = False, **adapter: Any
) -> nn.Module:
    """The model to train: ``base`` with the job's adapter (``adapters.apply_adapter``, with
    ``adapter`` options such as a task type), on this rank's device, in training mode.

    Every dropout is off unless ``dropout`` (TRL's ``disable_dropout=True`` of its preference
    and online trainers: the policy then equals its reference at the first step)."""
    model = dist.placement.model(apply_adapter(base, spec.adapter, **adapter))
    if not dropout:
        disable_dropout(model)
    model.train()
    return model


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to 0, LoRA's too (TRL's ``disable_dropout=True`` default): dropout
    would make the policy differ from the reference at Δ = 0 and add noise to the margin."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@dataclass(frozen=True)
class Share:
    """This rank's part of one micro-batch of an optimizer step (``Run.shares``), or a whole
    validation batch (``evaluate``: its examples' indices, weight 1)."""

    rows: list[Any]  # the rows this rank computes (all of them in one process)
    weight: float  # of its loss: 0 for the stand-in row of a rank with no rows of its own
    last: bool  # the step's last micro-batch (ZeRO-3 counts backward passes by it)
    whole: bool  # ``rows`` is the whole micro-batch: a batch built for it can be reused


@dataclass
class Run(Generic[S]):
    """A run's state from its first step to its result; ``start_run`` makes it.

    ``S`` is the type of the method's per-step statistics, which ``summarise`` turns into
    metric values over the steps of a logging window (and over the last step, for a
    checkpoint's metrics).
    """

    spec: TrainSpec
    sink: MetricSink
    store: CheckpointStore
    should_stop: ShouldStop
    dist: Distributed
    model: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    per_epoch: int  # optimizer steps in an epoch
    start: TrainerState | None  # where a resumed run picked up; None for a fresh one
    summarise: Callable[[Sequence[S]], dict[str, float]]
    # A checkpoint's training metrics, of the last step's stats (default: its train_loss).
    checkpoint_metrics: Callable[[S], dict[str, float]] | None = None
    validate: Callable[[], dict[str, float]] | None = None
    step: int = 0  # optimizer steps taken
    num_tokens: int = 0  # counted (loss) tokens so far
    trained_tokens: int = 0  # non-padding tokens so far (TRL's num_tokens)
    saved_at: int = -1  # step of the latest checkpoint
    stopped: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_stats: S | None = None
    window: list[S] = field(default_factory=list)  # stats of the steps since the last point
    # The plan of an epoch (``Job.start``): rows, micro-batches to a step, steps to an item.
    rows: int = 0
    accumulation: int | None = None
    steps_per_item: int = 1

    @property
    def total_steps(self) -> int:
        return self.per_epoch * self.spec.hyperparameters.n_epochs

    @property
    def where(self) -> Placement:
        return self.dist.placement

    # -- the steps ---------------------------------------------------------------------------

    def steps(
        self,
        *,
        lengths: Sequence[int] | None = None,
        rows_per_item: int = 1,
        padding_free: bool = False,
    ) -> Iterator[Step]:
        """Each optimizer step's micro-batches (lists of row indices) of every epoch left.

        The plan of an epoch is ``batching.epoch_steps`` over the run's ``rows`` (seeded by
        the run's seed and the epoch, length-grouped by ``lengths``). With the job's
        ``resources.max_tokens_per_batch`` (and ``lengths``), each step's rows
        are re-cut into micro-batches of that many tokens (``batching.split_by_tokens``, with
        ``rows_per_item`` rows run per length and ``padding_free`` counting real tokens): the
        step keeps its rows, so the method's normalisers and the update stay. Before each step: skip
        it if a resumed run took it already, and stop, keeping a checkpoint, if any rank was
        asked to. After it: a checkpoint every ``checkpoint_every`` steps, or at the end of
        every epoch without one.

        With ``steps_per_item`` > 1 (``Job.start``) an item takes several optimizer steps (an
        online method's rollout, trained on ``num_iterations`` times): its steps are counted
        by the item, and checkpoints and stops fall between items.
        """
        hp = self.spec.hyperparameters
        every = self.spec.checkpoint_every
        n_rows, steps_per_item = self.rows, self.steps_per_item
        accumulation = self.accumulation or hp.gradient_accumulation_steps
        budget = self.spec.resources.max_tokens_per_batch
        for epoch in range(self.start.epoch if self.start else 0, hp.n_epochs):
            plan = epoch_steps(
                n_rows,
                batch_size=hp.batch_size,
                gradient_accumulation_steps=accumulation,
                seed=self.spec.seed,
                epoch=epoch,
                # Rows of similar length share a batch: far less padding to run through.
                lengths=lengths,
            )
            if budget is not None and lengths is not None:
                plan = [
                    split_by_tokens(
                        step,
                        lengths,
                        budget,
                        padding_free=padding_free,
                        rows_per_item=rows_per_item,
                        ranks=self.dist.world_size,
                    )
                    for step in plan
                ]
            for index, micro_batches in enumerate(plan):
                position = index * steps_per_item  # optimizer steps of this epoch before it
                if already_done(self.start, epoch, position):
                    continue
                if distributed.any_rank(self.dist, self.should_stop()):
                    # Nothing trained yet means nothing worth keeping.
                    if self.step > 0 and self.saved_at != self.step:
                        self.checkpoint(epoch, position, final=False)
                    self.stopped = True
                    return
                yield micro_batches
                if every is not None and (
                    self.step // every > (self.step - steps_per_item) // every
                    or self.step == self.total_steps
                ):
                    self.checkpoint(
                        epoch, position + steps_per_item, final=self.step == self.total_steps
                    )
            if every is None:
                self.checkpoint(epoch + 1, 0, final=epoch == hp.n_epochs - 1)

    def shares(self, micro_batches: Sequence[Sequence[int]]) -> list[Share]:
        """This rank's rows of each micro-batch of a step (``distributed.share``)."""
        shares = []
        for n, indices in enumerate(micro_batches):
            rows, weight = distributed.share(self.dist, indices)
            last = n == len(micro_batches) - 1
            shares.append(Share(rows, weight, last, whole=self.dist.world_size == 1))
        return shares

    def train_step(
        self,
        micro_batches: Sequence[Sequence[Any]],
        collate: Callable[[list[Any]], B],
        loss: Callable[[B, Share], tuple[torch.Tensor, S]],
        add: Callable[[Sequence[S]], S],
        *,
        wholes: Sequence[B] | None = None,
    ) -> None:
        """One optimizer step over ``micro_batches`` (lists of rows: indices, or whatever
        ``collate`` turns into a batch), the step of every offline method:

        for each micro-batch, this rank's share of it collated and on the device → ``loss`` of
        it under autocast (the method's whole algorithm: ``(loss, stats)``, the loss already
        normalised by the whole step) → backward; then clip → AdamW step → schedule → the
        stats added up over the micro-batches (``add``) and the ranks → ``record``.

        ``wholes``: the micro-batches already collated whole (a method that needs them for its
        normaliser), reused in one process rather than collated again.
        """
        wholes = wholes or [collate(list(rows)) for rows in micro_batches]
        micro_stats = []
        for share, whole in zip(self.shares(micro_batches), wholes, strict=True):
            batch = self.where.to(whole if share.whole else collate(share.rows))
            with self.where.autocast():
                value, stats = loss(batch, share)
            self.backward(value * share.weight, last=share.last)
            micro_stats.append(stats if share.weight else distributed.nothing(stats))
            self.count_batch(whole)
        grad_norm, learning_rate = self.optimizer_step()
        step_stats = distributed.all_reduce_sum(self.dist, add(micro_stats))
        self.record(step_stats, grad_norm=grad_norm, learning_rate=learning_rate)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Backward of one micro-batch's loss (scaled under fp16, through DeepSpeed under ZeRO)."""
        distributed.backward(self.dist, loss, last=last)

    def optimizer_step(self, *, ends_step: bool = True) -> tuple[torch.Tensor, float]:
        """Clip, step AdamW and the schedule, clear the gradients: ``(grad_norm,
        learning_rate)``, the rate the step used. Counts the step.

        ``ends_step=False``: an update that is not the last of its step, for a step made of
        several (PPO's epochs on one rollout; TRL's PPOTrainer steps the schedule once per
        rollout): the schedule holds, and the step is counted by the update that ends it.
        """
        if not ends_step and self.dist.engine is not None:
            raise ValueError("under DeepSpeed every optimizer update steps the schedule")
        scheduler = self.scheduler if ends_step else _HeldSchedule(self.scheduler)
        grad_norm, learning_rate = distributed.optimizer_step(
            self.dist,
            self.params,
            self.optimizer,
            scheduler,  # type: ignore[arg-type]
            self.spec.hyperparameters.max_grad_norm,
        )
        if ends_step:
            self.step += 1
        return grad_norm, learning_rate

    # -- what was trained, and the metrics ----------------------------------------------------

    def count(self, *, trained: int, loss: int) -> None:
        """Add a batch's non-padding tokens (``trained``) and the tokens its loss counts."""
        self.trained_tokens += trained
        self.num_tokens += loss

    def count_batch(self, batch: Any) -> None:
        """``count`` of a whole micro-batch: its real tokens, and its completion tokens (the
        targets of positions 1..T-1) as the loss tokens."""
        self.count(trained=int(batch.num_tokens), loss=int(batch.completion_mask[:, 1:].sum()))

    def record(self, stats: S, *, grad_norm: torch.Tensor | float, learning_rate: float) -> None:
        """Keep a step's stats (added up over the ranks already), and send a metric point
        every ``log_every`` steps and at the last: ``summarise`` over the steps since the last
        point (so log_every > 1 smooths rather than samples), and the run's state."""
        self.last_stats = stats
        self.window.append(stats)
        if self.step % self.spec.log_every == 0 or self.step == self.total_steps:
            values = self.summarise(self.window)
            self.window = []
            self.sink.metrics(
                self.step,
                {
                    **values,
                    "learning_rate": learning_rate,
                    "grad_norm": float(grad_norm),
                    # TRL's num_tokens: every non-padding token trained on so far.
                    "num_tokens": float(self.trained_tokens),
                    "epoch": self.step / self.per_epoch,
                    **self.device_metrics(),
                },
            )

    def device_metrics(self) -> dict[str, float]:
        """On a GPU, ``peak_gpu_memory_gib``: the most this rank's tensors have held since
        the run started (what decides whether a batch size fits). Nothing on the CPU."""
        device = self.dist.placement.device
        if device.type != "cuda":
            return {}
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}

    def checkpoint(self, epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        """Save a checkpoint of the current step (every rank calls it under ZeRO), with the
        last step's ``checkpoint_metrics`` and the validation metrics."""
        metrics = {"step": float(self.step)}
        if self.last_stats is not None:
            if self.checkpoint_metrics is not None:
                metrics |= self.checkpoint_metrics(self.last_stats)
            else:
                metrics["train_loss"] = self.summarise([self.last_stats])["train_loss"]
        if self.validate is not None:
            metrics |= self.validate()
        state = TrainerState(
            self.step,
            epoch,
            steps_in_epoch,
            self.spec.seed,
            self.total_steps,
            self.num_tokens,
            self.trained_tokens,
        )
        save_checkpoint(
            self.store,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer=state,
            metrics=metrics,
            final=final,
            dist=self.dist,
        )
        self.saved_at, self.last_metrics = self.step, metrics

    def result(self) -> RunResult:
        return RunResult(
            "stopped" if self.stopped else "completed",
            self.step,
            self.total_steps,
            self.trained_tokens,
            self.last_metrics,
        )


def start_run(
    spec: TrainSpec,
    sink: MetricSink,
    store: CheckpointStore,
    should_stop: ShouldStop,
    dist: Distributed,
    model: nn.Module,
    tokenizer: Any,
    *,
    per_epoch: int,
    summarise: Callable[[Sequence[S]], dict[str, float]],
    checkpoint_metrics: Callable[[S], dict[str, float]] | None = None,
    validate: Callable[[], dict[str, float]] | None = None,
    trainable: nn.Module | None = None,
) -> Run[S]:
    """AdamW and the schedule over ``model``'s trainable parameters, the run put back where
    ``spec.resume_from`` left it (weights, optimizer, schedule, RNG, position), and the
    DeepSpeed engine under ZeRO. Call it last in the set-up, once the model (and anything
    copied from it, such as a frozen reference) is built: nothing may draw from the restored
    RNG before the first step does.

    ``trainable``: what the optimizer trains when that is more than ``model`` (PPO's policy
    and its value head, in one ``nn.ModuleList``). Checkpoints and resuming still save and
    load ``model`` (a module beside it keeps itself in the checkpoint through the ``store``),
    and DeepSpeed is not given it: ZeRO stage 0 only (in several processes
    ``distributed.optimizer_step`` sums its gradients over the ranks with the model's)."""
    hp = spec.hyperparameters
    if trainable is not None and dist.zero_stage != 0:
        raise ValueError("modules trained beside the model are not handed to DeepSpeed")
    trained = trainable if trainable is not None else model
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        trained, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay
    )
    total_steps = per_epoch * hp.n_epochs
    scheduler = build_scheduler(
        optimizer, kind=hp.lr_scheduler, total_steps=total_steps, warmup_ratio=hp.warmup_ratio
    )
    sink.start(total_steps)
    if spec.resources.compile:
        # Here, once everything copied from the model (a frozen reference) is built: the
        # copies stay eager, and the policy compiles at its first forward.
        compile_layers(model)
    # Pick up where a checkpoint left off (pause/resume, a restarted failed job), or start.
    start = resume(spec.resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    distributed.wrap(
        dist, model, optimizer, scheduler, batch_size=hp.batch_size, max_grad_norm=hp.max_grad_norm
    )
    reload_after_wrap(dist, spec.resume_from)
    return Run(
        spec=spec,
        sink=sink,
        store=store,
        should_stop=should_stop,
        dist=dist,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        per_epoch=per_epoch,
        start=start,
        summarise=summarise,
        checkpoint_metrics=checkpoint_metrics,
        validate=validate,
        step=start.step if start else 0,
        num_tokens=start.num_tokens if start else 0,
        trained_tokens=start.trained_tokens if start else 0,
        saved_at=start.step if start else -1,
    )


class _HeldSchedule:
    """A schedule that does not advance: ``optimizer_step``'s for an update that does not end
    its step (it reads the rate of the schedule it holds)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def get_last_lr(self) -> list[float | torch.Tensor]:
        return self.scheduler.get_last_lr()

    def step(self) -> None:
        pass


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) and no grad for the duration, then as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    examples: Sequence[E],
    batch_size: int,
    collate: Callable[[list[E]], B],
    loss: Callable[[B, Share], tuple[torch.Tensor, S]],
    metrics: Callable[[Sequence[S]], dict[str, float]],
    where: Placement | None = None,
) -> dict[str, float]:
    """A validation pass: ``metrics`` of the stats of every ``batch_size`` examples in file
    order, in eval mode without grad, on ``where``'s device and under its autocast (the CPU
    in fp32 by default).

    ``loss`` is the method's training loss, ``(batch, share) -> (loss, stats)``, with its
    normalisers set to 1: its stats are sums, which no normaliser touches (``metrics``
    divides them). Each batch is one whole share, its rows the indices of its examples (a
    precomputed reference looks its log-probs up by them).
    """
    where = where or Placement()
    totals = []
    with evaluating(model):
        for indices in fixed_batches(len(examples), batch_size):
            batch = where.to(collate([examples[i] for i in indices]))
            with where.autocast():
                _, stats = loss(batch, Share(indices, 1.0, last=True, whole=True))
            totals.append(stats)
    return metrics(totals)


def mean_of_points(points: Sequence[dict[str, float]]) -> dict[str, float]:
    """A ``summarise`` for stats kept as metric dicts (the online methods'): each value's mean
    over the window's steps that have it."""
    # Every key of the window, not only the last step's: a value some steps have (the eval
    # pass's valid_reward) reaches the next point when log_every > 1.
    keys = dict.fromkeys(key for p in points for key in p)
    return {
        key: sum(p[key] for p in points if key in p) / sum(1 for p in points if key in p)
        for key in keys
    }
