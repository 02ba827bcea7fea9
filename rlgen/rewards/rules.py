"""Built-in rule-based rewards: ``f(prompts, completions, **kwargs) -> list[float]``.

Each scores the completion only (a conversational completion, one assistant message as TRL passes it, by its
content); extra keyword arguments (TRL passes dataset columns and more) are ignored.
Bad arguments raise UserError naming the reward, even for empty batches, so ``load_reward`` can check them early.
"""

import re
from functools import lru_cache

from rlgen.errors import UserError


def _texts(completions):
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


@lru_cache(maxsize=1)
def _analyzer():
    """The VADER analyzer, built once on first use."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_positive(prompts, completions, **kwargs):
    """VADER compound score of each completion, in [-1, 1].

    >>> [round(r, 4) for r in sentiment_positive(["", ""], ["I love this, it is wonderful!", "It is a chair."])]
    [0.8478, 0.0]
    """
    analyzer = _analyzer()
    return [analyzer.polarity_scores(c)["compound"] for c in _texts(completions)]


def sentiment_negative(prompts, completions, **kwargs):
    """Minus the VADER compound score of each completion, in [-1, 1].

    >>> [round(r, 4) for r in sentiment_negative([""], ["This is terrible and awful."])]
    [0.7269]
    """
    return [0.0 - score for score in sentiment_positive(prompts, completions)]


def sentiment_textblob(prompts, completions, **kwargs):
    """TextBlob polarity of each completion, in [-1, 1]: a second sentiment lexicon, independent of VADER,
    useful as a gold reward when VADER is the proxy being optimised.

    >>> [round(r, 4) for r in sentiment_textblob(["", ""], ["I love this, great day!", "This is terrible."])]
    [0.75, -1.0]
    """
    from textblob import TextBlob

    return [float(TextBlob(c).sentiment.polarity) for c in _texts(completions)]


def sentiment_lexicons(prompts, completions, **kwargs):
    """Mean of VADER's compound score and TextBlob's polarity, in [-1, 1]: a gold for a proxy learned from VADER
    labels that the proxy cannot match by imitating one lexicon (Gao et al. 2022's gold-vs-proxy setting).

    >>> [round(r, 3) for r in sentiment_lexicons(["", ""], ["I love this, great day!", "It is a chair."])]
    [0.818, 0.0]
    """
    return [(v + t) / 2 for v, t in zip(sentiment_positive(prompts, completions),
                                         sentiment_textblob(prompts, completions), strict=True)]


def target_sentiment(prompts, completions, target=0.5, **kwargs):
    """``-|sentiment_lexicons - target|``, in [-2, 0]: a labeller who wants replies upbeat to a degree, not gushing
    (0 at `target` on the lexicons' [-1, 1] scale, falling on both sides). With target 0.4 it is the labeller and
    gold of the over-optimisation sweep (experiments/overoptimization_sweep.yaml): most chit-chat replies lie below
    0.4, where more positive is better, so a proxy learned from few of its pairs misses the fall above the target.

    >>> [round(r, 3) for r in target_sentiment(["", ""], ["I love this, great day!", "It is a chair."])]
    [-0.318, -0.5]
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not -1 <= target <= 1:
        raise UserError(f"target_sentiment: target must be a number in [-1, 1], got {target!r}")
    return [-abs(s - target) for s in sentiment_lexicons(prompts, completions)]


def target_length(prompts, completions, target=20, unit="words", **kwargs):
    """``-|length - target| / target``, length counted in whitespace-split words or in characters.

    >>> target_length(["", ""], ["one two three four", "one two"], target=4)
    [0.0, -0.5]
    >>> target_length([""], ["abcdef"], target=4, unit="chars")
    [-0.5]
    """
    if unit not in ("words", "chars"):
        raise UserError(f"target_length: unit must be 'words' or 'chars', got {unit!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
        raise UserError(f"target_length: target must be a positive number, got {target!r}")
    lengths = [len(c.split()) if unit == "words" else len(c) for c in _texts(completions)]
    return [-abs(n - target) / target for n in lengths]


def _keyword_patterns(keywords, flags):
    """Whole-word (or whole-phrase) patterns for a keyword or a sequence of keywords."""
    keywords = (keywords,) if isinstance(keywords, str) else tuple(keywords)
    return [re.compile(rf"(?<!\w){re.escape(k)}(?!\w)", flags) for k in keywords]


def keyword(prompts, completions, include=(), exclude=(), case_sensitive=False, **kwargs):
    """(+1 per included keyword present, -1 per excluded keyword present) / number of keywords given.

    Keywords match whole words or phrases: "fun" does not match "funny".

    >>> keyword(["", ""], ["Great fun!", "Boring, not fun"], include=["great", "fun"], exclude=["boring"])
    [0.6666666666666666, 0.0]
    """
    flags = 0 if case_sensitive else re.IGNORECASE
    wanted, unwanted = _keyword_patterns(include, flags), _keyword_patterns(exclude, flags)
    if not wanted and not unwanted:
        raise UserError("keyword: give at least one keyword in include=[...] or exclude=[...]")
    total = len(wanted) + len(unwanted)

    def score(text):
        hits = sum(bool(p.search(text)) for p in wanted) - sum(bool(p.search(text)) for p in unwanted)
        return hits / total

    return [score(c) for c in _texts(completions)]


def regex_match(prompts, completions, pattern, **kwargs):
    """1.0 where ``re.search(pattern, completion)`` matches, else 0.0.

    >>> regex_match(["", ""], ["The answer is 42.", "No idea."], pattern=r"\\d+")
    [1.0, 0.0]
    """
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise UserError(f"regex_match: bad pattern {pattern!r}: {e}") from e
    return [1.0 if compiled.search(c) else 0.0 for c in _texts(completions)]


def _minus_repeated_fraction(words, n):
    """Minus the fraction of word n-grams that repeat an earlier one (0.0 when there are no n-grams)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(set(grams)) - len(grams)) / len(grams) if grams else 0.0


def repetition_penalty(prompts, completions, n=3, **kwargs):
    """Minus the fraction of repeated word n-grams: 0 without repeats, towards -1 as everything repeats.

    Completions shorter than n words score 0.

    >>> repetition_penalty(["", "", ""], ["a b c d", "a b a b a b", "a b"], n=2)
    [0.0, -0.6, 0.0]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"repetition_penalty: n must be a positive integer, got {n!r}")
    return [_minus_repeated_fraction(c.split(), n) for c in _texts(completions)]


@lru_cache(maxsize=1)
def _profanity_prob():
    """alt-profanity-check's `predict_prob` (an optional dependency: it pins scikit-learn and joblib)."""
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise UserError("toxicity_penalty needs the package alt-profanity-check: pip install alt-profanity-check") from e
    return predict_prob


def toxicity_penalty(prompts, completions, **kwargs):
    """Minus the probability that each completion is profane or offensive (alt-profanity-check), in [-1, 0].

    A bag-of-words linear model: it flags swearing and slurs, not subtler toxicity.
    """
    predict_prob = _profanity_prob()
    if not completions:
        return []
    return [-float(p) for p in predict_prob(_texts(completions))]
