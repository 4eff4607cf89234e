"""Ours vs TRL on one GPU, on a random model of Qwen2.5-0.5B's shape (issue #12, item 4).

    .venv/bin/python -m bench.gpu_speed [--out DIR] [--only supervised,dpo,reward_model,grpo]
                                        [--steps 30 --warmup 3] [--small]

The model is built here, offline: a Llama of Qwen2.5-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 KV heads, intermediate 4864, vocabulary 151,936, untied head: 630M parameters)
with random weights, and trainer_core's trained tokenizer (the kit in ``../shared/gpu``
builds the same). Each run is its own subprocess (its peak memory is its own; Liger's
patches stay in it) and reports one JSON line; the parent prints a markdown table and writes
``results.jsonl`` and ``table.md`` into ``--out``.

Runs, same data (``bench.common``: mixed-length rows, ~480 tokens a row at the default
``--max-sentences``), batch 8 rows, max length 1024, bf16 mixed precision over fp32 weights,
no gradient checkpointing, ``--steps`` timed steps after ``--warmup`` ones:

- supervised, dpo, reward_model × LoRA and full: ours (its defaults) vs TRL (its defaults);
- "best": ours with a token budget (``--budget`` tokens a micro-batch), padding-free batches
  (supervised) and compiled decoder layers, vs TRL with ``padding_free`` and BFD ``packing``
  to max length (supervised; TRL refuses padding_free alone with a max length) and
  ``use_liger_kernel`` when liger-kernel is installed;
- grpo LoRA, 4 generations × 64 tokens: ours vs TRL's GRPOTrainer (transformers generation,
  no vLLM).

Conventions (as the kit's, so the figures compare with the issue's table): tokens/s counts
non-padding tokens (our ``num_tokens`` and TRL's; DPO and reward_model: chosen + rejected;
GRPO: prompt + completion) over the timed steps, CUDA synchronised at each step's end; MFU
= k·N·tokens/s / peak (``--peak-tflops``, 989 for H100/H200 dense bf16), N = every
base-model parameter, k = 6 and, for LoRA, also 4 (frozen weights get no weight gradient);
DPO's reference forward is not counted. Peak memory is ``torch.cuda.max_memory_allocated``
of the run's process; GPU utilisation is nvidia-smi's, sampled every 0.5 s over the timed
steps (absent without nvidia-smi).

``--small`` is a plumbing check that runs on a CPU: trainer_core's tiny shape, fp32, 2
timed steps after 1, compile through ``aot_eager``. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import OFFLINE_EXTRA

QWEN_05B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
SMALL: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
METHODS = ("supervised", "dpo", "reward_model", "grpo")


@dataclass(frozen=True)
class Case:
    """One run: whose trainer, which method, adapter and configuration."""

    trainer: str  # "ours" or "trl"
    method: str
    adapter: str  # "lora" or "full"
    config: str  # "default" or "best"

    @property
    def name(self) -> str:
        return f"{self.method} {self.adapter} {self.config} {self.trainer}"


@dataclass
class Options:
    model: str
    precision: str
    steps: int
    warmup: int
    batch_size: int
    max_seq_len: int
    max_sentences: int
    budget: int
    generations: int
    completion: int
    compile_backend: str | None


@dataclass
class Figures:
    case: dict[str, str]
    ok: bool = False
    tokens_per_s: float | None = None
    s_per_step: float | None = None
    peak_gib: float | None = None
    gpu_util_pct: float | None = None
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""


def now() -> float:
    return time.perf_counter()


# -- the model -------------------------------------------------------------------------------


def build_model(dest: Path, *, small: bool) -> int:
    """A Llama of Qwen2.5-0.5B's shape (or trainer_core's tiny one), random, saved with
    trainer_core's tokenizer; its parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer_core.tiny_models import SIZES, _train_tokenizer

    tokenizer = _train_tokenizer(SIZES["30m"])
    config = LlamaConfig(
        **(SMALL if small else QWEN_05B),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    n_params = sum(p.numel() for p in model.parameters())
    model.to("cpu", torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return n_params


# -- GPU utilisation ----------------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi's utilisation every ``period`` s, in a thread (it sees every process)."""

    def __init__(self, period: float = 0.5) -> None:
        self.exe = shutil.which("nvidia-smi")
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (time, util %)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        assert self.exe is not None
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [self.exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.samples.append((now(), float(out.splitlines()[0])))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.exe is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(inside) / len(inside), 1) if inside else None


# -- timing ---------------------------------------------------------------------------------------


class Clock:
    """Step end times and cumulative tokens; CUDA synchronised at each mark."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.ends: list[float] = []
        self.tokens: list[float] = []
        self.losses: list[float] = []

    def mark(self, tokens: float, loss: float | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.ends.append(now())
        self.tokens.append(tokens)
        if loss is not None:
            self.losses.append(float(loss))

    def window(self, warmup: int) -> tuple[float, float, float, float] | None:
        """(tokens/s, s/step, start, end) over the steps after ``warmup``."""
        if len(self.ends) <= warmup or warmup < 1:
            return None
        t0, t1 = self.ends[warmup - 1], self.ends[-1]
        n = self.tokens[-1] - self.tokens[warmup - 1]
        steps = len(self.ends) - warmup
        return n / (t1 - t0), (t1 - t0) / steps, t0, t1


class _Sink:
    """Our MetricSink: the clock marks each step (one metric point a step)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def start(self, total_steps: int) -> None:
        pass

    def metrics(self, step: int, values: Any) -> None:
        self.clock.mark(values.get("num_tokens", float("nan")), values.get("train_loss"))

    def event(self, message: str, *, level: str = "info", data: Any = None) -> None:
        if level != "info":
            print(f"  [{level}] {message}", flush=True)


class _NoStore:
    def save(self, step: int, folder: Path, metrics: Any, *, final: bool) -> None:
        pass


# -- data and specs -----------------------------------------------------------------------------


def rows_for(method: str, n: int, o: Options) -> list[dict[str, Any]]:
    from bench.common import preference_rows, sft_rows

    if method == "supervised":
        return sft_rows(n, seed=3, max_sentences=o.max_sentences)
    if method == "grpo":
        return [
            {"messages": [{"role": "user", "content": f"Say something about {i}."}]}
            for i in range(n)
        ]
    return preference_rows(n, seed=4, max_sentences=o.max_sentences)


def hyperparameters(case: Case, o: Options, n_steps: int) -> Any:
    from trainer_core.specs import METHODS as REGISTRY

    common: dict[str, Any] = {
        "n_epochs": 1,
        "batch_size": o.batch_size,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 1e-4 if case.adapter == "lora" else 1e-5,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "linear",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }
    extra: dict[str, Any] = {
        **OFFLINE_EXTRA,
        "grpo": {
            "batch_size": 1,  # prompts a step: 1 × generations rows, as the kit's check
            "max_completion_length": o.completion,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "num_generations": o.generations,
            "epsilon": 0.2,
            "epsilon_high": None,
            "beta": 0.0,
            "scale_rewards": "group",
            "loss_type": "dapo",
            "num_iterations": 1,
            "mask_truncated_completions": False,
        },
    }[case.method]
    return REGISTRY[case.method].resolved(**{**common, **extra})


def spec_for(case: Case, o: Options, train_file: Path, n_steps: int) -> Any:
    from trainer_core.specs import AdapterSpec, ResourcesSpec, TrainSpec

    best = case.config == "best"
    resources = ResourcesSpec(
        precision=o.precision,  # type: ignore[arg-type]
        max_tokens_per_batch=o.budget if best and case.method != "grpo" else None,
        padding_free=best and case.method == "supervised",
        compile=best,
    )
    return TrainSpec(
        method=case.method,
        model=o.model,
        train_file=str(train_file),
        seed=0,
        max_seq_len=o.max_seq_len if case.method != "grpo" else 256,
        adapter=AdapterSpec(type=case.adapter),  # type: ignore[arg-type]
        hyperparameters=hyperparameters(case, o, n_steps),
        reward_functions=(
            [{"type": "length", "name": "short", "target": 8, "unit": "chars"}]
            if case.method == "grpo"
            else []
        ),
        checkpoint_every=10_000,
        resources=resources,
    )


# -- one run, in this process ----------------------------------------------------------------------


def run_ours(case: Case, o: Options, tmp: Path, clock: Clock) -> str:
    import trainer_core
    from bench.common import write_jsonl

    n_steps = o.steps + o.warmup
    per_step = 1 if case.method == "grpo" else o.batch_size
    train_file = write_jsonl(tmp / "train.jsonl", rows_for(case.method, n_steps * per_step, o))
    if o.compile_backend:
        os.environ["ALIGND_COMPILE_BACKEND"] = o.compile_backend
    spec = spec_for(case, o, train_file, n_steps)
    trainer_core.run(spec, _Sink(clock), _NoStore())  # type: ignore[arg-type]
    return json.dumps(spec.resources.model_dump(exclude_defaults=True))


def run_trl(case: Case, o: Options, tmp: Path, clock: Clock) -> str:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as transformers_logging

    from bench.common import lora_config, trl_common_args
    from bench.runs import trl_trainer
    from trainer_core.models import load_model, load_tokenizer
    from trainer_core.specs import AdapterSpec

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    n_steps = o.steps + o.warmup
    per_step = 1 if case.method == "grpo" else o.batch_size
    rows = rows_for(case.method, n_steps * per_step, o)
    spec = spec_for(case, o, tmp / "unused.jsonl", n_steps)

    class Marks(TrainerCallback):  # type: ignore[misc]
        # A step's log comes right after its end (logging_steps=1), with its num_tokens.
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "num_tokens" in logs and "loss" in logs:
                clock.mark(float(logs["num_tokens"]), logs.get("loss"))

    marks = Marks()

    common = trl_common_args(
        spec.hyperparameters,
        out_dir=tmp / "trl",
        seed=0,
        max_steps=n_steps,
        sequential=False,
        exact_optimizer=False,
    )
    liger = case.config == "best" and cuda and importlib.util.find_spec("liger_kernel") is not None
    common.update(
        bf16=o.precision == "bf16",
        fp16=o.precision == "fp16",
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        use_liger_kernel=liger,
    )
    note = f"liger={liger}"
    peft_config = None
    if case.adapter == "lora":
        task = "SEQ_CLS" if case.method == "reward_model" else "CAUSAL_LM"
        peft_config = lora_config(AdapterSpec(), task)
    tokenizer = load_tokenizer(o.model)
    if case.method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        def length(completions: list[Any], **kwargs: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [1 / (1 + abs(len(t) - 8) / 8) for t in texts]

        hp = spec.hyperparameters
        args = GRPOConfig(
            **{
                **common,
                "per_device_train_batch_size": o.generations,
                "learning_rate": hp.learning_rate,
            },
            num_generations=o.generations,
            max_completion_length=o.completion,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            epsilon=0.2,
            loss_type="dapo",
            scale_rewards="group",
        )
        trainer: Any = GRPOTrainer(
            model=load_model(o.model),
            reward_funcs=[length],
            args=args,
            train_dataset=Dataset.from_list(
                [{"prompt": row["messages"]} for row in rows]  # TRL's conversational prompts
            ),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[marks],
        )
    else:
        if case.config == "best" and case.method == "supervised":
            # TRL's padding-free SFT: best-fit-decreasing packing to max_length, positions
            # restarting per sequence (it refuses padding_free alone with a max_length).
            common["padding_free"] = True
            hp = spec.hyperparameters.model_copy(update={"packing": True})
            spec = spec.model_copy(update={"hyperparameters": hp})
        trainer = trl_trainer(spec, tokenizer, common, rows, peft_config, marks)
        note += f" padding_free={common.get('padding_free', False)}"
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return note


def run_case(case: Case, o: Options) -> Figures:
    import torch

    figures = Figures(case=asdict(case))
    clock = Clock()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-speed-"))
    with GpuSampler() as sampler:
        try:
            run = run_ours if case.trainer == "ours" else run_trl
            figures.note = run(case, o, tmp, clock)
        except Exception as exc:  # a run that fails is a row of the table, not the end
            figures.error = f"{type(exc).__name__}: {exc}"[:800]
            traceback.print_exc()
    shutil.rmtree(tmp, ignore_errors=True)
    figures.steps, figures.losses = len(clock.ends), clock.losses[:3] + clock.losses[-1:]
    window = clock.window(o.warmup)
    if window is not None:
        tokens_per_s, s_per_step, t0, t1 = window
        figures.tokens_per_s, figures.s_per_step = round(tokens_per_s, 1), round(s_per_step, 4)
        figures.gpu_util_pct = sampler.mean(t0, t1)
        figures.ok = not figures.error
    if torch.cuda.is_available():
        figures.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


# -- the parent: every case in its own process, then the table ---------------------------------------


def cases(methods: list[str]) -> list[Case]:
    out = []
    for method in methods:
        if method == "grpo":
            out += [Case(t, "grpo", "lora", "default") for t in ("ours", "trl")]
            continue
        for adapter in ("lora", "full"):
            out += [Case(t, method, adapter, "default") for t in ("ours", "trl")]
        out += [Case(t, method, "lora", "best") for t in ("ours", "trl")]
        if method == "supervised":
            out += [Case(t, method, "full", "best") for t in ("ours", "trl")]
    return out


def mfu(tokens_per_s: float | None, n_params: int, k: int, peak_tflops: float) -> str:
    if tokens_per_s is None:
        return "–"
    return f"{100 * k * n_params * tokens_per_s / (peak_tflops * 1e12):.1f}%"


def table(results: list[Figures], n_params: int, peak_tflops: float) -> str:
    lines = [
        "| run | ours tok/s | TRL tok/s | ours/TRL | MFU 6N ours / TRL | MFU 4N (LoRA) ours / TRL "
        "| peak GiB ours / TRL | GPU util % ours / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keyed = {
        (r.case["method"], r.case["adapter"], r.case["config"], r.case["trainer"]): r
        for r in results
    }
    seen: list[tuple[str, str, str]] = []
    for r in results:
        key = (r.case["method"], r.case["adapter"], r.case["config"])
        if key in seen:
            continue
        seen.append(key)
        ours, trl = keyed.get((*key, "ours")), keyed.get((*key, "trl"))

        def cell(f: Figures | None, value: Any) -> str:
            if f is None:
                return "–"
            if f.error:
                return "failed"
            return (
                "–" if value is None else f"{value:,}" if isinstance(value, float) else str(value)
            )

        a = ours.tokens_per_s if ours and ours.ok else None
        b = trl.tokens_per_s if trl and trl.ok else None
        ratio = f"{a / b:.2f}×" if a and b else "–"
        lora = key[1] == "lora"
        lines.append(
            f"| {' '.join(key)} | {cell(ours, a)} | {cell(trl, b)} | {ratio} "
            f"| {mfu(a, n_params, 6, peak_tflops)} / {mfu(b, n_params, 6, peak_tflops)} "
            f"| {(mfu(a, n_params, 4, peak_tflops) + ' / ' + mfu(b, n_params, 4, peak_tflops)) if lora else '–'} "
            f"| {cell(ours, ours.peak_gib if ours else None)} / {cell(trl, trl.peak_gib if trl else None)} "
            f"| {cell(ours, ours.gpu_util_pct if ours else None)} / {cell(trl, trl.gpu_util_pct if trl else None)} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_speed", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="gpu-speed-out", help="folder for results.jsonl and table.md")
    p.add_argument("--only", default=",".join(METHODS), help="methods, comma-separated")
    p.add_argument("--small", action="store_true", help="tiny model on the CPU: plumbing only")
    p.add_argument("--steps", type=int, default=None, help="timed steps (30; --small: 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (3; --small: 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--max-sentences", type=int, default=48, help="~480 tokens a row on average")
    p.add_argument("--budget", type=int, default=16384, help="ours best: max_tokens_per_batch")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion", type=int, default=64, help="GRPO completion tokens")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    p.add_argument("--case", help=argparse.SUPPRESS)  # a child: one Case as JSON
    p.add_argument("--options", help=argparse.SUPPRESS)  # a child: the Options as JSON
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.case:  # a child process: one run, one JSON line
        figures = run_case(Case(**json.loads(args.case)), Options(**json.loads(args.options)))
        print("RESULT " + json.dumps(asdict(figures)), flush=True)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    n_params = build_model(model_dir, small=args.small)
    options = Options(
        model=str(model_dir.resolve()),
        precision="bf16" if cuda else "fp32",
        steps=args.steps or (2 if args.small else 30),
        warmup=args.warmup or (1 if args.small else 3),
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        max_sentences=4 if args.small else args.max_sentences,
        budget=2048 if args.small else args.budget,
        generations=args.generations,
        completion=8 if args.small else args.completion,
        compile_backend="aot_eager" if args.small else None,
    )
    print(f"model: {n_params:,} parameters in {model_dir}; {options}", flush=True)
    results: list[Figures] = []
    with (out / "results.jsonl").open("w") as log:
        for case in cases([m for m in args.only.split(",") if m]):
            t0 = now()
            command = [
                sys.executable, "-m", "bench.gpu_speed",
                "--case", json.dumps(asdict(case)), "--options", json.dumps(asdict(options)),
            ]  # fmt: skip
            try:
                child = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout
                )
                lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
                if lines:
                    figures = Figures(**json.loads(lines[-1].removeprefix("RESULT ")))
                else:
                    figures = Figures(case=asdict(case), error=child.stderr[-800:])
            except subprocess.TimeoutExpired:
                figures = Figures(case=asdict(case), error=f"timed out after {args.timeout}s")
            results.append(figures)
            log.write(json.dumps(asdict(figures)) + "\n")
            log.flush()
            state = (
                f"{figures.tokens_per_s} tok/s" if figures.ok else f"FAILED {figures.error[-300:]}"
            )
            print(f"{case.name}: {state} ({now() - t0:.0f}s)", flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    rendered = table(results, n_params, args.peak_tflops)
    (out / "table.md").write_text(rendered + "\n")
    print(rendered)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
