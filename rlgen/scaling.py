"""Reward against KL: the functional forms of Gao et al. 2022 ("Scaling Laws for Reward Model
Overoptimization") and the KL of best-of-n sampling.

With d = sqrt(KL(pi || pi_start)) (KL in nats per completion, so d in nats^0.5) and R(d) the reward gained
over the starting policy (R(0) = 0):
- RL (policy optimisation):  R(d) = d (alpha - beta log d)
- best-of-n:                 R(d) = d (alpha - beta d)
Both are linear in (alpha, beta), so `fit_gao` fits them by least squares without an intercept, as the
paper does: fit on reward - reward_start, then add reward_start back to draw the curve.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

FORMS = ("rl", "bon")


def bon_kl(n: int) -> float:
    """KL(best-of-n || pi) = log n - (n - 1) / n nats (Stiennon et al. 2020; Gao et al. 2022): exact when the
    reward has no ties, an upper bound otherwise (Beirami et al. 2024). Independent of the policy and reward.

    >>> bon_kl(1), round(bon_kl(2), 6), round(bon_kl(4), 6)
    (0.0, 0.193147, 0.636294)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"bon_kl: n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def _features(d: np.ndarray, form: str) -> np.ndarray:
    """[len(d), 2] columns multiplying (alpha, beta): RL (d, -d log d), BoN (d, -d^2); d log d -> 0 at d = 0."""
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)
        return np.stack([d, -d * np.log(safe)], axis=-1)
    if form == "bon":
        return np.stack([d, -d * d], axis=-1)
    raise ValueError(f"unknown Gao et al. form {form!r} (known: {', '.join(FORMS)})")


def gao_reward(d, alpha: float, beta: float, form: str) -> np.ndarray:
    """R(d) of the `form` ("rl" or "bon") at d = sqrt(KL) >= 0 (a scalar or array, nats^0.5); same shape as
    `d`, in the reward's units, relative to the starting policy.

    >>> float(gao_reward(1.0, 2.0, 1.0, "bon")), float(gao_reward(0.0, 2.0, 1.0, "rl"))
    (1.0, 0.0)
    """
    d = np.asarray(d, dtype=float)
    return _features(d, form) @ np.array([alpha, beta])


def _exp(x: float) -> float:
    """exp(x), or inf where the result is beyond the float range (x > ~709.78) instead of OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def gao_log_peak(alpha: float, beta: float, form: str) -> float | None:
    """log d* of the d >= 0 (nats^0.5) where R(d) is largest, or None when beta <= 0 (the curve has no maximum:
    it rises without bound). RL: R'(d) = alpha - beta (log d + 1) = 0 at log d* = alpha / beta - 1; best-of-n:
    R'(d) = alpha - 2 beta d = 0 at d* = alpha / (2 beta), or d* = 0 (log d* = -inf) when alpha <= 0 (the curve
    only falls). In log space because a nearly linear RL curve (beta -> 0+, no over-optimisation yet) puts d*
    far beyond the float range: exp(alpha / beta - 1) overflows for alpha / beta > ~710.

    >>> gao_log_peak(1.0, 0.5, "rl"), gao_log_peak(1000.0, 1.0, "rl"), gao_log_peak(-1.0, 0.5, "bon")
    (1.0, 999.0, -inf)
    """
    if form not in FORMS:
        raise ValueError(f"unknown Gao et al. form {form!r} (known: {', '.join(FORMS)})")
    if not beta > 0:
        return None
    if form == "rl":
        return alpha / beta - 1
    return math.log(alpha / (2 * beta)) if alpha > 0 else -math.inf


def gao_peak(alpha: float, beta: float, form: str) -> float | None:
    """d* = exp(`gao_log_peak`) (nats^0.5): inf for a peak beyond the float range, None without a peak. The
    peak KL is d*^2.

    >>> round(gao_peak(1.0, 0.5, "rl"), 6), gao_peak(1.0, 0.25, "bon"), gao_peak(1.0, -0.1, "rl")
    (2.718282, 2.0, None)
    """
    log_d = gao_log_peak(alpha, beta, form)
    return None if log_d is None else _exp(log_d)


class GaoFit(NamedTuple):
    """A fitted Gao et al. curve: R(d) = `gao_reward(d, alpha, beta, form)`; `log_peak_d` = `gao_log_peak(...)`."""

    form: str
    alpha: float
    beta: float
    log_peak_d: float | None

    @property
    def peak_d(self) -> float | None:
        """d* (nats^0.5); inf beyond the float range, None without a peak."""
        return None if self.log_peak_d is None else _exp(self.log_peak_d)

    @property
    def log_peak_kl(self) -> float | None:
        """log KL* = 2 log d*; None without a peak."""
        return None if self.log_peak_d is None else 2 * self.log_peak_d

    @property
    def peak_kl(self) -> float | None:
        """KL at the peak (nats), d*^2; inf beyond the float range, None without a peak."""
        return None if self.log_peak_d is None else _exp(2 * self.log_peak_d)


def fit_gao(d, reward, form: str) -> GaoFit:
    """Least-squares (alpha, beta) of `form` ("rl" or "bon") through the origin.

    d: [N] sqrt(KL to the starting policy), nats^0.5, >= 0; reward: [N] reward minus the starting policy's.
    Needs at least two distinct d > 0 (points at d = 0 carry no information: every R(0) is 0); raises
    ValueError naming what is missing otherwise, or for non-finite or negative values.
    """
    d, reward = np.asarray(d, dtype=float), np.asarray(reward, dtype=float)
    if d.ndim != 1 or d.shape != reward.shape:
        raise ValueError(f"fit_gao: d and reward must be two lists of equal length, got shapes {d.shape} and "
                         f"{reward.shape}")
    if not (np.isfinite(d).all() and np.isfinite(reward).all()):
        raise ValueError("fit_gao: d and reward must be finite (drop missing points first)")
    if (d < 0).any():
        raise ValueError(f"fit_gao: d = sqrt(KL) must be >= 0, got {d.min()}")
    distinct = np.unique(d[d > 0])
    if len(distinct) < 2:
        raise ValueError(f"fit_gao: the {form} form needs points at two or more distinct d > 0 to fit alpha and "
                         f"beta, got {len(distinct)} ({len(d)} points)")
    (alpha, beta), *_ = np.linalg.lstsq(_features(d, form), reward, rcond=None)
    return GaoFit(form, float(alpha), float(beta), gao_log_peak(float(alpha), float(beta), form))


def mean_curve(gold: np.ndarray, kl: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points Gao et al. fit, one per (seed, evaluation): d = sqrt(mean KL over prompts), R = mean gold gain.

    gold, kl: [S seeds, T evaluations, P prompts] gold reward and KL (nats) to the start per prompt; start:
    [P] the starting policy's gold on the same prompts. Returns d [S*T] and R [S*T] (gold - start, prompt mean).

    >>> d, r = mean_curve(np.array([[[1.0, 3.0]]]), np.array([[[4.0, 12.0]]]), np.array([0.0, 1.0]))
    >>> d.tolist(), r.tolist()
    ([2.8284271247461903], [1.5])
    """
    gold, kl = np.asarray(gold, dtype=float), np.asarray(kl, dtype=float)
    if gold.ndim != 3 or gold.shape != kl.shape or np.shape(start) != gold.shape[2:]:
        raise ValueError(f"mean_curve: gold and kl must be [S, T, P] and start [P], got {gold.shape}, {kl.shape}, "
                         f"{np.shape(start)}")
    d = np.sqrt(np.clip(kl.mean(axis=2), 0.0, None))
    return d.reshape(-1), (gold - np.asarray(start, dtype=float)).mean(axis=2).reshape(-1)


