"""Advantage estimators, policy losses, loss aggregation and KL-in-the-loss for one RL loop over many methods.

Pure functions in the style of :mod:`rlgen.core` (tensors in, ``(tensors, stats)`` out, no config objects), so that
PPO, GRPO, Dr.GRPO, RLOO, REINFORCE++, GSPO, CISPO and DAPO differ only in which entries of :data:`ADVANTAGES` and
:data:`POLICY_LOSSES` the loop picks and in the aggregation mode; everything around them (sampler, sharding,
engine, resume) stays the same. Sources: verl ``verl/trainer/ppo/core_algos.py`` (``compute_*_advantage``,
``compute_policy_loss_*``, ``agg_loss``), TRL 1.16 ``trl/trainer/grpo_trainer.py`` (``_generate_and_score_completions``
and ``_compute_loss``) and ``rloo_trainer.py``, OpenRLHF ``openrlhf/trainer/ppo_utils/experience_maker.py``
(``compute_advantages_and_returns``) and ``openrlhf/models/loss.py`` (``PolicyLoss``).

Shapes: ``B`` rows (completions), ``T`` response tokens, ``mask: [B, T]`` set on real tokens (bool, int or float).
Groups: the rows of one prompt are consecutive, ``group_size`` of them (rows ``i*n .. i*n+n-1``), so ``B % n == 0``
and a group never straddles processes. Whatever sits at masked positions (inf/nan included) never reaches a result
or a gradient. ``stats`` values are detached 0-dim tensors (reducible across processes without a sync).

``reduce``: optional callable that takes a 1-D float tensor and returns its element-wise sum over all processes
(e.g. ``lambda t: accelerator.reduce(t, "sum")``); batch-wide statistics (whitening, TRL's batch std) then cover the
global batch. None: this process's batch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlgen import core

Reduce = Callable[[torch.Tensor], torch.Tensor] | None
AdvantageResult = tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]
LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]

GRPO_EPS = 1e-4  # TRL 1.16's (std + 1e-4); verl uses 1e-6, OpenRLHF 1e-9: immaterial unless a group's std is ~0


def _zero_padding(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` -> ``[B / n, n]``, refusing a batch that does not split into whole groups."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into groups of group_size={group_size}")
    return x.reshape(-1, group_size)


def _need_groups(name: str, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(f"the {name} advantage compares completions of one prompt: group_size must be >= 2, "
                         f"got {group_size}")


def _outcome(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B]`` sum of the per-token rewards over real tokens, in at least float32.

    With the KL in the loss that is the score; with the KL in the reward it is ``score - beta * sum KL`` (verl's
    ``token_level_rewards.sum(-1)``; TRL's RLOOTrainer subtracts the summed k1 KL the same way). OpenRLHF differs
    there: it takes the group baseline off the scores alone and adds the KL as per-token reward-to-go afterwards.
    """
    return core.masked_sum(token_rewards.to(core._float_dtype(token_rewards)), mask, dim=-1)


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]``: each row's value on its real tokens, 0 on padding."""
    return _zero_padding(per_row.unsqueeze(-1).expand(mask.shape), mask.bool())


