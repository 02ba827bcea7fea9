"""Numeric tests for rlgen.core against naive Python loops and hand-computed values."""

import math

import pytest
import torch

from rlgen import core

torch.set_num_threads(1)

D = torch.float64


def rand_mask(batch, length, seed=0):
    """Right-padded 0/1 mask with varied lengths, including a full row and at least 2 real tokens per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(D)


def pad_garbage(x, extra, value=None, seed=1):
    """Append ``extra`` columns of garbage (random huge values, or ``value``) to a [B, T] tensor."""
    g = torch.Generator().manual_seed(seed)
    if value is None:
        junk = torch.randn(x.shape[0], extra, generator=g, dtype=D) * 1e3
    else:
        junk = torch.full((x.shape[0], extra), value, dtype=D)
    return torch.cat([x, junk.to(x.dtype)], dim=1)


def pad_mask(mask, extra):
    return torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)


def real_positions(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t] != 0] for b in range(mask.shape[0])]


def naive_mean(x, mask):
    vals = [float(x[b, t]) for b, ts in enumerate(real_positions(mask)) for t in ts]
    return sum(vals) / len(vals)


# --- log-probs and entropy ---------------------------------------------------------------------------


def naive_log_softmax(row, temperature):
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_match_manual_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=D) * 3
    tokens = torch.randint(0, 5, (2, 3))
    out = core.logprobs_from_logits(logits, tokens, temperature=temperature)
    assert out.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = naive_log_softmax(logits[b, t].tolist(), temperature)[int(tokens[b, t])]
            assert out[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_logprobs_temperature_changes_result():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6, dtype=D)
    tokens = torch.randint(0, 6, (1, 4))
    assert not torch.allclose(
        core.logprobs_from_logits(logits, tokens), core.logprobs_from_logits(logits, tokens, temperature=0.5)
    )


def test_logprobs_bfloat16_upcast():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 50) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 4))
    out = core.logprobs_from_logits(logits, tokens, temperature=0.8)
    assert out.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            expected = naive_log_softmax(logits[b, t].double().tolist(), 0.8)[int(tokens[b, t])]
            assert out[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_logprobs_rejects_bad_temperature():
    with pytest.raises(ValueError):
        core.logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_of_uniform_is_log_vocab():
    logits = torch.full((2, 3, 7), 1.3, dtype=D)
    out = core.entropy_from_logits(logits)
    assert torch.allclose(out, torch.full((2, 3), math.log(7), dtype=D), atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_matches_loop(temperature):
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, dtype=D) * 2
    out = core.entropy_from_logits(logits, temperature=temperature)
    for b in range(2):
        for t in range(3):
            logp = naive_log_softmax(logits[b, t].tolist(), temperature)
            expected = -sum(math.exp(lp) * lp for lp in logp)
            assert out[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_entropy_of_one_hot_is_zero_and_bf16_path():
    logits = torch.full((1, 2, 4), -1e4)
    logits[..., 2] = 10.0
    assert torch.allclose(core.entropy_from_logits(logits), torch.zeros(1, 2), atol=1e-6)
    torch.manual_seed(2)
    half = torch.randn(2, 3, 20).to(torch.bfloat16)
    assert torch.allclose(core.entropy_from_logits(half), core.entropy_from_logits(half.float()), atol=1e-5)


# --- masked statistics -------------------------------------------------------------------------------


def test_masked_sum_and_mean_match_loop():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=D)
    mask = rand_mask(4, 6)
    positions = real_positions(mask)
    total = sum(float(x[b, t]) for b, ts in enumerate(positions) for t in ts)
    assert core.masked_sum(x, mask).item() == pytest.approx(total, abs=1e-12)
    assert core.masked_mean(x, mask).item() == pytest.approx(naive_mean(x, mask), abs=1e-12)
    row_means = core.masked_mean(x, mask, dim=1)
    row_sums = core.masked_sum(x, mask, dim=1)
    for b, ts in enumerate(positions):
        assert row_sums[b].item() == pytest.approx(sum(float(x[b, t]) for t in ts), abs=1e-12)
        assert row_means[b].item() == pytest.approx(sum(float(x[b, t]) for t in ts) / len(ts), abs=1e-12)


def test_masked_mean_ignores_inf_and_nan_padding():
    x = torch.tensor([[1.0, 2.0, float("inf")], [3.0, float("nan"), float("-inf")]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert core.masked_sum(x, mask.bool()).item() == pytest.approx(6.0)


def test_masked_mean_of_empty_mask_is_nan():
    assert math.isnan(core.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item())


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(unbiased):
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=D) * 4 + 1
    mask = rand_mask(3, 5, seed=3)
    vals = [float(x[b, t]) for b, ts in enumerate(real_positions(mask)) for t in ts]
    mu = sum(vals) / len(vals)
    ss = sum((v - mu) ** 2 for v in vals)
    expected = ss / (len(vals) - 1) if unbiased else ss / len(vals)
    assert core.masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(expected, abs=1e-12)


def test_masked_var_hand_value():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert core.masked_var(x, mask).item() == pytest.approx(1.0)
    assert core.masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_of_one_value_is_zero_and_of_none_nan(unbiased):
    x = torch.tensor([[2.5, 7.0, -3.0, 9.0]], dtype=D)
    assert core.masked_var(x, torch.tensor([[0, 1, 0, 0]]), unbiased=unbiased).item() == 0.0
    assert math.isnan(core.masked_var(x, torch.zeros(1, 4), unbiased=unbiased).item())


def test_masked_whiten_of_one_real_token():
    """A batch of one single-token completion (batch_size 1, immediate EOS): its mean is removed, nothing else."""
    x = torch.tensor([[0.7, 5.0], [99.0, -4.0]], dtype=D)
    mask = torch.tensor([[1, 0], [0, 0]])
    assert core.masked_whiten(x, mask).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert core.masked_whiten(x, mask, shift_mean=False).tolist() == [[0.7, 0.0], [0.0, 0.0]]


def test_masked_whiten_mean_zero_var_one_and_zero_padding():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=D) * 5 + 3
    mask = rand_mask(4, 7, seed=4)
    out = core.masked_whiten(x, mask)
    vals = [float(out[b, t]) for b, ts in enumerate(real_positions(mask)) for t in ts]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    assert mu == pytest.approx(0.0, abs=1e-12)
    assert var == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out[mask == 0] == 0)


def test_masked_whiten_without_shift_keeps_mean():
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0]], dtype=D)
    mask = torch.ones(1, 4)
    out = core.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    std = math.sqrt(sum((v - 4.0) ** 2 for v in [1.0, 3.0, 5.0, 7.0]) / 3)
    expected = [(v - 4.0) / std + 4.0 for v in [1.0, 3.0, 5.0, 7.0]]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_masked_whiten_padding_invariance():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=D)
    mask = rand_mask(3, 5, seed=5)
    out = core.masked_whiten(x, mask)
    padded = core.masked_whiten(pad_garbage(x, 3), pad_mask(mask, 3))
    assert torch.allclose(padded[:, :5], out, atol=1e-12)
    assert torch.all(padded[:, 5:] == 0)


# --- KL estimators and reward shaping ----------------------------------------------------------------


def naive_kl(lp, lq, kind):
    log_r = lq - lp
    return {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": (math.exp(log_r) - 1) - log_r,
        "abs": abs(log_r),
    }[kind]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_estimate_matches_formula(kind):
    torch.manual_seed(0)
    lp = -torch.rand(2, 4, dtype=D) * 3
    lq = -torch.rand(2, 4, dtype=D) * 3
    out = core.kl_estimate(lp, lq, kind)
    for b in range(2):
        for t in range(4):
            assert out[b, t].item() == pytest.approx(
                naive_kl(float(lp[b, t]), float(lq[b, t]), kind), abs=1e-12
            )


def test_kl_k3_nonnegative_and_zero_when_equal():
    torch.manual_seed(0)
    lp = -torch.rand(50, 20, dtype=D) * 5
    lq = -torch.rand(50, 20, dtype=D) * 5
    assert torch.all(core.kl_estimate(lp, lq, "k3") >= 0)
    assert torch.all(core.kl_estimate(lp, lp, "k3") == 0)
    assert core.kl_estimate(torch.tensor([-1.0]), torch.tensor([-2.0]), "k3").item() == pytest.approx(
        math.exp(-1) - 1 + 1
    )


def test_kl_unknown_kind():
    with pytest.raises(ValueError):
        core.kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_shape_rewards_matches_loop(kind):
    torch.manual_seed(0)
    b, t, beta = 4, 6, 0.05
    lp = -torch.rand(b, t, dtype=D) * 3
    lq = -torch.rand(b, t, dtype=D) * 3
    mask = rand_mask(b, t, seed=6)
    mask[2] = 0  # an empty response gets no score
    scores = torch.tensor([1.5, -2.0, 3.0, 0.25], dtype=D)
    rewards, kl = core.shape_rewards(scores, lp, lq, mask, beta, kl_kind=kind)
    for i, ts in enumerate(real_positions(mask)):
        for j in range(t):
            if j in ts:
                k = naive_kl(float(lp[i, j]), float(lq[i, j]), kind)
                expected = -beta * k + (float(scores[i]) if j == ts[-1] else 0.0)
            else:
                k, expected = 0.0, 0.0
            assert kl[i, j].item() == pytest.approx(k, abs=1e-12)
            assert rewards[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_shape_rewards_hand_values_and_padding_invariance():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=D)
    lq = torch.tensor([[-1.5, -1.0, -9.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    rewards, kl = core.shape_rewards(torch.tensor([10.0], dtype=D), lp, lq, mask, kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 10.1, 0.0])
    r2, k2 = core.shape_rewards(
        torch.tensor([10.0], dtype=D), pad_garbage(lp, 2), pad_garbage(lq, 2, seed=2), pad_mask(mask, 2), 0.1
    )
    assert torch.equal(r2[:, :3], rewards) and torch.all(r2[:, 3:] == 0)
    assert torch.equal(k2[:, :3], kl)


# --- GAE and returns ---------------------------------------------------------------------------------


def naive_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * rewards.shape[1] for _ in range(rewards.shape[0])]
    ret = [[0.0] * rewards.shape[1] for _ in range(rewards.shape[0])]
    for b, ts in enumerate(real_positions(mask)):
        r = [float(rewards[b, t]) for t in ts]
        v = [float(values[b, t]) for t in ts]
        last = 0.0
        for i in reversed(range(len(ts))):
            next_v = v[i + 1] if i + 1 < len(ts) else 0.0
            delta = r[i] + gamma * next_v - v[i]
            last = delta + gamma * lam * last
            adv[b][ts[i]] = last
            ret[b][ts[i]] = last + v[i]
    return torch.tensor(adv, dtype=D), torch.tensor(ret, dtype=D)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
    torch.manual_seed(0)
    rewards = torch.randn(5, 8, dtype=D)
    values = torch.randn(5, 8, dtype=D)
    mask = rand_mask(5, 8, seed=7)
    adv, ret = core.gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = naive_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, exp_adv, atol=1e-12)
    assert torch.allclose(ret, exp_ret, atol=1e-12)


def test_gae_lam1_gamma1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, -0.1, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=D)
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0], [0.2, 0.3, 9.0, 9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=D)
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.9 - 0.5, 1.9 - 1.0, 2.0 - 1.5, 0.0])
    assert adv[1].tolist() == pytest.approx([2.0 - 0.2, 1.0 - 0.3, 0.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.9, 1.9, 2.0, 0.0])
    assert ret[1].tolist() == pytest.approx([2.0, 1.0, 0.0, 0.0])


def test_gae_hand_value_one_step_lookahead():
    # lam = 0: A_t = r_t + gamma * V_{t+1} - V_t, with V after the last token = 0.
    rewards = torch.tensor([[1.0, 2.0]], dtype=D)
    values = torch.tensor([[0.5, 4.0]], dtype=D)
    adv, _ = core.gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    assert adv[0].tolist() == pytest.approx([1.0 + 0.5 * 4.0 - 0.5, 2.0 - 4.0])


def test_gae_padding_invariance():
    torch.manual_seed(0)
    rewards = torch.randn(4, 6, dtype=D)
    values = torch.randn(4, 6, dtype=D)
    mask = rand_mask(4, 6, seed=8)
    adv, ret = core.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    adv2, ret2 = core.gae(
        pad_garbage(rewards, 4), pad_garbage(values, 4, seed=3), pad_mask(mask, 4), 0.95, 0.9
    )
    assert torch.equal(adv2[:, :6], adv) and torch.equal(ret2[:, :6], ret)
    assert torch.all(adv2[:, 6:] == 0) and torch.all(ret2[:, 6:] == 0)
    # Garbage (even inf) written into the existing padding changes nothing either.
    r3 = torch.where(mask.bool(), rewards, torch.tensor(float("inf"), dtype=D))
    v3 = torch.where(mask.bool(), values, torch.tensor(-1e9, dtype=D))
    adv3, ret3 = core.gae(r3, v3, mask, gamma=0.95, lam=0.9)
    assert torch.equal(adv3, adv) and torch.equal(ret3, ret)


def test_gae_skips_masked_positions_inside_rows():
    # Left padding and an interior hole: masked steps are skipped, so V_{t+1} is the next real token's value.
    torch.manual_seed(0)
    rewards = torch.randn(2, 6, dtype=D)
    values = torch.randn(2, 6, dtype=D)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]], dtype=D)
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    exp_adv, exp_ret = naive_gae(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, exp_adv, atol=1e-12) and torch.allclose(ret, exp_ret, atol=1e-12)
    returns = core.discounted_returns(rewards, mask, gamma=0.9)
    assert returns[1, 1].item() == pytest.approx(
        float(rewards[1, 1]) + 0.9 * float(rewards[1, 3]) + 0.81 * float(rewards[1, 4]), abs=1e-12
    )
    assert returns[1, 2].item() == 0.0


def test_gae_has_no_grad():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = core.gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_loop_and_padding(gamma):
    torch.manual_seed(0)
    rewards = torch.randn(4, 6, dtype=D)
    mask = rand_mask(4, 6, seed=9)
    out = core.discounted_returns(rewards, mask, gamma=gamma)
    for b, ts in enumerate(real_positions(mask)):
        g = 0.0
        expected = [0.0] * 6
        for t in reversed(ts):
            g = float(rewards[b, t]) + gamma * g
            expected[t] = g
        assert out[b].tolist() == pytest.approx(expected, abs=1e-12)
    padded = core.discounted_returns(pad_garbage(rewards, 3), pad_mask(mask, 3), gamma=gamma)
    assert torch.equal(padded[:, :6], out) and torch.all(padded[:, 6:] == 0)


# --- PPO losses --------------------------------------------------------------------------------------


def naive_ppo_policy(lp, old, adv, mask, clip):
    losses, clipped_count, kls, ratios = [], 0, [], []
    for b, ts in enumerate(real_positions(mask)):
        for t in ts:
            ratio = math.exp(float(lp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip), 1 + clip)
            losses.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            kls.append(0.5 * (float(lp[b, t]) - float(old[b, t])) ** 2)
            ratios.append(ratio)
    n = len(losses)
    return sum(losses) / n, clipped_count / n, sum(kls) / n, sum(ratios) / n, max(ratios)


def ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, weights=None):
    """PPO's clipped policy loss as the RL loop runs it: the vanilla estimator with one clip range."""
    from rlgen.estimators import vanilla_policy_loss

    return vanilla_policy_loss(logprobs, old, advantages, mask, clip_low=clip_range, clip_high=clip_range,
                               weights=weights)


