"""Sampling completions from the policy: the rollout of the online methods (GRPO, RLOO, PPO).

``generate`` is a plain sampling loop over a KV cache, not ``model.generate``:

- Each distinct prompt is encoded once. The prompts are left-padded and run through the model
  in one forward; the cache is then repeated ``num_generations`` times along the batch
  (``Cache.batch_repeat_interleave``), so a group of G samples shares one prefill instead of G
  (``generate(num_return_sequences=G)`` would prefill G copies of every prompt).
- Sampling is HF's: logits / temperature, then top-k, then top-p (the same order and the same
  "keep at least one token" rule as ``TopKLogitsWarper`` / ``TopPLogitsWarper``), then one
  ``torch.multinomial`` draw per row from ``generator`` (written out as torch computes one
  sample on the CPU, the argmax of p / q with q ~ Exp(1), so that a rank of a sharded
  rollout can keep its own rows' noise: ``RolloutShard``). Same generator state, same model
  → the same completions on CPU.
- Positions follow the attention mask (``cumsum - 1``), as ``model.generate`` does with left
  padding, so a padded prompt sees the positions it would have alone.
- Under LoRA the sampler runs on merged weights W + ΔW swapped in for the duration
  (``merged_lora``): one matmul per adapted layer instead of three; the parameters' values
  are never written, so the base stays bit-identical.
  The log-probs the loss uses are computed unmerged (``rollout_logps``); the two differ by
  float rounding only.
- A row stops at its first EOS (any of the model's and the tokenizer's EOS ids); what follows
  is ``pad_token_id`` with ``completion_mask`` 0. The loop ends when every row has stopped or
  after ``max_completion_length`` tokens.

Deliberately left out: beam search, repetition penalties, min-p, stop strings, and dropping
finished rows from the batch (the cache would have to be re-indexed every step; on the short
completions this runs on that costs more than it saves).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from trainer_core.logprobs import next_token_logps
from trainer_core.vocab_chunks import CausalLmParts, causal_lm_parts


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded (pad after EOS)
    completion_mask: torch.Tensor  # (N, C) 1 = a real completion token, up to and including EOS
    is_eos: torch.Tensor  # (N,) bool: ended with EOS (else it hit max_completion_length)
    texts: list[str]  # decoded completions, special tokens skipped

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, P + C): prompt and completion side by side."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, P + C): 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout of ``rows`` only (a micro-batch), its padding columns trimmed."""
        prompt_mask, completion_mask = self.prompt_mask[rows], self.completion_mask[rows]
        p = int(prompt_mask.sum(-1).max())  # longest prompt of these rows
        c = max(1, int(completion_mask.sum(-1).max()))  # longest completion
        return Rollout(
            self.prompt_ids[rows][:, -p:],
            prompt_mask[:, -p:],
            self.completion_ids[rows][:, :c],
            completion_mask[:, :c],
            self.is_eos[rows],
            [self.texts[i] for i in rows.tolist()],
        )

    def micro_batches(self, parts: int) -> tuple[list[torch.Tensor], list[Rollout]]:
        """The rows split, in order, into at most ``parts`` micro-batches (fewer when there
        are fewer rows): each one's row indices, and its rollout (``select``)."""
        n_rows = self.completion_ids.size(0)
        split = torch.arange(n_rows).tensor_split(min(n_rows, parts))
        chunks = [rows for rows in split if rows.numel()]
        return chunks, [self.select(rows) for rows in chunks]