def _zero_std_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Number of groups (of >= 2 rows) whose scores are all equal: they carry no group-relative signal."""
    if group_size < 2:
        return torch.zeros((), dtype=torch.float32, device=scores.device)
    g = _groups(scores.detach(), group_size)
    return (g == g[:, :1]).all(dim=1).sum().to(torch.float32)


def group_normalized_advantages(
    outcomes: torch.Tensor, group_size: int, scale: str = "group", eps: float = GRPO_EPS, reduce: Reduce = None
) -> torch.Tensor:
    """GRPO's group-relative advantage per row: ``(R - mean_group(R)) / (std + eps)`` (Shao et al. 2024).

    Args:
        outcomes: ``[B]`` per-row returns R, grouped consecutively by ``group_size``.
        scale: TRL's ``scale_rewards``: ``"group"``: std of the row's group (the original GRPO, verl's ``grpo``);
            ``"batch"``: std of every row of the global batch (over processes with ``reduce``), mean still per
            group (Liu et al. 2025, "Tricks or Traps?", their Lite PPO; TRL ``scale_rewards="batch"``);
            ``"none"``: no division (Dr.GRPO, Liu et al. 2025). Stds are unbiased (``torch.std``, TRL's ``nanstd``).
        eps: added to the std, TRL's 1e-4 by default.

    Returns:
        ``[B]`` advantages, in at least float32. Source: TRL ``grpo_trainer.py``
        ``_generate_and_score_completions`` (``sum_then_normalize``); verl ``compute_grpo_outcome_advantage``.
    """
    g = _groups(outcomes.to(core._float_dtype(outcomes)), group_size)
    advantages = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        flat = g.reshape(-1)
        var = (core.reduced_mean_var(flat, torch.ones_like(flat, dtype=torch.bool), reduce)[1] if reduce is not None
               else flat.var())
        advantages = advantages / (var.sqrt() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    return advantages.reshape(-1)


def leave_one_out_advantages(outcomes: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: ``R_i - mean_{j != i} R_j`` within each group (Kool et al. 2019; Ahmadian et al. 2024).

    Args:
        outcomes: ``[B]`` per-row returns, grouped consecutively by ``group_size >= 2``.

    Returns:
        ``[B]``. Source: TRL ``rloo_trainer.py`` ``_generate_and_score_completions`` (``(sum - R) / (n - 1)``
        baseline, without ``normalize_advantages``); verl ``compute_rloo_outcome_advantage``; OpenRLHF ``rloo``.
    """
    g = _groups(outcomes.to(core._float_dtype(outcomes)), group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def _last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]`` with each row's value at its last real token, 0 elsewhere."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    is_last = positions.unsqueeze(0) == core._last_real_index(mask).unsqueeze(-1)
    return torch.where(is_last, values.unsqueeze(-1), torch.zeros((), dtype=values.dtype, device=values.device))


# ----------------------------------------------------------------------------------------------------- advantages
# Every entry: fn(token_rewards [B, T], scores [B], values [B, T] | None, mask [B, T], *, group_size, gamma, lam,
# reduce=None) -> (advantages [B, T], returns [B, T] | None, stats). returns are the critic's targets (gae only).


@torch.no_grad()
def gae_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """PPO's GAE over real tokens (:func:`rlgen.core.gae`), with a critic; not whitened here (the loop does it).

    Returns ``(advantages, returns, stats)``; ``returns`` are the value targets. verl ``compute_gae_advantage_return``.
    """
    if values is None:
        raise ValueError("the gae advantage needs values from a critic; got values=None")
    advantages, returns = core.gae(token_rewards, values, mask, gamma, lam)
    return advantages, returns, {"zero_std_groups": _zero_std_groups(scores, group_size)}


@torch.no_grad()
def grpo_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """GRPO: ``(R - group mean) / (group std + 1e-4)`` on every real token, R the row's summed token rewards.

    See :func:`group_normalized_advantages` (``scale="group"``). ``values``, ``gamma``, ``lam`` are unused.
    """
    _need_groups("grpo", group_size)
    adv = group_normalized_advantages(_outcome(token_rewards, mask), group_size, "group")
    return _broadcast(adv, mask), None, {"zero_std_groups": _zero_std_groups(scores, group_size)}


@torch.no_grad()
def dr_grpo_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``R - group mean``, no std division.

    TRL ``scale_rewards="none"``; verl ``compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)``;
    OpenRLHF ``dr_grpo``.
    """
    _need_groups("dr_grpo", group_size)
    adv = group_normalized_advantages(_outcome(token_rewards, mask), group_size, "none")
    return _broadcast(adv, mask), None, {"zero_std_groups": _zero_std_groups(scores, group_size)}


@torch.no_grad()
def rloo_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """RLOO: ``R_i - mean of the other n - 1 rows' R`` on every real token (:func:`leave_one_out_advantages`).

    With the KL in the reward, R = score - beta * summed k1 KL: TRL's RLOOTrainer (``beta > 0``) exactly.
    """
    _need_groups("rloo", group_size)
    adv = leave_one_out_advantages(_outcome(token_rewards, mask), group_size)
    return _broadcast(adv, mask), None, {"zero_std_groups": _zero_std_groups(scores, group_size)}


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """REINFORCE++ (Hu et al. 2025): token-level returns ``G_t = r_t + gamma G_{t+1}`` of the shaped rewards (KL in
    the reward), whitened over the global batch's real tokens (``reduce``).

    verl ``compute_reinforce_plus_plus_outcome_advantage``; OpenRLHF ``reinforce`` (``get_cumulative_returns`` then
    batch normalisation).
    """
    returns = core.discounted_returns(token_rewards, mask, gamma)
    advantages = core.masked_whiten(returns, mask, reduce=reduce)
    return advantages, None, {"zero_std_groups": _zero_std_groups(scores, group_size)}


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    token_rewards: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *,
    group_size: int, gamma: float, lam: float, reduce: Reduce = None,
) -> AdvantageResult:
    """REINFORCE++-baseline (Hu et al. 2025): the group's mean score subtracted at each row's last real token (the
    KL part of the token rewards kept), then token returns and global whitening as :func:`reinforce_pp_advantages`.

    OpenRLHF ``reinforce_baseline`` (group mean off the scores, then ``compute_reward`` with the KL and
    ``get_cumulative_returns``); verl ``compute_reinforce_plus_plus_baseline_outcome_advantage`` is the same for
    gamma = 1 with the KL in the loss (it broadcasts ``R - group mean`` over the tokens).
    """
    _need_groups("reinforce_pp_baseline", group_size)
    dtype = core._float_dtype(token_rewards, scores)
    g = _groups(scores.to(dtype), group_size)
    baseline = g.mean(dim=1, keepdim=True).expand_as(g).reshape(-1)
    shaped = _zero_padding(token_rewards.to(dtype), mask.bool()) - _last_token(baseline, mask)
    returns = core.discounted_returns(shaped, mask, gamma)
    advantages = core.masked_whiten(returns, mask, reduce=reduce)
    return advantages, None, {"zero_std_groups": _zero_std_groups(scores, group_size)}


ADVANTAGES: dict[str, Callable[..., AdvantageResult]] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def needs_critic(name: str) -> bool:
    """Whether the advantage estimator ``name`` needs a value model (only ``gae``)."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGES)}")
    return name == "gae"


