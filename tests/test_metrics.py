import math
import random

import pytest

from rlgen import metrics


def test_distinct_n_hand_values():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    assert metrics.distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert metrics.distinct_n(["The CAT", "the cat"], 1) == pytest.approx(2 / 4)
    assert metrics.distinct_n(["a"], 2) == 0.0
    assert metrics.distinct_n([], 1) == 0.0


def test_self_bleu_hand_values():
    assert metrics.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert metrics.self_bleu(["a b c d", "e f g h"]) == pytest.approx(0.0)
    # Hand BLEU-4 of one sentence vs the other (symmetric here): precisions 6/7, 4/6, 2/5, 1/4, BP = 1.
    expected = (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert metrics.self_bleu(["the cat sat on the mat today", "the cat sat on a mat today"]) == pytest.approx(
        expected, abs=1e-4)
    assert metrics.self_bleu(["only one"]) == 0.0


def test_self_bleu_subsamples_the_seeds_fixed_subset():
    """Two identical texts among eight that share no word: a text scores 1 when its twin is in the subset,
    else 0, so self-BLEU is 2/5 when random.Random(seed) picks both twins among 5, else 0 (2/10 on all)."""
    texts = ["the same words here", "the same words here"] + [f"w{i}a w{i}b w{i}c w{i}d" for i in range(8)]
    assert metrics.self_bleu(texts) == pytest.approx(0.2)
    seen = set()
    for seed in range(20):
        both = {0, 1} <= set(random.Random(seed).sample(range(10), 5))
        assert metrics.self_bleu(texts, max_texts=5, seed=seed) == pytest.approx(0.4 if both else 0.0), seed
        seen.add(both)
    assert seen == {True, False}


def test_perplexity_and_mean_std():
    assert metrics.perplexity(3 * math.log(5.0), 3) == pytest.approx(5.0)
    assert math.isnan(metrics.perplexity(1.0, 0))
    assert metrics.mean_std([1.0, 3.0]) == (2.0, 1.0)
    m, s = metrics.mean_std([])
    assert math.isnan(m) and math.isnan(s)