@dataclass(frozen=True)
class RolloutShard:
    """This rank's part of a rollout sampled by several ranks (each its own prompts).

    The N = B·G rows of the whole rollout are numbered prompt-major; ``rows`` are this rank's
    (its prompts' G rows each, in order). Every rank draws the sampling noise of all N rows
    from the same seeded RNG and keeps its own rows', so a row samples the tokens it would
    in one process. The ranks decode in step: a rank whose rows have all ended goes on
    (padding) while any rank's have not (``any_running``, a collective each step), so every
    rank draws the noise one process draws, and runs as many forwards as the others (ZeRO-3
    gathers each layer's weights in its forward, a collective every rank must join)."""

    rows: torch.Tensor  # (n,) long: this rank's rows among the whole rollout's
    total: int  # N, rows of the whole rollout
    any_running: Callable[[bool], bool]  # rows of this rank still running -> of any rank


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's EOS (often a list, e.g. a chat
    model's end-of-turn and end-of-text) and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for token in value if isinstance(value, list | tuple) else [value]:
            if int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("the model and the tokenizer name no EOS token")
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both (B, L): sequences right-aligned, padding on the left."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each token's position counted over real tokens only (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    shard: RolloutShard | None = None,
) -> torch.Tensor:
    """(B,) one token per row from ``logits`` (B, V), warped as HF's sampling does; under a
    ``shard``, the B rows are its rows of the whole rollout's."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    # torch.multinomial's own draw for one sample, written out (argmax of p / q, q ~ Exp(1);
    # the same numbers from the same generator on CPU) so that a rank of a sharded rollout
    # can draw the noise of every row and keep its own (``RolloutShard``).
    total = probs.size(0) if shard is None else shard.total
    noise = torch.empty((total, probs.size(-1)), dtype=probs.dtype, device=probs.device)
    noise.exponential_(1, generator=generator)  # (N_total, V)
    if shard is not None:
        noise = noise[shard.rows.to(probs.device)]  # (B, V)
    return (probs / noise).argmax(-1)  # (B,)


def _prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """One cached forward over left-padded prompts (B, P); logits of the last position only
    where the model takes ``logits_to_keep``. Returns the model's output (its cache in
    ``past_key_values``)."""
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=True,
        **keep,
    )


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    get_base = getattr(model, "get_base_model", None)  # a peft model forwards **kwargs
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None = None,
    shard: RolloutShard | None = None,
    merge_lora: bool = True,
) -> Rollout:
    """Sample ``num_generations`` completions of every prompt (see the module docstring).

    Rows are prompt-major: prompt i's completions are rows ``i*G .. i*G+G-1``. The model is
    put in eval mode for the rollout and given back in the mode it came in (gradient
    checkpointing, a training-mode feature, is then off and the KV cache works). ``shard``:
    these prompts are one rank's of a rollout sampled by several (``RolloutShard``).
    ``merge_lora=False`` samples through peft's unmerged adapter layers (to compare with).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if num_generations < 1 or max_completion_length < 1 or temperature <= 0:
        raise ValueError("num_generations, max_completion_length and temperature must be > 0")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = torch.tensor(eos_token_ids(model, tokenizer))
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) if merge_lora else nullcontext(model) as sampler:
            return _sample(
                sampler,
                tokenizer,
                prompts,
                pad_id=pad_id,
                eos=eos,
                num_generations=num_generations,
                max_completion_length=max_completion_length,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                generator=generator,
                shard=shard,
            )
    finally:
        model.train(was_training)


class Sampling(Protocol):
    """How a job samples its completions (the online methods' hyperparameters)."""

    @property
    def max_completion_length(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...


def sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    num_generations: int,
    shard: RolloutShard | None = None,
) -> Rollout:
    """``generate`` with a job's ``sampling`` settings: N = B·G rows, prompt-major."""
    return generate(
        model,
        tokenizer,
        prompts,
        num_generations=num_generations,
        max_completion_length=sampling.max_completion_length,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        shard=shard,
    )