# ---------------------------------------------------------------------------------------------------- aggregation
LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def loss_denominator(mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """The divisor :func:`aggregate` uses for ``mask`` under ``mode``, as a float32 0-dim tensor.

    ``token-mean``: the real tokens; ``seq-mean-*``: the rows with at least one real token;
    ``seq-mean-token-sum-norm``: those rows times ``max_len`` (default ``T``). It is additive, so the loop sums it
    over the micro-batches of a mini-batch and over processes (all-reduce) and passes the total to
    :func:`aggregate` as ``denominator``: the micro-batch losses then add up to the loss of the whole global batch.
    """
    real = mask.bool()
    if mode == "token-mean":
        count = real.sum()
    elif mode in LOSS_AGGS:
        count = real.any(dim=-1).sum()
        if mode == "seq-mean-token-sum-norm":
            count = count * (mask.shape[-1] if max_len is None else max_len)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGS}")
    return count.to(torch.float32)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a 0-dim loss over real tokens (verl ``core_algos.agg_loss``).

    Modes (``S`` = the per-row sums over real tokens, ``n_i`` the row's real tokens, ``B'`` the rows with any):
        ``token-mean``: ``sum S / sum n_i`` (DAPO; TRL ``bnpo``/``dapo``; rlgen's PPO);
        ``seq-mean-token-sum``: ``sum S / B'``;
        ``seq-mean-token-mean``: ``sum (S_i / n_i) / B'`` (the original GRPO; TRL ``grpo``);
        ``seq-mean-token-sum-norm``: ``sum S / (B' * max_len)`` (Dr.GRPO's constant normaliser; TRL ``dr_grpo``,
        whose ``max_completion_length`` is ``max_len``; verl divides by ``max_len`` only, a constant factor B').

    Args:
        denominator: the divisor above (see :func:`loss_denominator`) for the GLOBAL batch, so that the sum of the
            micro-batches' losses (and the processes' gradients, summed) equals the global batch's loss; None: this
            call's own. For ``seq-mean-token-sum-norm`` it includes the ``max_len`` factor.
        max_len: Dr.GRPO's constant, the maximum completion length (default ``T``); only for
            ``seq-mean-token-sum-norm`` without ``denominator``.

    Rows without real tokens contribute nothing and are not counted (verl; TRL's ``grpo`` counts them).
    """
    if mode not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGS}")
    real = mask.bool()
    if mode == "token-mean" and denominator is None:
        return core.masked_mean(loss_mat, mask)
    den = loss_denominator(mask, mode, max_len) if denominator is None else denominator
    if mode == "seq-mean-token-mean":
        per_row = core.masked_sum(loss_mat, real, dim=-1) / real.sum(dim=-1).clamp(min=1).to(loss_mat.dtype)
        total = per_row.sum()
    else:
        total = core.masked_sum(loss_mat, real)
    if not isinstance(den, torch.Tensor):
        den = torch.tensor(float(den), device=loss_mat.device)
    return total / den.to(device=loss_mat.device, dtype=loss_mat.dtype)


# -------------------------------------------------------------------------------------------------- policy losses
# Every entry: fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip=0.0,
# loss_agg="token-mean", denominator=None, weights=None, max_len=None) -> (loss 0-dim, stats).
# weights: per-token importance weights [B, T] (truncated IS against an inference engine), multiplying the loss.


def _ratio_stats(log_ratio, ratio, clipped, mask):
    real = mask.bool()
    return {
        "approxkl": 0.5 * core.masked_mean(log_ratio**2, mask),
        "clipfrac": core.masked_mean(clipped.to(ratio.dtype), mask),
        "ratio_mean": core.masked_mean(ratio, mask),
        "ratio_max": torch.where(real, ratio, torch.full_like(ratio, -torch.inf)).max(),
    }


def _weighted(per_token, weights, real):
    return per_token if weights is None else per_token * _zero_padding(weights.detach(), real)


def vanilla_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float, clip_high: float, dual_clip: float = 0.0, loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None, weights: torch.Tensor | None = None, max_len: int | None = None,
) -> LossResult:
    """PPO's clipped surrogate with separate bounds ``clip(ratio, 1 - clip_low, 1 + clip_high)``.

    ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025: 0.2 / 0.28). ``dual_clip = c > 1`` (Ye et al.
    2020, "Mastering Complex Control in MOBA Games") caps the loss of a negative-advantage token at ``-c * A``.
    With ``clip_low = clip_high = eps`` and ``token-mean`` it is PPO's clipped loss (tests/test_core.py).
    verl ``compute_policy_loss_vanilla``; TRL ``_compute_loss`` (``grpo``/``bnpo``/``dr_grpo``/``dapo``);
    OpenRLHF ``PolicyLoss``. No clamp on the log-ratio (verl clamps at +-20).

    Args:
        logprobs: ``[B, T]`` current policy (carries grad); old_logprobs, advantages, weights: constants.

    Returns:
        ``(loss, stats)``: stats ``approxkl`` (0.5 mean (log ratio)^2), ``clipfrac`` (clipped term active),
        ``ratio_mean``, ``ratio_max``, ``dual_clipfrac`` (dual clip active; 0 when off), over real tokens.
    """
    if dual_clip and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or 0 for off), got {dual_clip}")
    real = mask.bool()
    log_ratio = _zero_padding(logprobs - old_logprobs.detach(), real)
    advantages = _zero_padding(advantages.detach(), real)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(real)
    if dual_clip:
        floor = -advantages * dual_clip
        dual = (advantages < 0) & (per_token > floor)
        per_token = torch.where(dual, floor, per_token)
    loss = aggregate(_weighted(per_token, weights, real), mask, loss_agg, denominator, max_len)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio, ratio, clipped > unclipped, mask)
        stats["dual_clipfrac"] = core.masked_mean(dual.to(ratio.dtype), mask)
    return loss, stats


def gspo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float, clip_high: float, dual_clip: float = 0.0, loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None, weights: torch.Tensor | None = None, max_len: int | None = None,
) -> LossResult:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one clipped ratio per sequence,
    ``s_i = exp(mean_t log(pi / pi_old))``, the geometric mean of the token ratios.

    Written as GSPO-token, ``s_i,t = sg[s_i] * pi_t / sg[pi_t]`` (verl ``compute_policy_loss_gspo``): the same value
    per token, and with advantages constant over a sequence and ``seq-mean-token-mean`` the same gradient as TRL's
    ``importance_sampling_level="sequence"``. The paper averages over sequences (pass ``seq-mean-token-mean``, which
    verl forces) with tiny clips (3e-4 / 4e-4).
    ``dual_clip`` is ignored. No clamp on the log-ratio (verl clamps at 10).

    Returns ``(loss, stats)`` as :func:`vanilla_policy_loss` (``ratio_*`` of the sequence ratios, per token).
    """
    real = mask.bool()
    logprobs = _zero_padding(logprobs, real)
    log_ratio = _zero_padding(logprobs - old_logprobs.detach(), real)
    advantages = _zero_padding(advantages.detach(), real)
    seq_log_ratio = core.masked_sum(log_ratio, real, dim=-1) / real.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)
    ratio = torch.exp(_zero_padding(logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1), real))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(_weighted(per_token, weights, real), mask, loss_agg, denominator, max_len)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio, ratio, clipped > unclipped, mask)
    return loss, stats


