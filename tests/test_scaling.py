"""Gao et al. 2022 reward-vs-KL forms and the best-of-n KL, against hand values, naive loops and grids."""

import math

import numpy as np
import pytest

from rlgen.scaling import bon_kl, fit_gao, gao_peak, gao_reward


def test_bon_kl_hand_values():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_bon_kl_matches_the_max_of_n_uniform_draws():
    """Best-of-n of a uniform policy over M ranked outcomes picks outcome k with probability
    (k/M)^n - ((k-1)/M)^n; its KL to the uniform policy tends to log n - (n-1)/n as ties vanish (M large)."""
    m = 100_000
    for n in (2, 4, 16):
        kl = 0.0
        for k in range(1, m + 1):
            p = (k / m) ** n - ((k - 1) / m) ** n
            if p > 0:
                kl += p * math.log(p * m)
        assert kl == pytest.approx(bon_kl(n), abs=1e-3), n


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_bon_kl_refuses_a_non_count(n):
    with pytest.raises(ValueError, match="integer >= 1"):
        bon_kl(n)


def test_gao_reward_by_hand():
    d = np.array([0.0, 1.0, 2.0])
    # RL: d (alpha - beta log d) with alpha 1, beta 0.5: 0, 1, 2 (1 - 0.5 log 2)
    assert gao_reward(d, 1.0, 0.5, "rl") == pytest.approx([0.0, 1.0, 2 * (1 - 0.5 * math.log(2))])
    # BoN: d (alpha - beta d) with alpha 1, beta 0.25: 0, 0.75, 1
    assert gao_reward(d, 1.0, 0.25, "bon") == pytest.approx([0.0, 0.75, 1.0])
    with pytest.raises(ValueError, match="unknown Gao et al. form 'ppo'"):
        gao_reward(d, 1.0, 0.25, "ppo")


@pytest.mark.parametrize(("form", "alpha", "beta"), [("rl", 0.8, 0.3), ("bon", 0.9, 0.2), ("rl", 0.5, -0.2)])
def test_fit_recovers_alpha_and_beta(form, alpha, beta):
    d = np.linspace(0.0, 3.0, 13)
    exact = gao_reward(d, alpha, beta, form)
    fit = fit_gao(d, exact, form)
    assert (fit.form, fit.alpha, fit.beta) == (form, pytest.approx(alpha, abs=1e-9), pytest.approx(beta, abs=1e-9))
    noisy = exact + np.random.default_rng(0).normal(0.0, 0.01, size=d.shape)
    fit = fit_gao(d.tolist(), noisy.tolist(), form)
    assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.03)
    assert fit.alpha != alpha  # the noise did move it: the tolerance, not luck, is what passes


@pytest.mark.parametrize(("form", "alpha", "beta"), [("rl", 1.0, 0.5), ("rl", 0.3, 0.4), ("bon", 1.0, 0.25),
                                                     ("bon", 0.6, 0.5)])
def test_peak_is_the_argmax_on_a_dense_grid(form, alpha, beta):
    grid = np.linspace(0.0, 10.0, 200_001)
    best = grid[np.argmax(gao_reward(grid, alpha, beta, form))]
    assert gao_peak(alpha, beta, form) == pytest.approx(best, abs=1e-4)
    fit = fit_gao(grid[::1000], gao_reward(grid[::1000], alpha, beta, form), form)
    assert fit.peak_d == pytest.approx(best, abs=1e-4) and fit.peak_kl == pytest.approx(best ** 2, abs=1e-3)


def test_no_peak_when_the_curve_keeps_rising():
    assert gao_peak(1.0, 0.0, "rl") is None and gao_peak(1.0, -0.2, "bon") is None
    d = np.linspace(0.5, 3.0, 6)
    fit = fit_gao(d, 0.4 * d, "bon")  # a straight line: beta 0
    assert fit.peak_d is None and fit.peak_kl is None
    assert gao_peak(-0.5, 1.0, "bon") == 0.0  # falls from the start: the best d >= 0 is the start


@pytest.mark.parametrize(("d", "reward", "fragment"), [
    ([1.0], [0.5], "two or more distinct d > 0"),
    ([0.0, 0.0, 0.0], [0.1, 0.2, 0.3], "two or more distinct d > 0"),
    ([0.0, 1.0, 1.0], [0.0, 0.2, 0.3], "two or more distinct d > 0"),
    ([1.0, 2.0], [0.5], "equal length"),
    ([1.0, float("nan")], [0.5, 0.6], "finite"),
    ([-1.0, 2.0], [0.5, 0.6], ">= 0"),
])
def test_degenerate_inputs_are_refused(d, reward, fragment):
    with pytest.raises(ValueError, match=fragment):
        fit_gao(d, reward, "rl")


