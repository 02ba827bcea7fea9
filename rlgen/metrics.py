"""Text metrics as plain functions, offline: sacrebleu for BLEU, Google's rouge-score for ROUGE-L; and
`sample_metrics`, the evaluator's per-sample means and text metrics of a list of scored samples.

(The `evaluate` package is not used: its metrics are scripts fetched from the Hugging Face Hub at `load` time,
which fails offline.)
"""

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


def bleu(completions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002; sacrebleu's 13a tokenisation) of completions against one reference
    each, in [0, 1].

    By hand: "a b c d e" against "a b c d f" matches 4/5 unigrams, 3/4 bigrams, 2/3 trigrams and 1/2 4-grams
    at equal length (brevity penalty 1), so BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25:

    >>> round(bleu(["a b c d e"], ["a b c d f"]), 6), round(0.2 ** 0.25, 6)
    (0.66874, 0.66874)
    >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 6)
    1.0
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    return BLEU().corpus_score(completions, [references]).score / 100.0


def rouge_l(completions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (Lin 2004: longest common subsequence of words) of each completion against its
    reference, in [0, 1].

    By hand: "the cat sat on the mat" and "the cat is on the mat" share the subsequence "the cat on the mat",
    5 of 6 words on each side, so precision = recall = F = 5/6; "a b c d e" against "a b c d f": 4/5.

    >>> round(rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]), 6), round(5 / 6, 6)
    (0.833333, 0.833333)
    >>> round(rouge_l(["the cat sat on the mat", "a b c d e"], ["the cat is on the mat", "a b c d f"]), 6)
    0.816667
    """
    from rouge_score import rouge_scorer

    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(completions, references)]
    return sum(scores) / len(scores) if scores else float("nan")


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of tokens); nan if there are no tokens.

    >>> round(perplexity(2 * math.log(4.0), 2), 6)
    4.0
    """
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def standard_error(values: list[float]) -> float:
    """Standard error of the mean, sample std / sqrt(n) (nan for fewer than two values).

    >>> standard_error([1.0, 3.0])
    1.0
    """
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of after[i] - before[i] and its standard error over the pairs (same prompts scored twice): prompt
    effects cancel, so the error is smaller than that of two independent means when the pairs correlate.

    >>> mean, se = paired_difference([1.0, 2.0, 3.0], [2.0, 2.0, 5.0])  # differences 1, 0, 2
    >>> mean, round(se, 6)  # sqrt(1 / 3)
    (1.0, 0.57735)
    """
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} values before, {len(after)} after")
    diffs = [b - a for a, b in zip(before, after)]
    return sum(diffs) / len(diffs), standard_error(diffs)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (nan, nan for an empty list)."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def sample_metrics(samples: list[dict], references: list[str] | None = None,
                   self_bleu_max_texts: int = 200) -> dict[str, float]:
    """The `eval/*` metrics of scored samples that need nothing but the samples (`rlgen.evaluation`'s keys, all
    but those that need the model: `eval/perplexity_ref` and `time/eval`; `eval/reference_nll` when every
    sample has its `reference_nll`).

    samples: one dict per completion, as `evaluate_policy` writes them: `completion` (text), `reward` (the
    weighted proxy), `rewards` ({fn or `gold/<fn>`: value or None}), `kl` (nats), `length` (tokens, EOS
    included), `eos` (bool). references: one reference reply per sample, for `eval/bleu` and `eval/rouge_l`.
    Means, population stds and standard errors are over samples; a None reward value is left out.

    >>> m = sample_metrics([{"completion": "a b", "reward": 1.0, "rewards": {"f": 1.0, "gold/g": None},
    ...                      "kl": 0.5, "length": 3, "eos": True},
    ...                     {"completion": "a c", "reward": 3.0, "rewards": {"f": 3.0, "gold/g": 2.0},
    ...                      "kl": 1.5, "length": 5, "eos": False}])
    >>> m["eval/reward/mean"], m["eval/reward/se"], m["eval/rewards/f/std"], m["eval/gold/g/mean"]
    (2.0, 1.0, 1.0, 2.0)
    >>> m["eval/kl"], m["eval/mean_length"], m["eval/eos_fraction"], m["eval/eos_fraction_se"], m["eval/distinct_1"]
    (1.0, 4.0, 0.5, 0.5, 0.75)
    """
    completions = [s["completion"] for s in samples]
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for s in samples for k in s["rewards"]):
        values = [s["rewards"].get(name) for s in samples]
        values = [v for v in values if v is not None]
        key = f"eval/{name}" if name.startswith("gold/") else f"eval/rewards/{name}"
        out[f"{key}/mean"], out[f"{key}/std"] = mean_std(values)
        out[f"{key}/se"] = standard_error(values)
    totals, kls, lengths = ([s[k] for s in samples] for k in ("reward", "kl", "length"))
    out["eval/reward/mean"], out["eval/reward/se"] = mean_std(totals)[0], standard_error(totals)
    out["eval/kl"], out["eval/kl_se"] = mean_std(kls)[0], standard_error(kls)
    out["eval/mean_length"], out["eval/mean_length_se"] = mean_std(lengths)[0], standard_error(lengths)
    eos = [float(s["eos"]) for s in samples]
    out["eval/eos_fraction"], out["eval/eos_fraction_se"] = mean_std(eos)[0], standard_error(eos)
    out["eval/distinct_1"] = distinct_n(completions, 1)
    out["eval/distinct_2"] = distinct_n(completions, 2)
    out["eval/self_bleu"] = self_bleu(completions, max_texts=self_bleu_max_texts)
    if references is not None:
        out["eval/bleu"] = bleu(completions, references)
        out["eval/rouge_l"] = rouge_l(completions, references)
    if samples and all("reference_nll" in s for s in samples):
        nll = [s["reference_nll"] for s in samples]
        out["eval/reference_nll"], out["eval/reference_nll_se"] = mean_std(nll)[0], standard_error(nll)
    out["eval/num_samples"] = len(samples)
    return out
