"""Numeric tests of rlgen.estimators: advantages, policy losses, loss aggregation and the KL loss, each against a
plain Python loop or hand-computed values, with mask invariance, gradients and the global-denominator property."""

import math
import statistics

import pytest
import torch

from rlgen import core
from rlgen import estimators as E

N = 4  # completions per prompt


def _mask(lengths, T):
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


LENGTHS = [5, 3, 5, 1, 4, 5, 2, 5]  # right-padded rows of 2 groups of N = 4


def _batch(seed=0, T=5, kl_coef=0.1):
    """token rewards (score at the last real token - kl_coef * k1), scores, values, mask for 2 groups of N rows."""
    g = torch.Generator().manual_seed(seed)
    mask = _mask(LENGTHS, T)
    scores = torch.randn(len(LENGTHS), generator=g)
    logprobs, ref = -torch.rand(len(LENGTHS), T, generator=g), -torch.rand(len(LENGTHS), T, generator=g)
    token_rewards, _ = core.shape_rewards(scores, logprobs, ref, mask, kl_coef)
    return token_rewards, scores, torch.randn(len(LENGTHS), T, generator=g), mask


def _garbage(x, mask, value=float("nan")):
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def _rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]


def _whiten_loop(x, mask):
    """Plain-Python whitening over real tokens (mean 0, unbiased variance 1, eps 1e-8)."""
    vals = [float(x[b, t]) for b, ts in enumerate(_rows(mask)) for t in ts]
    mean, var = statistics.fmean(vals), statistics.variance(vals)
    out = torch.zeros_like(x)
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            out[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8)
    return out