def test_ppo_policy_loss_matches_loop():
    torch.manual_seed(0)
    lp = -torch.rand(4, 7, dtype=D) * 2
    old = lp + torch.randn(4, 7, dtype=D) * 0.3
    adv = torch.randn(4, 7, dtype=D)
    mask = rand_mask(4, 7, seed=10)
    loss, stats = ppo_policy_loss(lp, old, adv, mask, clip_range=0.2)
    exp_loss, exp_clipfrac, exp_kl, exp_rmean, exp_rmax = naive_ppo_policy(lp, old, adv, mask, 0.2)
    assert 0 < exp_clipfrac < 1  # the data exercises both branches
    assert loss.item() == pytest.approx(exp_loss, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(exp_clipfrac, abs=1e-12)
    assert stats["approxkl"].item() == pytest.approx(exp_kl, abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(exp_rmean, abs=1e-12)
    assert stats["ratio_max"].item() == pytest.approx(exp_rmax, abs=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize(
    ("ratio", "adv", "expected_loss", "expected_clipfrac"),
    [
        (1.5, 2.0, -2.0 * 1.2, 1.0),  # gain capped at 1 + eps
        (1.5, -2.0, 2.0 * 1.5, 0.0),  # pessimistic: the unclipped (worse) term stays
        (0.5, -2.0, 2.0 * 0.8, 1.0),  # loss floor at 1 - eps
        (0.5, 2.0, -2.0 * 0.5, 0.0),
        (1.1, 3.0, -3.0 * 1.1, 0.0),  # inside the range: no clipping
    ],
)
def test_ppo_policy_clip_hand_values(ratio, adv, expected_loss, expected_clipfrac):
    old = torch.tensor([[-1.0]], dtype=D)
    lp = (old + math.log(ratio)).requires_grad_()
    loss, stats = ppo_policy_loss(lp, old, torch.tensor([[adv]], dtype=D), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(expected_loss)
    assert stats["clipfrac"].item() == expected_clipfrac
    loss.backward()
    # Clipped tokens pass no gradient; unclipped ones give d(-A * r)/d logp = -A * r.
    expected_grad = 0.0 if expected_clipfrac else -adv * ratio
    assert lp.grad.item() == pytest.approx(expected_grad)


def test_ppo_policy_loss_weights_multiply_each_tokens_term():
    """With importance weights w, the loss is mean_t w_t * max(...) over real tokens (a loop); stats unchanged."""
    torch.manual_seed(3)
    lp = -torch.rand(4, 6, dtype=D)
    old = lp + torch.randn(4, 6, dtype=D) * 0.3
    adv = torch.randn(4, 6, dtype=D)
    w = torch.rand(4, 6, dtype=D) * 2
    mask = rand_mask(4, 6, seed=12)
    loss, stats = ppo_policy_loss(lp, old, adv, mask, 0.2, weights=w)
    terms = []
    for b, ts in enumerate(real_positions(mask)):
        for t in ts:
            r = math.exp(lp[b, t] - old[b, t])
            terms.append(w[b, t].item() * max(-adv[b, t].item() * r, -adv[b, t].item() * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    _, plain = ppo_policy_loss(lp, old, adv, mask, 0.2)
    assert all(torch.equal(stats[k], plain[k]) for k in stats)
    ones, _ = ppo_policy_loss(lp, old, adv, mask, 0.2, weights=torch.ones_like(w))
    assert ones.item() == pytest.approx(ppo_policy_loss(lp, old, adv, mask, 0.2)[0].item(), abs=1e-15)
    # padding: garbage (inf) weights there change nothing
    padded, _ = ppo_policy_loss(pad_garbage(lp, 3), pad_garbage(old, 3, seed=2), pad_garbage(adv, 3),
                                     pad_mask(mask, 3), 0.2, weights=pad_garbage(w, 3, value=float("inf")))
    assert padded.item() == pytest.approx(loss.item(), abs=1e-12)


def test_truncated_importance_weights_hand_values():
    """ratio = exp(trainer - engine): [2, 0.5, 4] with cap 3 -> [2, 0.5, 3], one of three truncated; padding 0."""
    engine = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=D)
    trainer = engine + torch.log(torch.tensor([[2.0, 0.5, 4.0, 100.0]], dtype=D))
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, stats = core.truncated_importance_weights(trainer, engine, mask, cap=3.0)
    assert weights.tolist()[0] == pytest.approx([2.0, 0.5, 3.0, 0.0], abs=1e-6)
    assert stats["truncated_fraction"].item() == pytest.approx(1 / 3)
    assert stats["logprob_diff_mean"].item() == pytest.approx((math.log(2) + math.log(2) + math.log(4)) / 3, abs=1e-6)
    assert stats["logprob_diff_max"].item() == pytest.approx(math.log(4), abs=1e-6)  # padding's log(100) ignored
    off, off_stats = core.truncated_importance_weights(trainer, engine, mask, cap=0.0)
    assert off.tolist()[0] == [1.0, 1.0, 1.0, 0.0] and off_stats["truncated_fraction"].item() == 0.0
    assert off_stats["logprob_diff_max"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_truncated_importance_weights_mask_invariance():
    torch.manual_seed(4)
    engine = -torch.rand(3, 5, dtype=D) * 3
    trainer = engine + torch.randn(3, 5, dtype=D)
    mask = rand_mask(3, 5, seed=13)
    weights, stats = core.truncated_importance_weights(trainer, engine, mask, cap=2.0)
    w2, stats2 = core.truncated_importance_weights(pad_garbage(trainer, 4), pad_garbage(engine, 4, seed=3),
                                                   pad_mask(mask, 4), cap=2.0)
    assert torch.equal(w2[:, :5], weights) and (w2[:, 5:] == 0).all()
    assert all(stats2[k].item() == pytest.approx(stats[k].item(), abs=1e-12) for k in stats)


def test_ppo_policy_loss_padding_invariance_and_clean_grad():
    torch.manual_seed(0)
    lp = -torch.rand(3, 5, dtype=D)
    old = lp.detach() + torch.randn(3, 5, dtype=D) * 0.3
    adv = torch.randn(3, 5, dtype=D)
    mask = rand_mask(3, 5, seed=11)
    loss, stats = ppo_policy_loss(lp, old, adv, mask)
    lp2 = pad_garbage(lp, 4).requires_grad_()
    loss2, stats2 = ppo_policy_loss(
        lp2, pad_garbage(old, 4, seed=2), pad_garbage(adv, 4, value=float("inf")), pad_mask(mask, 4)
    )
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    for key in stats:
        assert stats2[key].item() == pytest.approx(stats[key].item(), abs=1e-12)
    loss2.backward()
    assert torch.all(torch.isfinite(lp2.grad)) and torch.all(lp2.grad[:, 5:] == 0)


def naive_value_loss(values, old, returns, mask, clip):
    losses, clipped_count, vals, errs = [], 0, [], []
    for b, ts in enumerate(real_positions(mask)):
        for t in ts:
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            e1 = (v - r) ** 2
            e2 = (o + min(max(v - o, -clip), clip) - r) ** 2 if clip is not None else e1
            losses.append(max(e1, e2))
            clipped_count += e2 > e1
            vals.append(v)
            errs.append(e1)
    n = len(losses)
    return 0.5 * sum(losses) / n, clipped_count / n, sum(vals) / n, sum(errs) / n


@pytest.mark.parametrize("clip", [0.2, None])
def test_ppo_value_loss_matches_loop(clip):
    torch.manual_seed(0)
    old = torch.randn(4, 6, dtype=D)
    values = old + torch.randn(4, 6, dtype=D) * 0.4
    returns = torch.randn(4, 6, dtype=D)
    mask = rand_mask(4, 6, seed=12)
    loss, stats = core.ppo_value_loss(values, old, returns, mask, clip_range_value=clip)
    exp_loss, exp_clipfrac, exp_vmean, exp_err = naive_value_loss(values, old, returns, mask, clip)
    if clip is not None:
        assert 0 < exp_clipfrac < 1
    assert loss.item() == pytest.approx(exp_loss, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(exp_clipfrac, abs=1e-12)
    assert stats["value_mean"].item() == pytest.approx(exp_vmean, abs=1e-12)
    assert stats["error"].item() == pytest.approx(exp_err, abs=1e-12)


def test_ppo_value_loss_clip_hand_values():
    # Token 1: V moved 0 -> 1, return 2: clipped V = 0.2, error 3.24 > 1 -> clipped term active.
    # Token 2: V moved 0 -> 1, return 0: clipped V = 0.2, error 0.04 < 1 -> unclipped term active.
    values = torch.tensor([[1.0, 1.0]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 2, dtype=D)
    returns = torch.tensor([[2.0, 0.0]], dtype=D)
    loss, stats = core.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["error"].item() == pytest.approx((1.0 + 1.0) / 2)
    assert stats["value_mean"].item() == pytest.approx(1.0)
    loss.backward()
    # The clipped token has no gradient; the other gets 0.5 * 2 * (1 - 0) / 2 tokens = 0.5.
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5])
    unclipped, _ = core.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_ppo_value_loss_padding_invariance():
    torch.manual_seed(0)
    old = torch.randn(3, 5, dtype=D)
    values = old + torch.randn(3, 5, dtype=D) * 0.5
    returns = torch.randn(3, 5, dtype=D)
    mask = rand_mask(3, 5, seed=13)
    loss, stats = core.ppo_value_loss(values, old, returns, mask)
    values2 = pad_garbage(values, 3, value=float("nan")).requires_grad_()
    loss2, stats2 = core.ppo_value_loss(
        values2, pad_garbage(old, 3, seed=4), pad_garbage(returns, 3, seed=5), pad_mask(mask, 3)
    )
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    for key in stats:
        assert stats2[key].item() == pytest.approx(stats[key].item(), abs=1e-12)
    loss2.backward()
    assert torch.all(values2.grad[:, 5:] == 0)


def test_policy_gradient_loss_matches_loop_and_detaches_advantages():
    torch.manual_seed(0)
    lp = (-torch.rand(3, 5, dtype=D)).requires_grad_()
    adv = torch.randn(3, 5, dtype=D, requires_grad=True)
    mask = rand_mask(3, 5, seed=14)
    loss, stats = core.policy_gradient_loss(lp, adv, mask)
    terms = [
        float(lp.detach()[b, t]) * float(adv.detach()[b, t])
        for b, ts in enumerate(real_positions(mask))
        for t in ts
    ]
    assert loss.item() == pytest.approx(-sum(terms) / len(terms), abs=1e-12)
    assert stats["logprob_mean"].item() == pytest.approx(naive_mean(lp.detach(), mask), abs=1e-12)
    assert stats["advantage_mean"].item() == pytest.approx(naive_mean(adv.detach(), mask), abs=1e-12)
    loss.backward()
    assert adv.grad is None
    n = len(terms)
    expected_grad = torch.where(mask.bool(), -adv.detach() / n, torch.zeros((), dtype=D))
    assert torch.allclose(lp.grad, expected_grad, atol=1e-12)
    loss2, _ = core.policy_gradient_loss(
        pad_garbage(lp.detach(), 2), pad_garbage(adv.detach(), 2), pad_mask(mask, 2)
    )
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)


def test_explained_variance_matches_loop():
    torch.manual_seed(0)
    returns = torch.randn(4, 6, dtype=D)
    values = returns + torch.randn(4, 6, dtype=D) * 0.5
    mask = rand_mask(4, 6, seed=15)
    pairs = [
        (float(values[b, t]), float(returns[b, t])) for b, ts in enumerate(real_positions(mask)) for t in ts
    ]

    def var(xs):
        mu = sum(xs) / len(xs)
        return sum((x - mu) ** 2 for x in xs) / len(xs)

    expected = 1 - var([r - v for v, r in pairs]) / var([r for _, r in pairs])
    out = core.explained_variance(values, returns, mask)
    assert out.dim() == 0 and out.item() == pytest.approx(expected, abs=1e-12)
    padded = core.explained_variance(
        pad_garbage(values, 2), pad_garbage(returns, 2, seed=3), pad_mask(mask, 2)
    )
    assert padded.item() == pytest.approx(expected, abs=1e-12)


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    mask = torch.ones(1, 3)
    assert core.explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full((1, 3), 2.0, dtype=D), returns, mask).item() == pytest.approx(
        0.0
    )
    assert math.isnan(core.explained_variance(returns, torch.full((1, 3), 5.0, dtype=D), mask).item())



# --- reward-model ensembles (Coste et al. 2024) --------------------------------------------------------

# k = 3 members (rows) x B = 3 samples (columns)
ENSEMBLE = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, -1.0], [2.0, 2.0, 4.0]], dtype=D)


@pytest.mark.parametrize(("combine", "lam", "expected"), [
    ("mean", 1.0, [2.0, 2.0, 1.0]),
    ("min", 1.0, [1.0, 2.0, -1.0]),
    # population variances 2/3, 0, 14/3 (column 2: deviations -1, -2, 3 from the mean 1; (1 + 4 + 9) / 3):
    # 2 - 1.5 * 2/3 = 1, 2 - 0 = 2, 1 - 1.5 * 14/3 = -6
    ("uwo", 1.5, [1.0, 2.0, -6.0]),
    ("uwo", 0.0, [2.0, 2.0, 1.0]),
])
def test_ensemble_reward_hand_values(combine, lam, expected):
    out = core.ensemble_reward(ENSEMBLE, combine, lam)
    assert out.shape == (3,) and out.tolist() == pytest.approx(expected, abs=1e-12)


def test_ensemble_reward_matches_a_loop_over_members():
    torch.manual_seed(0)
    scores = torch.randn(5, 7, dtype=D)
    for b in range(7):
        column = [float(scores[i, b]) for i in range(5)]
        mu = sum(column) / 5
        var = sum((x - mu) ** 2 for x in column) / 5  # population (1/k), Coste et al.'s intra-ensemble variance
        assert core.ensemble_reward(scores, "mean")[b].item() == pytest.approx(mu, abs=1e-12)
        assert core.ensemble_reward(scores, "min")[b].item() == min(column)
        assert core.ensemble_reward(scores, "uwo", 0.7)[b].item() == pytest.approx(mu - 0.7 * var, abs=1e-12)


def test_ensemble_reward_combines_the_members_that_scored_each_sample():
    """Column 0: members 0 and 2 (1 and 2); column 1: member 0 alone; column 2: none -> nan. Unset entries hold
    garbage (nan, inf) that must reach neither the result nor the gradient."""
    scores = ENSEMBLE.clone()
    scores[1, 0], scores[1, 1], scores[2, 1] = math.nan, math.inf, -math.inf
    scores[:, 2] = math.nan
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    for combine, expected in [("mean", [1.5, 2.0]), ("min", [1.0, 2.0]), ("uwo", [1.5 - 2.0 * 0.25, 2.0])]:
        x = scores.clone().requires_grad_(True)
        out = core.ensemble_reward(x, combine, 2.0, mask)
        assert out[:2].tolist() == pytest.approx(expected, abs=1e-12) and math.isnan(out[2].item())
        out[:2].sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad[~mask.bool()] == 0).all()
    assert torch.equal(core.ensemble_reward(ENSEMBLE, "uwo", 1.0, torch.ones(3, 3, dtype=torch.bool)),
                       core.ensemble_reward(ENSEMBLE, "uwo", 1.0))


