"""Text metrics as plain functions (offline; no `evaluate.load` from the Hub)."""

from __future__ import annotations

import math
import random

from sacrebleu.metrics import BLEU


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over the whole set (0 if none).

    Words are lower-cased whitespace tokens.

    >>> distinct_n(["a b a b"], 1), distinct_n(["a b a b"], 2)
    (0.5, 0.6666666666666666)
    """
    grams = [g for t in texts for g in _ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: list[str], max_texts: int = 200, seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): mean BLEU-4 of each text against all the others, in [0, 1].

    Higher means less diverse. Uses sacrebleu's sentence BLEU with exponential smoothing (offline).
    At most `max_texts` texts (a fixed random subset) are used, since the cost is quadratic.
    Returns 0.0 for fewer than two non-empty texts.
    """
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return 0.0
    if len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores) / 100.0


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of tokens); nan if there are no tokens.

    >>> round(perplexity(2 * math.log(4.0), 2), 6)
    4.0
    """
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (nan, nan for an empty list)."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
