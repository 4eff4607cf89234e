"""Tiny Llama-style models built offline, for tests, the demo and benchmarks.

``create_tiny_model`` writes a Hugging Face folder (config, safetensors weights, tokenizer with
a ChatML chat template) that loads with ``AutoModelForCausalLM``/``AutoTokenizer`` and nothing
else: no network, no hub. The weights are random; the tokenizer is a byte-level BPE trained
here on a small generated English corpus, so any UTF-8 text tokenizes.

Deterministic: the same size and seed give byte-identical files. The tokenizer depends on the
size only (its corpus is fixed), so models of one size but different seeds share a vocabulary.

Decisions:
- ``tie_word_embeddings=False`` (the Llama default): the output head is its own ``nn.Linear``,
  so LoRA's "all-linear" (which skips the head) and full fine-tuning save and reload plainly.
- The chat template puts the newline between turns *before* ``<|im_start|>`` rather than
  after ``<|im_end|>``, so an assistant turn ends with its end-of-turn token and the trained
  span of a turn is exactly "content<|im_end|>" (real ChatML templates also train the "\\n").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML. Content may be a string or a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}{% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages %}{{ '\\n' }}{% endif -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class TinySize:
    vocab_size: int  # target for the BPE trainer; the model matches what it reaches
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


SIZES: dict[str, TinySize] = {
    # ~0.3M parameters: a few training steps take milliseconds.
    "tiny": TinySize(512, 96, 256, 2, 4, 2, 512),
    # ~1M parameters.
    "1m": TinySize(1024, 128, 352, 4, 4, 2, 1024),
    # ~30M parameters, for benchmarks.
    "30m": TinySize(1024, 512, 1408, 10, 8, 4, 2048),
}

_SUBJECTS = [
    "the cat", "a small dog", "my friend", "the teacher", "our team", "the old man",
    "a young girl", "the robot", "this model", "the river", "a bird", "the farmer",
    "the city", "your sister", "the doctor", "a student", "the market", "the engineer",
]  # fmt: skip
_VERBS = [
    "sees", "likes", "reads", "builds", "finds", "helps", "paints", "follows", "answers",
    "writes", "moves", "opens", "counts", "carries", "watches", "learns", "sells", "fixes",
]  # fmt: skip
_OBJECTS = [
    "a red apple", "the long road", "three green boxes", "a quiet song", "the blue door",
    "some fresh bread", "a simple question", "the bright window", "an old book", "the map",
    "a warm coat", "the garden", "two tall trees", "the small boat", "a clear answer",
]  # fmt: skip
_ENDINGS = [
    "in the morning", "after lunch", "every day", "near the lake", "with great care",
    "at night", "before the rain", "on Monday", "without a word", "for the first time",
]  # fmt: skip
_QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "Can you help me write a poem?", "Why is the sky blue?", "What time is it?",
    "Please summarize this text.", "Translate hello into Spanish.", "What is 2 + 2?",
]  # fmt: skip
_ANSWERS = [
    "The capital of France is Paris.", "A spider has 8 legs.", "Sure, here is a short poem.",
    "Sunlight scatters in the air, and blue light scatters most.", "I do not have a clock.",
    "Here is a short summary.", "Hello in Spanish is hola.", "2 + 2 = 4.",
]  # fmt: skip


def _corpus(n_lines: int) -> list[str]:
    """A fixed English-like corpus: generated sentences, numbers, and chat-shaped text."""
    rng = random.Random(0)
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            line = (
                f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                f"{rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
            )
        elif kind == 1:
            q = rng.randrange(len(_QUESTIONS))
            line = f"system\nYou are a helpful assistant.\nuser\n{_QUESTIONS[q]}\nassistant\n{_ANSWERS[q]}"
        elif kind == 2:
            a, b = rng.randrange(100), rng.randrange(100)
            line = f"{a} plus {b} is {a + b}; {a} times {b} is {a * b}. (Yes!) [ok] {{done}}"
        else:
            line = f"Q: {rng.choice(_QUESTIONS)} A: {rng.choice(_ANSWERS)} -- id_{i} \"quoted\" 'x'"
        lines.append(line)
    return lines


def _train_tokenizer(shape: TinySize) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(4000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=shape.max_position_embeddings,
    )


def create_tiny_model(dest: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised Llama-style model and its tokenizer into ``dest``.

    Needs no network. Returns ``dest``. Raises ValueError for an unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    tokenizer = _train_tokenizer(shape)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private RNG stream so building a model does not disturb the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