def test_ensemble_reward_of_one_member_is_that_member_and_of_none_is_refused():
    one = torch.tensor([[0.5, -2.0, 3.0]], dtype=D)
    for combine in core.ENSEMBLE_COMBINES:  # one member has no spread: variance 0, so UWO is the member too
        assert torch.equal(core.ensemble_reward(one, combine, 10.0), one[0])
    with pytest.raises(ValueError, match="k >= 1 members"):
        core.ensemble_reward(torch.zeros(0, 3), "mean")
    with pytest.raises(ValueError, match=r"\[k, B\]"):
        core.ensemble_reward(torch.zeros(3), "mean")
    with pytest.raises(ValueError, match="unknown ensemble combine 'max'"):
        core.ensemble_reward(ENSEMBLE, "max")
    for lam in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            core.ensemble_reward(ENSEMBLE, "uwo", lam)


# --- KL controllers ----------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_values():
    ctl = core.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=8.0, n_steps=256)  # error 8/6 - 1 = 0.333 clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    assert ctl.value == pytest.approx(0.201024)
    ctl.update(current_kl=5.7, n_steps=1000)  # error 5.7/6 - 1 = -0.05, unclipped
    assert ctl.value == pytest.approx(0.201024 * (1 - 0.05 * 1000 / 10000))
    ctl.update(current_kl=0.0, n_steps=100)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.201024 * 0.995 * (1 - 0.2 * 100 / 10000))


