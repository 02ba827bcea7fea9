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
