"""``text_similarity``'s metrics, each equal to the reference implementation it names:
fuzzy ratio (rapidfuzz), BLEU (sacreBLEU), GLEU (nltk) and ROUGE-N/L (rouge_score).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

from trainer_core.graders.fields import GraderError

# text_similarity is quadratic in the worst case (fuzzy_match, rouge_l): longer texts are refused.
MAX_SIMILARITY_CHARS = 100_000

SIMILARITY_METRICS = (
    "fuzzy_match",
    "bleu",
    "gleu",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(a)) big-int
    operations on len(b)-bit words."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def fuzzy_ratio(a: str, b: str) -> float:
    """Normalised InDel similarity, ``2·LCS(a, b) / (len(a) + len(b))`` over characters,
    case-sensitive: what rapidfuzz's ``fuzz.ratio`` computes (÷100). Two empty strings: 1."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


# sacreBLEU's "13a" tokenizer (mteval-v13a.pl), the default of sacrebleu.sentence_bleu.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def tokenize_13a(text: str) -> list[str]:
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (
            line.replace("&quot;", '"')
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
        )
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_score(hypothesis: str, reference: str) -> float:
    """Sentence BLEU in [0, 1], exactly sacrebleu's ``sentence_bleu(h, [r]).score / 100``:
    13a tokens, case-sensitive, n-grams up to 4, "exp" smoothing (the k-th n-gram order with
    no match counts 1 / (2^k · total)), effective order (orders the hypothesis is too short for
    are left out) and the brevity penalty exp(1 − r/h) when h < r."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    if not hyp:
        return 0.0
    log_sum, order, smooth = 0.0, 0, 1.0
    for n in range(1, 5):
        total = len(hyp) - n + 1
        if total <= 0:
            break
        order = n
        correct = sum((_ngrams(hyp, n) & _ngrams(ref, n)).values())
        if correct == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * total))
        else:
            log_sum += math.log(correct / total)
    penalty = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return penalty * math.exp(log_sum / order)


def gleu_score(hypothesis: str, reference: str) -> float:
    """Google-BLEU (Wu et al. 2016), as nltk's ``sentence_gleu`` (1- to 4-grams) on 13a
    tokens: matching n-grams ÷ max(hypothesis n-grams, reference n-grams), i.e.
    min(precision, recall) over all orders together."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    matches = hyp_total = ref_total = 0
    for n in range(1, 5):
        hyp_n, ref_n = _ngrams(hyp, n), _ngrams(ref, n)
        matches += sum((hyp_n & ref_n).values())
        hyp_total += max(0, len(hyp) - n + 1)
        ref_total += max(0, len(ref) - n + 1)
    most = max(hyp_total, ref_total)
    return matches / most if most else 0.0


_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize_rouge(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, ASCII letters and digits only, no stemming."""
    return [t for t in _ROUGE_NON_ALNUM.sub(" ", text.lower()).split() if t]


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / max(hyp_count, 1)
    recall = overlap / max(ref_count, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n_score(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1, as Google's rouge_score ``RougeScorer(["rougeN"])`` computes ``fmeasure``."""
    hyp_n = _ngrams(tokenize_rouge(hypothesis), n)
    ref_n = _ngrams(tokenize_rouge(reference), n)
    overlap = sum((hyp_n & ref_n).values())
    return _f1(overlap, sum(hyp_n.values()), sum(ref_n.values()))


def rouge_l_score(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (token LCS), as rouge_score's ``rougeL`` ``fmeasure``."""
    hyp, ref = tokenize_rouge(hypothesis), tokenize_rouge(reference)
    if not hyp or not ref:
        return 0.0
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


def text_similarity(metric: str, hypothesis: str, reference: str, param: str) -> float:
    for what, text in (("input", hypothesis), ("reference", reference)):
        if len(text) > MAX_SIMILARITY_CHARS:
            raise GraderError(
                f"{param}.{what}",
                f"text_similarity {what} has {len(text)} characters; the limit is "
                f"{MAX_SIMILARITY_CHARS}.",
            )
    if metric == "fuzzy_match":
        return fuzzy_ratio(hypothesis, reference)
    if metric == "bleu":
        return bleu_score(hypothesis, reference)
    if metric == "gleu":
        return gleu_score(hypothesis, reference)
    if metric == "rouge_l":
        return rouge_l_score(hypothesis, reference)
    return rouge_n_score(hypothesis, reference, int(metric.removeprefix("rouge_")))