def _returns_loop(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b, ts in enumerate(_rows(mask)):
        running = 0.0
        for t in reversed(ts):
            running = float(rewards[b, t]) + gamma * running
            out[b, t] = running
    return out


def _outcomes(token_rewards, mask):
    return [sum(float(token_rewards[b, t]) for t in ts) for b, ts in enumerate(_rows(mask))]


def _on_tokens(per_row, mask):
    return torch.tensor(per_row, dtype=torch.float32).unsqueeze(1) * mask


def _advantage(name, token_rewards, scores, values, mask, group_size=N, gamma=1.0, lam=0.95, reduce=None):
    return E.ADVANTAGES[name](token_rewards, scores, values, mask, group_size=group_size, gamma=gamma, lam=lam,
                              reduce=reduce)


# ------------------------------------------------------------------------------------------------- masked_whiten


def _split_reduce(parts, fn):
    """Simulate processes: record each part's [sum, sum_sq, count], then run ``fn`` on each part with a reduce that
    adds the other parts' records (an all-reduce of sums)."""
    records = []

    def record(t):
        records.append(t.clone())
        return t

    for part in parts:
        fn(part, record)
    total = torch.stack(records).sum(0)
    return [fn(part, lambda t: total) for part in parts]


def test_masked_whiten_with_reduce_whitens_over_the_global_batch():
    x, mask = torch.randn(6, 4) * 3 + 5, _mask([4, 2, 3, 4, 1, 4], 4)
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    outs = _split_reduce(halves, lambda p, r: core.masked_whiten(p[0], p[1], reduce=r))
    torch.testing.assert_close(torch.cat(outs), core.masked_whiten(x, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(outs), _whiten_loop(x, mask), rtol=1e-5, atol=1e-6)
    kept = _split_reduce(halves, lambda p, r: core.masked_whiten(p[0], p[1], shift_mean=False, reduce=r))
    torch.testing.assert_close(torch.cat(kept), core.masked_whiten(x, mask, shift_mean=False), rtol=1e-5, atol=1e-6)


def test_masked_whiten_with_reduce_ignores_padding_and_one_token_is_zero():
    x, mask = torch.randn(3, 4), _mask([4, 2, 3], 4)
    out = core.masked_whiten(_garbage(x, mask), mask, reduce=lambda t: t)
    torch.testing.assert_close(out, core.masked_whiten(x, mask), rtol=1e-5, atol=1e-6)
    one = core.masked_whiten(torch.tensor([[0.7, 9.0]]), torch.tensor([[1.0, 0.0]]), reduce=lambda t: t)
    assert one.tolist() == [[0.0, 0.0]]


# ----------------------------------------------------------------------------------------------------- advantages


def _group_loop(values, n, fn):
    out = []
    for i in range(0, len(values), n):
        group = values[i:i + n]
        out += [fn(v, j, group) for j, v in enumerate(group)]
    return out


def test_advantage_grpo_matches_a_loop():
    token_rewards, scores, values, mask = _batch()
    adv, returns, stats = _advantage("grpo", token_rewards, scores, values, mask)
    expected = _group_loop(_outcomes(token_rewards, mask), N,
                           lambda v, j, g: (v - statistics.fmean(g)) / (statistics.stdev(g) + 1e-4))
    torch.testing.assert_close(adv, _on_tokens(expected, mask))
    assert returns is None and stats["zero_std_groups"].item() == 0


def test_advantage_dr_grpo_matches_a_loop():
    token_rewards, scores, values, mask = _batch()
    adv, _, _ = _advantage("dr_grpo", token_rewards, scores, values, mask)
    expected = _group_loop(_outcomes(token_rewards, mask), N, lambda v, j, g: v - statistics.fmean(g))
    torch.testing.assert_close(adv, _on_tokens(expected, mask))


def test_advantage_rloo_matches_a_loop():
    token_rewards, scores, values, mask = _batch()
    adv, _, _ = _advantage("rloo", token_rewards, scores, values, mask)
    expected = _group_loop(_outcomes(token_rewards, mask), N,
                           lambda v, j, g: v - statistics.fmean(g[:j] + g[j + 1:]))
    torch.testing.assert_close(adv, _on_tokens(expected, mask))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_advantage_reinforce_pp_matches_a_loop(gamma):
    token_rewards, scores, values, mask = _batch()
    adv, returns, _ = _advantage("reinforce_pp", token_rewards, scores, values, mask, gamma=gamma)
    torch.testing.assert_close(adv, _whiten_loop(_returns_loop(token_rewards, mask, gamma), mask),
                               rtol=1e-5, atol=1e-6)
    assert returns is None


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_advantage_reinforce_pp_baseline_matches_a_loop(gamma):
    token_rewards, scores, values, mask = _batch()
    adv, _, _ = _advantage("reinforce_pp_baseline", token_rewards, scores, values, mask, gamma=gamma)
    baselines = _group_loop(scores.tolist(), N, lambda v, j, g: statistics.fmean(g))
    shaped = token_rewards.clone()
    for b, ts in enumerate(_rows(mask)):
        shaped[b, ts[-1]] -= baselines[b]
    torch.testing.assert_close(adv, _whiten_loop(_returns_loop(shaped, mask, gamma), mask), rtol=1e-5, atol=1e-6)


def test_advantage_reinforce_pp_baseline_without_kl_is_the_group_centred_score_whitened():
    """KL in the loss and gamma = 1: verl's compute_reinforce_plus_plus_baseline_outcome_advantage, i.e. the
    score minus its group mean on every real token, whitened over the batch."""
    _, scores, values, mask = _batch()
    token_rewards, _ = core.shape_rewards(scores, torch.zeros(8, 5), torch.zeros(8, 5), mask, 0.0)
    adv, _, _ = _advantage("reinforce_pp_baseline", token_rewards, scores, values, mask)
    centred = scores - scores.view(-1, N).mean(1).repeat_interleave(N)
    torch.testing.assert_close(adv, core.masked_whiten(centred.unsqueeze(1) * mask, mask), rtol=1e-5, atol=1e-6)


def test_advantage_gae_is_core_gae_and_needs_values():
    token_rewards, scores, values, mask = _batch()
    adv, returns, _ = _advantage("gae", token_rewards, scores, values, mask, group_size=1, gamma=0.99, lam=0.9)
    want_adv, want_returns = core.gae(token_rewards, values, mask, 0.99, 0.9)
    assert torch.equal(adv, want_adv) and torch.equal(returns, want_returns)
    with pytest.raises(ValueError, match="critic"):
        _advantage("gae", token_rewards, scores, None, mask)
    assert [name for name in E.ADVANTAGES if E.needs_critic(name)] == ["gae"]
    with pytest.raises(ValueError, match="unknown advantage"):
        E.needs_critic("ppo2")


def test_advantage_hand_computed_groups():
    """Scores [1, 0, 0, 0] and [2, 2, 2, 2]; KL off, so each row's return is its score."""
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    mask = torch.ones(8, 2)
    token_rewards, _ = core.shape_rewards(scores, torch.zeros(8, 2), torch.zeros(8, 2), mask, 0.0)
    grpo, _, stats = _advantage("grpo", token_rewards, scores, None, mask)
    std = 0.5  # sqrt((0.75^2 + 3 * 0.25^2) / 3)
    torch.testing.assert_close(grpo[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (std + 1e-4))
    assert stats["zero_std_groups"].item() == 1
    rloo, _, _ = _advantage("rloo", token_rewards, scores, None, mask)
    torch.testing.assert_close(rloo[:, 1], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))
    dr, _, _ = _advantage("dr_grpo", token_rewards, scores, None, mask)
    torch.testing.assert_close(dr[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


@pytest.mark.parametrize("name", sorted(E.ADVANTAGES))
def test_advantage_mask_invariance(name):
    token_rewards, scores, values, mask = _batch()
    adv, returns, _ = _advantage(name, token_rewards, scores, values, mask)
    adv2, returns2, _ = _advantage(name, _garbage(token_rewards, mask), scores, _garbage(values, mask, 1e30), mask)
    assert torch.equal(adv, adv2) and (adv2[mask == 0] == 0).all()
    assert (returns is None and returns2 is None) or torch.equal(returns, returns2)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_advantage_whitening_over_processes_equals_the_whole_batch(name):
    """Two 'processes' of one group each, reducing [sum, sum_sq, count], whiten as the whole batch does."""
    token_rewards, scores, values, mask = _batch()
    parts = [(token_rewards[i:i + N], scores[i:i + N], values[i:i + N], mask[i:i + N]) for i in (0, N)]
    outs = _split_reduce(parts, lambda p, r: _advantage(name, *p, reduce=r)[0])
    whole, _, _ = _advantage(name, token_rewards, scores, values, mask)
    torch.testing.assert_close(torch.cat(outs), whole, rtol=1e-5, atol=1e-6)
    alone = _advantage(name, *parts[0])[0]
    assert not torch.allclose(alone, whole[:N], atol=1e-3)  # the reduce matters


def test_advantage_group_batch_scale_over_processes():
    outcomes = torch.randn(8)
    parts = [outcomes[:N], outcomes[N:]]
    outs = _split_reduce(parts, lambda p, r: E.group_normalized_advantages(p, N, "batch", reduce=r))
    centred = outcomes - outcomes.view(-1, N).mean(1).repeat_interleave(N)
    torch.testing.assert_close(torch.cat(outs), centred / (outcomes.std() + 1e-4))


def test_advantage_refuses_bad_groups():
    token_rewards, scores, values, mask = _batch()
    with pytest.raises(ValueError, match="group_size=3"):
        _advantage("grpo", token_rewards, scores, values, mask, group_size=3)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        with pytest.raises(ValueError, match="group_size must be >= 2"):
            _advantage(name, token_rewards, scores, values, mask, group_size=1)
    with pytest.raises(ValueError, match="scale"):
        E.group_normalized_advantages(scores, N, "global")


def test_advantage_uses_the_kl_in_the_reward():
    """With the KL in the reward, outcome estimators see score - beta * summed KL (verl, TRL's RLOO)."""
    token_rewards, scores, values, mask = _batch(kl_coef=0.5)
    plain, _ = core.shape_rewards(scores, torch.zeros(8, 5), torch.zeros(8, 5), mask, 0.0)
    for name in ("grpo", "dr_grpo", "rloo"):
        with_kl = _advantage(name, token_rewards, scores, values, mask)[0]
        assert not torch.allclose(with_kl, _advantage(name, plain, scores, values, mask)[0])


# ---------------------------------------------------------------------------------------------------- aggregation


def _agg_loop(x, mask, mode, max_len=None):
    rows = [r for r in _rows(mask) if r]
    sums = [sum(float(x[b, t]) for t in ts) for b, ts in enumerate(_rows(mask)) if ts]
    if mode == "token-mean":
        return sum(sums) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-sum":
        return sum(sums) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(s / len(r) for s, r in zip(sums, rows)) / len(rows)
    return sum(sums) / (len(rows) * (max_len or mask.shape[1]))


def _loss_batch(seed=0, B=8, T=6):
    g = torch.Generator().manual_seed(seed)
    mask = _mask([6, 2, 4, 0, 6, 1, 3, 5][:B], T)  # row 3 has no real token
    return torch.randn(B, T, generator=g), mask


@pytest.mark.parametrize("mode", E.LOSS_AGGS)
def test_loss_agg_matches_a_loop(mode):
    x, mask = _loss_batch()
    got = E.aggregate(x, mask, mode)
    assert got.item() == pytest.approx(_agg_loop(x, mask, mode), rel=1e-6)
    assert E.aggregate(_garbage(x, mask), mask, mode).item() == got.item()
    if mode == "seq-mean-token-sum-norm":
        assert E.aggregate(x, mask, mode, max_len=20).item() == pytest.approx(_agg_loop(x, mask, mode, 20), rel=1e-6)


def test_loss_agg_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert E.aggregate(x, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert E.aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx(10 / 2)
    assert E.aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert E.aggregate(x, mask, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(10 / (2 * 5))
    for den in (None, 4.0):
        with pytest.raises(ValueError, match="loss aggregation"):
            E.aggregate(x, mask, "token-sum", denominator=den)


@pytest.mark.parametrize("mode", E.LOSS_AGGS)
def test_loss_agg_global_denominator_sums_micro_batches_and_ranks_to_the_global_loss(mode):
    """Split a batch over 2 'ranks' x 2 micro-batches of unequal lengths: with the global denominator the four
    losses (and their gradients) add up to the whole batch's loss; with per-micro-batch means they do not."""
    x, mask = _loss_batch()
    x.requires_grad_(True)
    whole = E.aggregate(x, mask, mode, max_len=8)
    (grad_whole,) = torch.autograd.grad(whole, x)
    pieces = [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)]  # rank 0: rows 0-3, rank 1: rows 4-7
    den = sum(E.loss_denominator(mask[s], mode, max_len=8) for s in pieces)
    assert den == E.loss_denominator(mask, mode, max_len=8)
    total = sum(E.aggregate(x[s], mask[s], mode, denominator=den) for s in pieces)
    (grad_total,) = torch.autograd.grad(total, x)
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_total, grad_whole)
    naive = sum(E.aggregate(x[s], mask[s], mode, max_len=8) for s in pieces) / len(pieces)
    assert naive.item() != pytest.approx(whole.item(), rel=1e-3)


# -------------------------------------------------------------------------------------------------- policy losses


def _policy_batch(seed=0, B=8, T=6, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = _mask([6, 2, 4, 1, 6, 1, 3, 5][:B], T)
    old = -torch.rand(B, T, generator=g) * 2
    logprobs = (old + spread * torch.randn(B, T, generator=g)).requires_grad_(True)
    advantages = torch.randn(B, generator=g).unsqueeze(1).expand(B, T) * mask  # constant per sequence
    return logprobs, old, advantages.contiguous(), mask


def _loss(name, logprobs, old, advantages, mask, **kw):
    kw = {"clip_low": 0.2, "clip_high": 0.28, **kw}
    return E.POLICY_LOSSES[name](logprobs, old, advantages, mask, **kw)


def _vanilla_loop(lp, old, adv, mask, low, high, dual):
    """Per-token loss and d loss / d logprob of PPO-clip (asymmetric, dual clip) with plain floats."""
    losses, grads = torch.zeros_like(lp), torch.zeros_like(lp)
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            a, r = float(adv[b, t]), math.exp(float(lp[b, t]) - float(old[b, t]))
            unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
            loss, grad = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
            if dual and a < 0 and loss > -a * dual:
                loss, grad = -a * dual, 0.0
            losses[b, t], grads[b, t] = loss, grad
    return losses, grads


@pytest.mark.parametrize("dual", [0.0, 1.5])
def test_policy_loss_vanilla_matches_a_loop_with_clip_higher_and_dual_clip(dual):
    logprobs, old, advantages, mask = _policy_batch(spread=0.8)
    loss, stats = _loss("vanilla", logprobs, old, advantages, mask, dual_clip=dual)
    (grad,) = torch.autograd.grad(loss, logprobs)
    losses, grads = _vanilla_loop(logprobs.detach(), old, advantages, mask, 0.2, 0.28, dual)
    n = mask.sum()
    assert loss.item() == pytest.approx(float(losses.sum() / n), rel=1e-5)
    torch.testing.assert_close(grad, grads / n)
    assert 0 < stats["clipfrac"].item() < 1 and (stats["dual_clipfrac"].item() > 0) == bool(dual)


def test_policy_loss_dual_clip_must_exceed_one():
    logprobs, old, advantages, mask = _policy_batch()
    with pytest.raises(ValueError, match="dual_clip"):
        _loss("vanilla", logprobs, old, advantages, mask, dual_clip=0.5)


def _gspo_sequence_level(lp, old, adv, mask, low, high):
    """GSPO as written in the paper (and TRL's importance_sampling_level="sequence" with loss_type="grpo"): one
    differentiable ratio per sequence, its clipped objective averaged over sequences."""
    losses = []
    for b, ts in enumerate(_rows(mask)):
        s = torch.exp(torch.stack([lp[b, t] - old[b, t] for t in ts]).mean())
        a = float(adv[b, ts[0]])
        losses.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - low, 1 + high)))
    return torch.stack(losses).mean()


def test_policy_loss_gspo_matches_the_sequence_level_objective_and_gradient():
    logprobs, old, advantages, mask = _policy_batch(spread=0.3)
    loss, stats = _loss("gspo", logprobs, old, advantages, mask, clip_low=0.05, clip_high=0.08,
                        loss_agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    want = _gspo_sequence_level(logprobs, old, advantages, mask, 0.05, 0.08)
    (want_grad,) = torch.autograd.grad(want, logprobs)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad, want_grad)
    assert 0 < stats["clipfrac"].item() < 1


def test_policy_loss_cispo_matches_a_loop():
    """-sg[clip(r, 1 - low, 1 + high)] * A * log pi: every token keeps a gradient, scaled by the clipped weight."""
    logprobs, old, advantages, mask = _policy_batch(spread=0.8)
    loss, stats = _loss("cispo", logprobs, old, advantages, mask, clip_low=1.0, clip_high=0.28)
    (grad,) = torch.autograd.grad(loss, logprobs)
    losses, grads = torch.zeros(8, 6), torch.zeros(8, 6)
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            lp = float(logprobs.detach()[b, t])
            w = min(math.exp(lp - float(old[b, t])), 1.28)
            losses[b, t] = -w * float(advantages[b, t]) * lp
            grads[b, t] = -w * float(advantages[b, t])
    n = mask.sum()
    assert loss.item() == pytest.approx(float(losses.sum() / n), rel=1e-5)
    torch.testing.assert_close(grad, grads / n)
    assert stats["clipfrac"].item() > 0


@pytest.mark.parametrize("name", sorted(E.POLICY_LOSSES))
@pytest.mark.parametrize("mode", E.LOSS_AGGS)
def test_policy_loss_mask_invariance_and_weights(name, mode):
    logprobs, old, advantages, mask = _policy_batch()
    weights = torch.rand(8, 6) + 0.5
    loss, stats = _loss(name, logprobs, old, advantages, mask, loss_agg=mode, weights=weights)
    (grad,) = torch.autograd.grad(loss, logprobs)
    dirty = _garbage(logprobs.detach(), mask).requires_grad_(True)
    loss2, stats2 = _loss(name, dirty, _garbage(old, mask, -1e30), _garbage(advantages, mask, 1e30), mask,
                          loss_agg=mode, weights=_garbage(weights, mask))
    (grad2,) = torch.autograd.grad(loss2, dirty)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and (grad2[mask == 0] == 0).all()
    assert all(torch.equal(stats[k], stats2[k]) for k in stats)
    assert {"approxkl", "clipfrac", "ratio_mean", "ratio_max"} <= set(stats)
    unweighted, _ = _loss(name, logprobs, old, advantages, mask, loss_agg=mode)
    assert loss.item() != pytest.approx(unweighted.item(), rel=1e-4)


@pytest.mark.parametrize("name", sorted(E.POLICY_LOSSES))
def test_policy_loss_on_policy_gradient_is_the_policy_gradient(name):
    """At ratio 1 (nothing clipped) every loss has the REINFORCE gradient -A / n per token."""
    logprobs, old, advantages, mask = _policy_batch(spread=0.0)
    loss, _ = _loss(name, logprobs, old, advantages, mask, loss_agg="token-mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -advantages / mask.sum())


# ------------------------------------------------------------------------------------------------------- KL loss


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_estimator_kl_loss_matches_a_loop(kind):
    logprobs, ref, _, mask = _policy_batch()
    loss, stats = E.kl_loss(logprobs, ref, mask, kind)
    (grad,) = torch.autograd.grad(loss, logprobs)
    per, dper = torch.zeros(8, 6), torch.zeros(8, 6)
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            d = float(logprobs.detach()[b, t]) - float(ref[b, t])  # log pi - log pi_ref
            per[b, t], dper[b, t] = {"k1": (d, 1.0), "k2": (0.5 * d * d, d),
                                     "k3": (math.exp(-d) - 1 + d, 1 - math.exp(-d))}[kind]
    n = mask.sum()
    assert loss.item() == pytest.approx(float(per.sum() / n), rel=1e-5)
    assert stats["kl"].item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, dper / n)
    dirty = _garbage(logprobs.detach(), mask).requires_grad_(True)
    loss2, _ = E.kl_loss(dirty, _garbage(ref, mask), mask, kind, "seq-mean-token-mean")
    assert torch.equal(loss2, E.kl_loss(logprobs, ref, mask, kind, "seq-mean-token-mean")[0])


# ------------------------------------------------------------------------------------------ TRL 1.16 equality
# TRL's own code runs here: a GRPOTrainer / RLOOTrainer made with object.__new__, given only the attributes that
# _generate_and_score_completions and _compute_loss read, with generation, reward functions and the model's
# per-token log-probs replaced by fixed tensors. Gradients are taken with respect to the log-probs, which carry
# every parameter's gradient by the chain rule.

TRL_LENGTHS = [5, 3, 5, 1, 4, 5, 2, 5]  # TRL's completion mask: right padding after each completion's length
TRL_MAX_LEN = 7  # max_completion_length, Dr.GRPO's constant (larger than this batch's T = 5)


def _trl_trainer(cls, scores, logps, ref_logps, **attrs):
    import collections
    import types

    trainer = object.__new__(cls)
    model, ref_model = (types.SimpleNamespace(training=mode, is_gradient_checkpointing=False) for mode in (True, False))
    state = {"policy": logps}

    def per_token_logps_and_entropies(m, *args, **kwargs):
        logps = ref_logps if m is ref_model else state["policy"]
        return logps, torch.zeros_like(logps), None

    B = len(TRL_LENGTHS)
    completions = [[5] * n for n in TRL_LENGTHS]
    generate = {"GRPOTrainer": lambda prompts: ([[1]] * B, completions, None, ["c"] * B, None, {}, None, None),
                "RLOOTrainer": lambda prompts: ([[1]] * B, completions, ["c"] * B)}[cls.__name__]
    trainer.__dict__.update(
        model=model, ref_model=ref_model, _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        _generate=generate, _calculate_rewards=lambda *args: torch.as_tensor(scores, dtype=torch.float32)[:, None],
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                          gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                          gather_for_metrics=lambda x: x),
        args=types.SimpleNamespace(per_device_train_batch_size=B, steps_per_generation=1,
                                   gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None,
                                   use_bias_correction_kl=False, delta=None),
        environment_factories=None, tools=None, environments=None, _tokenizer=types.SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None, mask_truncated_completions=False, num_iterations=1, use_vllm=False,
        vllm_importance_sampling_correction=False, multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1), reward_func_names=["r"], log_multimodal=False, _pending_extra_logs={},
        _pending_metrics={}, _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": collections.defaultdict(list), "advantages": [],
               "extra": collections.defaultdict(list), "images": []},
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        normalize_advantages=False, reward_clip_range=None, num_generations=N, max_completion_length=TRL_MAX_LEN,
        epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
    )
    trainer.__dict__.update(attrs)
    return trainer, state


