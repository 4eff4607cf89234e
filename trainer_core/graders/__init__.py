"""Reward functions ("graders"): data that scores completions, never code from the request.

A reward function is a JSON object with a ``type``. OpenAI's grader types:

- ``string_check`` (``eq``, ``ne``, ``like`` = substring, ``ilike`` = case-insensitive substring)
- ``text_similarity`` (``fuzzy_match``, ``bleu``, ``gleu``, ``rouge_1``..``rouge_5``, ``rouge_l``;
  ``cosine`` and ``meteor`` need an embedding model or WordNet and are refused)
- ``score_model`` (its ``model`` must be a reward model trained here: ``ft:...``)
- ``multi`` (sub-graders combined by a ``calculate_output`` formula)

and ours: ``regex``, ``json_valid``, ``json_schema``, ``length``, ``answer_match``,
``reward_model`` and ``http``. OpenAI's ``python`` and ``label_model`` are refused. Every
definition (which BLEU, which fuzzy ratio, ...) is in docs/methods.md, "Reward functions".

Templates: ``{{item.X}}`` (a dataset column; ``X.Y`` and list indexes ``X.0`` reach inside),
``{{sample.output_text}}`` (the completion) and ``{{sample.output_json}}`` /
``{{sample.output_json.X}}`` (the completion parsed as JSON; empty when it is not JSON).

This package imports nothing but the standard library: the API validates and runs graders
with it, and the training methods score with ``score``. Its modules, in the order a grader
meets them:

- ``fields``: ``GraderError`` and the checks of one field (a choice, a number, a name).
- ``templates``: ``{{...}}`` variables, compiled and rendered against one sample.
- ``definitions``: each grader type's fields, checked and defaulted (``normalize_grader``).
- ``validation``: lists of reward functions, their names and weights, what they reach.
- ``formula``: ``multi``'s ``calculate_output`` arithmetic.
- ``schema``: the JSON Schema subset of ``json_schema``.
- ``similarity``: ``text_similarity``'s metrics (fuzzy ratio, BLEU, GLEU, ROUGE).
- ``answers``: ``answer_match``'s extraction and comparison.
- ``running``: what runs outside this interpreter: regexes in a child, http endpoints,
  trained reward models.
- ``scoring``: ``score`` and ``run_grader``, which put the rest together.
"""

from trainer_core.graders.answers import answers_equal
from trainer_core.graders.definitions import OPENAI_TYPES, OUR_TYPES, normalize_grader
from trainer_core.graders.fields import GraderError
from trainer_core.graders.running import RewardModelFn
from trainer_core.graders.schema import schema_matches
from trainer_core.graders.scoring import Scores, run_grader, score
from trainer_core.graders.similarity import (
    SIMILARITY_METRICS,
    bleu_score,
    fuzzy_ratio,
    gleu_score,
    rouge_l_score,
    rouge_n_score,
    tokenize_13a,
    tokenize_rouge,
)
from trainer_core.graders.validation import (
    grader_to_reward_functions,
    reward_model_names,
    uses_reward_model,
    validate_reward_functions,
)

__all__ = [
    "OPENAI_TYPES",
    "OUR_TYPES",
    "SIMILARITY_METRICS",
    "GraderError",
    "RewardModelFn",
    "Scores",
    "answers_equal",
    "bleu_score",
    "fuzzy_ratio",
    "gleu_score",
    "grader_to_reward_functions",
    "normalize_grader",
    "reward_model_names",
    "rouge_l_score",
    "rouge_n_score",
    "run_grader",
    "schema_matches",
    "score",
    "tokenize_13a",
    "tokenize_rouge",
    "uses_reward_model",
    "validate_reward_functions",
]