def test_kl_controller_state_roundtrip_and_fixed():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 512)
    fresh = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value != 0.1
    fixed = core.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = core.FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        core.AdaptiveKLController(0.1, target=0.0, horizon=10000)


# --- SeqGAN: inverse-CDF sampling and Monte-Carlo Q values -------------------------------------------


def test_inverse_cdf_sample_fixed_uniforms_by_hand():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]]) + 1e-30)
    u = torch.tensor([0.1, 0.2, 0.95, 0.999])  # cdf 0.2, 0.5, 1.0: u < 0.2 -> 0, [0.2, 0.5) -> 1, else 2
    assert core.inverse_cdf_sample(logits, uniform=u).tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_inverse_cdf_sample_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -30.0])
    n = 40000
    draws = core.inverse_cdf_sample(logits.expand(n, 5), temperature, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / n
    probs = torch.softmax(logits.double() / temperature, -1)
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / n))
    assert freq[4] == 0  # (near-)zero-probability tokens are not drawn


def test_monte_carlo_q_values_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    T, N, B = 5, 3, 2
    scores = torch.rand(T - 1, N, B, generator=g, dtype=D)
    final = torch.rand(B, generator=g, dtype=D)
    q = core.monte_carlo_q_values(scores, final)
    assert q.shape == (B, T)
    for b in range(B):
        for t in range(T - 1):
            assert float(q[b, t]) == pytest.approx(sum(float(scores[t, k, b]) for k in range(N)) / N)
        assert float(q[b, T - 1]) == pytest.approx(float(final[b]))
    with pytest.raises(ValueError, match="batch"):
        core.monte_carlo_q_values(scores, final[:1])


def test_block_tokens_renormalises_without_the_blocked_ids_at_early_positions():
    """Under min_new_tokens the sampled distribution is the softmax over the other tokens: by hand,
    log p'(y) = log p(y) - log(1 - p(eos)) for t < until, unchanged after."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    original = logits.clone()
    tokens = torch.tensor([[1, 2, 3, 5], [0, 4, 5, 2]])  # the blocked id only where it is allowed
    blocked = core.block_tokens(logits, [5], until=2)
    assert torch.equal(logits, original)  # the caller's logits are left as they were
    got = core.logprobs_from_logits(blocked, tokens, temperature=0.7)
    p = torch.softmax(logits / 0.7, dim=-1)
    base = torch.log(p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    expected = base.clone()
    expected[:, :2] -= torch.log1p(-p[:, :2, 5])
    assert torch.allclose(got[:, :2], expected[:, :2], atol=1e-5)
    assert torch.equal(got[:, 2:], core.logprobs_from_logits(logits, tokens, temperature=0.7)[:, 2:])
    assert torch.isfinite(core.entropy_from_logits(blocked)).all()
    assert core.block_tokens(logits, [5], until=0) is logits