def _sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos: torch.Tensor,
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    shard: RolloutShard | None,
) -> Rollout:
    """``generate``'s loop."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)  # (B, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    out = _prefill(model, prompt_ids, prompt_mask)
    # One prefill per prompt, then G copies of its cache: (B, ...) -> (N = B*G, ...).
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)
    next_logits = out.logits[:, -1].repeat_interleave(num_generations, dim=0)  # (N, V)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)  # (N, P)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)  # (N, P)

    n = prompt_ids.size(0)
    eos = eos.to(device)
    attention_mask = prompt_mask
    positions = prompt_mask.sum(-1, keepdim=True) - 1  # (N, 1): last real position
    done = torch.zeros(n, dtype=torch.bool, device=device)
    is_eos = torch.zeros(n, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for step in range(max_completion_length):
        token = sample_next(
            next_logits,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
            shard=shard,
        ).to(device)  # (N,)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        masks.append((~done).long())
        hit = torch.isin(token, eos) & ~done
        is_eos |= hit
        done |= hit
        finished = bool(done.all())
        if shard is not None:
            finished = not shard.any_running(not finished)
        if finished or step == max_completion_length - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
        positions = positions + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_logits = out.logits[:, -1]  # (N, V)

    completion_ids = torch.stack(tokens, dim=1)  # (N, C)
    completion_mask = torch.stack(masks, dim=1)  # (N, C)
    texts = tokenizer.batch_decode(
        [
            ids[mask.bool()].tolist()
            for ids, mask in zip(completion_ids, completion_mask, strict=True)
        ],
        skip_special_tokens=True,
    )
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, is_eos, texts)


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """The model to sample with: under LoRA, for the duration, every adapted layer computes
    with W + ΔW as its weight and peft's adapters are off; otherwise the model as it is.

    Sampling is bound by the number of ops per decode step on small models, and a LoRA layer
    runs three matmuls and peft's bookkeeping where a merged one runs one. The merged weights
    are new tensors, swapped in for the base layers' parameter objects and swapped back
    after (the parameters' values are never written, so the base stays bit-identical).
    Anything but plain LoRA linear layers (other peft tuners, LoRA on embeddings), or a model
    sharded by ZeRO-3, falls back to the model as it is.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    disable = getattr(model, "disable_adapter", None)
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    layers = [m for m in lora if isinstance(m, LoraLinear) and not m.merged]
    # Under ZeRO-3 a parameter holds only its rank's partition between forwards (DeepSpeed
    # marks it with ``ds_id``): there is no whole weight to merge into.
    sharded = any(hasattr(p, "ds_id") for p in model.parameters())
    if disable is None or not layers or len(layers) != len(lora) or sharded:
        yield model
        return
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                weight = base.weight
                assert isinstance(weight, nn.Parameter)
                merged = weight.detach().clone()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged += layer.get_delta_weight(adapter)  # type: ignore[operator]
                swapped.append((base, weight))
                base._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
        with disable():
            yield model
    finally:
        for base, weight in swapped:
            base._parameters["weight"] = weight


def rollout_logps(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    with_entropy: bool = False,
    share_prompts: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(per_token_logps (N, C), entropies (N, C) | None)`` of the rollout's completion tokens.

    The log-probs are those of the distribution the tokens were sampled from: logits /
    temperature (TRL does the same), positions as in ``generate``. Grad flows unless the
    caller is under ``no_grad``; ``entropies`` (for the metric) never carry grad.

    Shared prompts are run once, as in ``generate``: the distinct prompts go through the
    model first, their KV cache is gathered to one row per completion, and the completions
    run on top of it. The logits are those of running every row whole (causal attention
    makes a prompt's keys and values independent of what follows), gradients flow into the
    prompt's keys and values through the gather, and the G − 1 copies of every prompt cost
    nothing, forward or backward. Only completion positions reach the LM head, which runs
    chunked over the vocabulary where the model allows (``vocab_chunks``): the (N, C, V)
    logits are never held at once. Under gradient checkpointing (in training mode)
    transformers drops the KV cache, so rows run whole.

    ``share_prompts``: take the shared-prompt path even when no prompt repeats (True), for
    ranks that must all build the same graph (ZeRO); by default, when some prompt repeats.
    """
    prompt_rows = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # (N, 2P)
    unique, inverse = torch.unique(prompt_rows, dim=0, return_inverse=True)  # (U, 2P), (N,)
    if share_prompts is None:
        share_prompts = unique.size(0) < prompt_rows.size(0)
    whole_rows = not share_prompts or checkpointing(model)
    shared = None if whole_rows else (unique, inverse)
    parts = causal_lm_parts(model)
    if parts is not None:
        # The states that predict the completion tokens (the last one predicts nothing).
        hidden = _completion_positions(parts.decoder, rollout, shared, _last_hidden_state)
        hidden = hidden[:, :-1]  # (N, C, H)
        n, c = rollout.completion_ids.shape
        scored = parts.token_logps(
            hidden.reshape(n * c, -1),
            rollout.completion_ids.reshape(-1),
            temperature=temperature,
            with_entropy=with_entropy,
        )
        entropy = scored.entropy.view(n, c) if scored.entropy is not None else None
        return scored.logps.view(n, c), entropy
    logits = _completion_positions(
        model, rollout, shared, _logits, keep=_accepts_logits_to_keep(model)
    )  # (N, C + 1, V)
    # Position j of ``logits`` predicts completion token j (j = 0 from the prompt's end).
    logits = logits / temperature
    ids = torch.cat([rollout.prompt_ids[:, -1:], rollout.completion_ids], dim=1)  # (N, C + 1)
    per_token_logps = next_token_logps(logits, ids)  # (N, C)
    entropies = None
    if with_entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, C, V)
            entropies = -(logp.exp() * logp).sum(-1)  # (N, C)
    return per_token_logps, entropies


def checkpointing(model: nn.Module) -> bool:
    """Whether a forward of ``model`` now recomputes its layers in backward (transformers'
    gradient checkpointing, which applies in training mode only and drops any KV cache)."""
    return model.training and any(
        getattr(module, "gradient_checkpointing", False) is True for module in model.modules()
    )


def _whole_rows_hidden(parts: CausalLmParts, rollout: Rollout) -> torch.Tensor:
    """(N, C, H): the final hidden states of the positions that predict the completion
    tokens (the last prompt position and every completion one but the last)."""
    return _completion_positions(parts.decoder, rollout, None, _last_hidden_state)[:, :-1]


def _last_hidden_state(output: Any) -> torch.Tensor:
    hidden: torch.Tensor = output.last_hidden_state
    return hidden


def _logits(output: Any) -> torch.Tensor:
    logits: torch.Tensor = output.logits
    return logits


def _completion_positions(
    forward: nn.Module,
    rollout: Rollout,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
    read: Callable[[Any], torch.Tensor],
    *,
    keep: bool = False,
) -> torch.Tensor:
    """(N, C + 1, ·): ``read`` of ``forward``'s output (a causal LM's logits, or a decoder's
    last hidden state) at the last prompt position and at every completion one.

    ``shared`` None: every row runs whole. ``shared`` = ``(unique, inverse)``, the U distinct
    prompt rows and each row's index among them: each distinct prompt runs once, its KV
    cache is gathered to one row per completion, and the completions run on top of it.
    ``keep``: ``forward`` takes ``logits_to_keep``, so that only the positions read reach
    the LM head.
    """
    attention_mask = rollout.attention_mask  # (N, P + C)
    c = rollout.completion_ids.size(1)
    if shared is None:
        output = forward(
            input_ids=rollout.input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
            **({"logits_to_keep": c + 1} if keep else {}),
        )
        return read(output)[:, -(c + 1) :]
    unique, inverse = shared
    p = rollout.prompt_ids.size(1)
    unique_ids, unique_mask = unique[:, :p], unique[:, p:]  # (U, P) each
    prefill = forward(
        input_ids=unique_ids,
        attention_mask=unique_mask,
        position_ids=position_ids(unique_mask),
        use_cache=True,
        **({"logits_to_keep": 1} if keep else {}),
    )
    cache = prefill.past_key_values
    cache.batch_select_indices(inverse)  # (U, ...) -> (N, ...), differentiable
    last_prompt = read(prefill)[:, -1:][inverse]  # (N, 1, ·)
    completion = read(
        forward(
            input_ids=rollout.completion_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask)[:, p:],
            past_key_values=cache,
            use_cache=True,
        )
    )  # (N, C, ·)
    return torch.cat([last_prompt, completion], dim=1)