def _trl_batch(seed=0, T=5, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    B = len(TRL_LENGTHS)
    scores = torch.randn(B, generator=g)
    scores[N:] = torch.tensor([1.0, 0.0, 1.0, 1.0])  # a binary group beside a continuous one
    old = -torch.rand(B, T, generator=g) * 2
    logps = old + spread * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    return scores, old, logps, ref, _mask(TRL_LENGTHS, T)


def _trl_loss_and_grad(trainer, state, inputs, logps, rows=None):
    """TRL's _compute_loss over ``rows`` (all, or one micro-batch each) and the gradient wrt the log-probs."""
    leaf = logps.clone().requires_grad_(True)
    total = 0.0
    for idx in rows or [slice(None)]:
        state["policy"] = leaf[idx]
        part = {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in inputs.items()}
        total = total + trainer._compute_loss(trainer.model, part)
    (grad,) = torch.autograd.grad(total, leaf)
    return total.detach(), grad


RLGEN_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "token-mean", "cispo": "token-mean"}


def _rlgen_grpo_advantages(scale, scores, mask):
    token_rewards, _ = core.shape_rewards(scores, torch.zeros_like(mask), torch.zeros_like(mask), mask, 0.0)
    if scale == "batch":  # TRL's scale_rewards="batch": group mean, batch std
        return E.group_normalized_advantages(scores, N, "batch").unsqueeze(1) * mask
    return _advantage({"group": "grpo", "none": "dr_grpo"}[scale], token_rewards, scores, None, mask)[0]