def cispo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float, clip_high: float, dual_clip: float = 0.0, loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None, weights: torch.Tensor | None = None, max_len: int | None = None,
) -> LossResult:
    """CISPO (MiniMax 2025, "MiniMax-M1", eq. 4): ``-sg[clip(ratio, 1 - clip_low, 1 + clip_high)] * A * log pi``.

    The importance weight is clipped and detached, so every token keeps a gradient (PPO's clip zeroes it).
    MiniMax-M1 sets no lower bound: ``clip_low >= 1``. verl ``compute_policy_loss_cispo``; TRL ``loss_type="cispo"``
    clamps at ``epsilon_high`` = ``1 + clip_high`` with no lower bound. ``dual_clip`` is ignored.

    Returns ``(loss, stats)`` as :func:`vanilla_policy_loss`; ``clipfrac`` = share of tokens whose weight was clipped.
    """
    real = mask.bool()
    logprobs = _zero_padding(logprobs, real)
    log_ratio = _zero_padding(logprobs - old_logprobs.detach(), real)
    advantages = _zero_padding(advantages.detach(), real)
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -weight * advantages * logprobs
    loss = aggregate(_weighted(per_token, weights, real), mask, loss_agg, denominator, max_len)
    with torch.no_grad():
        stats = _ratio_stats(log_ratio, ratio, weight != ratio, mask)
    return loss, stats