def peak_and_fall(gold: np.ndarray) -> tuple[int, float, float]:
    """Where the measured gold peaks along an optimisation, and how far it fell by the last evaluation.

    gold: [S, T, P] gold per seed, evaluation (in order of KL) and prompt. Returns (t*, the mean gold at t*, the
    mean gold at t* minus the mean at the last evaluation), means over seeds and prompts; the fall is 0 when the
    peak is the last evaluation.

    >>> peak_and_fall(np.array([[[0.0], [2.0], [1.5]], [[0.0], [3.0], [2.5]]]))
    (1, 2.5, 0.5)
    """
    curve = np.asarray(gold, dtype=float).mean(axis=(0, 2))
    t = int(np.argmax(curve))
    return t, float(curve[t]), float(curve[t] - curve[-1])


def bootstrap_overoptimization(gold, kl, start, form: str, samples: int = 1000, seed: int = 0,
                               level: float = 0.95) -> dict:
    """Gao et al.'s fit and the measured turn of one proxy's gold, with a bootstrap over seeds and prompts.

    gold, kl: [S, T, P] per seed, evaluation (in order) and prompt; start: [P] the starting policy's gold; form:
    "rl" or "bon". Each of `samples` replicates draws S seeds and P prompts with replacement (the same prompts for
    every seed and evaluation, as they were measured) and refits. Returns:
    - `alpha`, `beta`, `peak_kl`: the fit on all the data (`peak_kl` None without a peak, inf beyond floats;
      all three None when the data cannot be fitted: fewer than two distinct KL > 0);
    - `peak_kl_lo`, `peak_kl_hi`: the central `level` interval of the replicates' peak KL (a replicate without a
      peak counts as inf, so an upper end of inf says the data do not bound the peak; None without a fit);
    - `peak_eval`, `peak_gold`, `fall`: `peak_and_fall` of the data; `peak_gold_se`, `fall_se`: the replicates'
      std of the gold at that same evaluation and of the fall from it (the peak is not re-picked, which would
      bias both upwards);
    - `turned`: the gold fell from its measured peak by more than 2 standard errors.
    """
    gold, kl, start = (np.asarray(a, dtype=float) for a in (gold, kl, start))
    try:
        fit = fit_gao(*mean_curve(gold, kl, start), form=form)
    except ValueError:  # e.g. a policy that never moved: every d is 0
        fit = None
    t, peak, fall = peak_and_fall(gold)
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = gold.shape[0], gold.shape[2]
    log_peaks, peaks, falls = [], [], []
    for _ in range(samples):
        s, p = rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_prompts, n_prompts)
        g, k = gold[s][:, :, p], kl[s][:, :, p]
        curve = g.mean(axis=(0, 2))
        peaks.append(curve[t])
        falls.append(curve[t] - curve[-1])
        if fit is None:
            continue
        try:
            log_peak = fit_gao(*mean_curve(g, k, start[p]), form=form).log_peak_kl
        except ValueError:  # a replicate without two distinct d > 0
            log_peak = None
        log_peaks.append(math.inf if log_peak is None else log_peak)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(log_peaks, [tail, 100 - tail], method="nearest") if fit else (None, None)
    fall_se = float(np.std(falls, ddof=1))
    return {"alpha": fit and fit.alpha, "beta": fit and fit.beta, "peak_kl": fit and fit.peak_kl,
            "peak_kl_lo": None if lo is None else _exp(lo), "peak_kl_hi": None if hi is None else _exp(hi),
            "peak_eval": t, "peak_gold": peak, "peak_gold_se": float(np.std(peaks, ddof=1)), "fall": fall,
            "fall_se": fall_se,
            "turned": bool(t < gold.shape[1] - 1 and fall > 2 * fall_se)}