def _rlgen_loss_and_grad(policy_loss, logps, old, adv, ref, mask, loss_type, beta, rows=None, weights=None,
                         clip_low=0.2, clip_high=0.28):
    mode = RLGEN_AGG[loss_type]
    global_den = loss_type != "bnpo"  # TRL's bnpo is a mean per micro-batch; the other types are global
    den = E.loss_denominator(mask, mode, max_len=TRL_MAX_LEN) if rows and global_den else None
    leaf = logps.clone().requires_grad_(True)
    total = 0.0
    for idx in rows or [slice(None)]:
        w = None if weights is None else weights[idx]
        pg, _ = E.POLICY_LOSSES[policy_loss](leaf[idx], old[idx], adv[idx], mask[idx], clip_low=clip_low,
                                             clip_high=clip_high, loss_agg=mode, denominator=den, weights=w,
                                             max_len=TRL_MAX_LEN)
        kl, _ = E.kl_loss(leaf[idx], ref[idx], mask[idx], "k3", mode, den, max_len=TRL_MAX_LEN)
        total = total + pg + beta * kl
    (grad,) = torch.autograd.grad(total, leaf)
    return total.detach(), grad


def _assert_same(trl, rlgen):
    torch.testing.assert_close(rlgen[0], trl[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rlgen[1], trl[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_estimator_grpo_advantages_loss_and_gradient_equal_trl(loss_type, scale):
    """rlgen's grpo / dr_grpo advantages, vanilla clip-higher loss and k3 KL loss (beta 0.04) against TRL 1.16's
    GRPOTrainer for each loss_type and scale_rewards, off-policy (ratios clipped on both sides)."""
    from trl import GRPOTrainer

    scores, old, logps, ref, mask = _trl_batch()
    trainer, state = _trl_trainer(GRPOTrainer, scores, old, ref, loss_type=loss_type, scale_rewards=scale,
                                  beta=0.04)
    inputs = trainer._generate_and_score_completions([{"prompt": "p"}] * len(TRL_LENGTHS))
    assert torch.equal(inputs["completion_mask"].float(), mask)
    adv = _rlgen_grpo_advantages(scale, scores, mask)
    torch.testing.assert_close(adv[:, 0], inputs["advantages"], rtol=1e-6, atol=1e-6)
    inputs.update(old_per_token_logps=old, ref_per_token_logps=ref)
    trl = _trl_loss_and_grad(trainer, state, inputs, logps)
    rlgen = _rlgen_loss_and_grad("vanilla", logps, old, adv, ref, mask, loss_type, beta=0.04)
    _assert_same(trl, rlgen)
    ratio = (logps - old).exp()[mask.bool()]
    assert (ratio > 1.28).any() and (ratio < 0.8).any()  # both clip bounds are exercised


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_estimator_grpo_global_normalisation_over_micro_batches_equals_trl(loss_type):
    """Two accumulation micro-batches: TRL's grpo, dr_grpo and dapo normalise over the whole generation batch, as
    rlgen does with the global denominator (TRL's bnpo does not: a token mean per micro-batch)."""
    from trl import GRPOTrainer

    scores, old, logps, ref, mask = _trl_batch(seed=1)
    trainer, state = _trl_trainer(GRPOTrainer, scores, old, ref, loss_type=loss_type, scale_rewards="group",
                                  beta=0.04, current_gradient_accumulation_steps=2)
    inputs = trainer._generate_and_score_completions([{"prompt": "p"}] * len(TRL_LENGTHS))
    trainer.args.steps_per_generation = 2  # the generation batch spans the 2 micro-batches
    inputs.update(old_per_token_logps=old, ref_per_token_logps=ref)
    rows = [slice(0, N), slice(N, 2 * N)]
    trl = _trl_loss_and_grad(trainer, state, inputs, logps, rows)
    adv = _rlgen_grpo_advantages("group", scores, mask)
    _assert_same(trl, _rlgen_loss_and_grad("vanilla", logps, old, adv, ref, mask, loss_type, 0.04, rows))


def test_estimator_gspo_and_cispo_equal_trl():
    """gspo = TRL importance_sampling_level="sequence" with loss_type="grpo"; cispo = TRL loss_type="cispo" (its
    epsilon_high is the weight's cap, 1 + clip_high, with no lower bound: clip_low = 1), with vLLM-style
    importance weights on the per-token loss."""
    from trl import GRPOTrainer

    scores, old, _, ref, mask = _trl_batch(seed=2)
    logps = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    trainer, state = _trl_trainer(GRPOTrainer, scores, old, ref, loss_type="grpo", scale_rewards="group", beta=0.04,
                                  importance_sampling_level="sequence", epsilon_low=0.01, epsilon_high=0.02)
    inputs = trainer._generate_and_score_completions([{"prompt": "p"}] * len(TRL_LENGTHS))
    inputs.update(old_per_token_logps=old, ref_per_token_logps=ref)
    adv = _rlgen_grpo_advantages("group", scores, mask)
    trl = _trl_loss_and_grad(trainer, state, inputs, logps)
    _assert_same(trl, _rlgen_loss_and_grad("gspo", logps, old, adv, ref, mask, "grpo", 0.04,
                                           clip_low=0.01, clip_high=0.02))
    seq_ratio = ((logps - old) * mask).sum(1).div(mask.sum(1)).exp()
    assert ((seq_ratio > 1.02) | (seq_ratio < 0.99)).any()

    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    logps = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))
    trainer.__dict__.update(loss_type="cispo", importance_sampling_level="token", epsilon_high=1.28, use_vllm=True,
                            vllm_importance_sampling_correction=True)
    inputs["importance_sampling_ratio"] = weights
    trl = _trl_loss_and_grad(trainer, state, inputs, logps)
    _assert_same(trl, _rlgen_loss_and_grad("cispo", logps, old, adv, ref, mask, "cispo", 0.04, weights=weights,
                                           clip_low=1.0, clip_high=0.28))
    assert ((logps - old).exp()[mask.bool()] > 1.28).any()


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_estimator_rloo_advantages_equal_trl_rloo(beta):
    """rloo with the KL (k1, summed over the completion) in the reward = TRL 1.16 RLOOTrainer's advantages; on
    policy, vanilla + seq-mean-token-sum has TRL RLOO's gradient (TRL's ratio is one per sequence, the product of
    the token ratios, so the loss values differ and, off-policy, the clipping)."""
    from trl import RLOOTrainer

    scores, old, _, ref, mask = _trl_batch(seed=6)
    trainer, state = _trl_trainer(RLOOTrainer, scores, old, ref, beta=beta)
    inputs = trainer._generate_and_score_completions([{"prompt": "p"}] * len(TRL_LENGTHS))
    token_rewards, _ = core.shape_rewards(scores, old, ref, mask, beta, "k1")
    adv, returns, _ = _advantage("rloo", token_rewards, scores, None, mask)
    torch.testing.assert_close(adv[:, 0], inputs["advantages"], rtol=1e-6, atol=1e-6)
    trl = _trl_loss_and_grad(trainer, state, inputs, old)
    leaf = old.clone().requires_grad_(True)
    loss, _ = E.vanilla_policy_loss(leaf, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                    loss_agg="seq-mean-token-sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(grad, trl[1], rtol=1e-5, atol=1e-7)  # the values differ: -mean A vs -mean A * |y|