POLICY_LOSSES: dict[str, Callable[..., LossResult]] = {
    "vanilla": vanilla_policy_loss,
    "gspo": gspo_policy_loss,
    "cispo": cispo_policy_loss,
}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
    max_len: int | None = None,
) -> LossResult:
    """KL(pi || pi_ref) as a loss term (GRPO's KL in the loss, Shao et al. 2024), to be added as ``beta * loss``.

    Per-token :func:`rlgen.core.kl_estimate` (``k1``, ``k2`` = 0.5 (log r)^2, ``k3`` = Schulman's, GRPO's and TRL's)
    of the current log-probs (carry grad) against the reference (constant), aggregated like the policy loss (the
    sum is linear, so ``policy + beta * kl`` equals TRL's ``per_token_loss + beta * per_token_kl`` aggregated).
    verl ``kl_penalty`` / ``use_kl_loss``; OpenRLHF ``compute_approx_kl``.

    Returns ``(loss, stats)``; stats ``kl`` = mean estimate over real tokens.
    """
    real = mask.bool()
    per_token = core.kl_estimate(_zero_padding(logprobs, real), _zero_padding(ref_logprobs.detach(), real), kind)
    loss = aggregate(per_token, mask, loss_agg, denominator, max_len)
    return loss, {"kl": core.masked_mean(per_token, mask).detach()}