@pytest.mark.parametrize("ratio", [500.0, 5000.0])  # alpha / beta: d*^2 overflows past ~355, d* past ~710
def test_a_nearly_linear_rl_curve_keeps_its_peak_in_log_space(ratio):
    """No over-optimisation yet: the gold curve is nearly a line, beta -> 0+, and the peak lies far beyond any
    float; the fit still succeeds and keeps the peak exactly as log d* = alpha / beta - 1."""
    d = np.linspace(0.5, 3.0, 6)
    alpha = 0.4
    fit = fit_gao(d, gao_reward(d, alpha, alpha / ratio, "rl"), "rl")
    assert fit.log_peak_d == pytest.approx(ratio - 1, rel=1e-6)
    assert fit.log_peak_kl == pytest.approx(2 * (ratio - 1), rel=1e-6)
    assert fit.peak_kl == math.inf and fit.peak_d == (math.inf if ratio > 710 else pytest.approx(math.exp(ratio - 1)))
    assert gao_peak(alpha, alpha / ratio, "rl") == pytest.approx(fit.peak_d, rel=1e-6)


def test_mean_curve_and_peak_and_fall_against_naive_loops():
    from rlgen.scaling import mean_curve, peak_and_fall

    rng = np.random.default_rng(0)
    gold, kl, start = rng.normal(size=(3, 4, 5)), rng.uniform(0, 9, size=(3, 4, 5)), rng.normal(size=5)
    d, r = mean_curve(gold, kl, start)
    for s in range(3):
        for t in range(4):
            assert d[s * 4 + t] == pytest.approx(math.sqrt(sum(kl[s, t]) / 5))
            assert r[s * 4 + t] == pytest.approx(sum(gold[s, t, p] - start[p] for p in range(5)) / 5)
    t, peak, fall = peak_and_fall(gold)
    curve = [sum(gold[s, t2, p] for s in range(3) for p in range(5)) / 15 for t2 in range(4)]
    assert t == curve.index(max(curve)) and peak == pytest.approx(max(curve))
    assert fall == pytest.approx(max(curve) - curve[-1])
    with pytest.raises(ValueError, match=r"\[S, T, P\]"):
        mean_curve(gold[0], kl[0], start)


def _gao_data(alpha, beta, noise, rng, seeds=3, prompts=64, kls=(0.5, 2, 5, 10, 20, 40)):
    """Per-prompt gold along an RL optimisation whose seed-and-prompt mean follows R(d) = d (alpha - beta log d)."""
    kl = np.broadcast_to(np.array(kls, dtype=float)[None, :, None], (seeds, len(kls), prompts)).copy()
    gold = gao_reward(np.sqrt(kl), alpha, beta, "rl") + rng.normal(0, noise, size=kl.shape)
    return gold, kl, np.zeros(prompts)


def test_bootstrap_finds_a_turn_and_brackets_the_true_peak():
    from rlgen.scaling import bootstrap_overoptimization

    rng = np.random.default_rng(1)
    alpha, beta = 0.5, 0.25  # peak at log d* = alpha / beta - 1 = 1: KL* = e^2 = 7.39, inside the measured range
    result = bootstrap_overoptimization(*_gao_data(alpha, beta, 0.3, rng), form="rl", samples=300)
    assert result["peak_kl_lo"] < math.exp(2) < result["peak_kl_hi"] < 40
    assert result["alpha"] == pytest.approx(alpha, abs=0.1) and result["beta"] == pytest.approx(beta, abs=0.05)
    assert result["turned"] and result["fall"] > 2 * result["fall_se"] > 0 and result["peak_eval"] in (1, 2, 3)
    # the peak's SE: about the noise over the 3 x 64 per-prompt values (0.3 / sqrt(192) = 0.022)
    assert 0.01 < result["peak_gold_se"] < 0.04


def test_bootstrap_claims_no_turn_while_the_gold_rises_or_when_noise_hides_the_fall():
    from rlgen.scaling import bootstrap_overoptimization

    rng = np.random.default_rng(2)
    rising = bootstrap_overoptimization(*_gao_data(0.5, 0.0, 0.3, rng), form="rl", samples=200)
    assert not rising["turned"] and rising["peak_eval"] == 5 and rising["fall"] == 0.0
    assert rising["peak_kl_hi"] == math.inf  # the data do not bound a peak
    gold, kl, start = _gao_data(0.5, 0.25, 0.3, rng, prompts=2)
    gold += rng.normal(0, 5.0, size=gold.shape)  # the same turn under noise far larger than the fall
    assert not bootstrap_overoptimization(gold, kl, start, form="rl", samples=200)["turned"]
