"""SeqGAN's oracle task with MaliGAN's and ScratchGAN's rewards (reward_transform maligan, dense): the baseline
against a naive loop, the advantages each transform hands the policy gradient, tiny runs, exact resume."""

import pytest
import torch
from test_seqgan import tiny_oracle_config
from test_seqgan_resume import _cpu, _stop_when_logged, _without_time, oracle_config

from rlgen import adversarial, core
from rlgen.checkpoint import TrainingInterrupted
from rlgen.config import SeqGANConfig
from rlgen.errors import UserError
from rlgen.files import read_jsonl
from rlgen.seqgan import ema_baseline_advantages, train_seqgan

torch.set_num_threads(1)


def test_ema_baseline_matches_a_naive_loop_and_ignores_padding():
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    real = [v for row, m in zip(returns.tolist(), mask.tolist()) for v, keep in zip(row, m) if keep]
    expected_b = 0.08 * 0.5 + 0.92 * sum(real) / len(real)  # updated first (scratchgan/losses.py), then used
    adv, b = ema_baseline_advantages(returns, mask, 0.5, 0.08)
    assert b == pytest.approx(expected_b)
    for i in range(2):
        for t in range(3):
            assert float(adv[i, t]) == pytest.approx((float(returns[i, t]) - expected_b) * int(mask[i, t]))
    padded = returns.clone()
    padded[0, 2] = -100.0  # a masked value changes nothing
    adv2, b2 = ema_baseline_advantages(padded, mask, 0.5, 0.08)
    assert b2 == b and torch.equal(adv2, adv)


def _advantages_seen(monkeypatch):
    """The advantages of every policy-gradient step, recorded as core.policy_gradient_loss receives them."""
    seen = []
    loss = core.policy_gradient_loss

    def record(logprobs, advantages, mask):
        seen.append(advantages.detach().clone())
        return loss(logprobs, advantages, mask)

    monkeypatch.setattr(core, "policy_gradient_loss", record)
    return seen


@pytest.mark.parametrize("transform", ["seqgan", "maligan", "dense"])
def test_tiny_oracle_run_with_each_reward_transform(tmp_path, monkeypatch, transform):
    _cpu(monkeypatch)
    seen = _advantages_seen(monkeypatch)
    logits = []
    original = adversarial.maligan_reward

    def keep(scores):
        logits.append(scores.clone())
        return original(scores)

    monkeypatch.setattr(adversarial, "maligan_reward", keep)
    cfg = tiny_oracle_config(tmp_path, max_steps=2, g_steps=1, reward_transform=transform, eval_every=1,
                             eval_temperatures=[1.0])
    s = train_seqgan(cfg).summary
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert len(rows) == 2 and len(seen) == 2 and all(a.shape == (64, 6) for a in seen)
    assert "eval/nll_oracle" in s["adv"] and all(0 < r["objective/q_last"] < 1 for r in rows)
    if transform == "maligan":  # one value per sequence on every token, D/(1-D) normalised, mean 0; no rollouts
        assert len(logits) == 2 and s["g_step_split"]["rollout"] < 0.5 and "objective/q_mean" not in rows[0]
        for adv, logit in zip(seen, logits):
            d = torch.sigmoid(logit.double())
            weights = d / (1 - d)
            assert torch.allclose(adv[:, 0].double(), weights / weights.sum() - 1 / 64, atol=1e-6)
            assert torch.equal(adv, adv[:, :1].expand(-1, 6))
    elif transform == "dense":  # returns of 2 Q - 1 in [-1, 1] discounted by 0.23, minus the baseline logged
        assert all(float(a.abs().max()) <= 2 / 0.77 for a in seen)
        b = rows[0]["objective/dense_baseline"]  # 0.92 mean(R) after the first step (from 0): mean(A) = 0.08 mean(R)
        assert b != 0 and "objective/q_mean" in rows[0]
        assert float(seen[0].mean()) == pytest.approx(0.08 * b / 0.92, abs=1e-5)
    else:
        assert "objective/dense_baseline" not in rows[0] and not logits


def test_dense_run_interrupted_and_resumed_equals_one_go(tmp_path, monkeypatch):
    """The moving-average baseline is part of the checkpoint: a resumed dense run equals one never stopped."""
    _cpu(monkeypatch)
    one = train_seqgan(oracle_config(tmp_path, tmp_path / "one", reward_transform="dense", baseline="none"))
    _stop_when_logged(monkeypatch, "loss/policy", 2)
    with pytest.raises(TrainingInterrupted):
        train_seqgan(oracle_config(tmp_path, tmp_path / "split", reward_transform="dense", baseline="none"))
    monkeypatch.undo()
    _cpu(monkeypatch)
    two = train_seqgan(oracle_config(tmp_path, tmp_path / "split", reward_transform="dense", baseline="none",
                                     resume_from_checkpoint="latest"))
    assert _without_time(read_jsonl(tmp_path / "split" / "metrics.jsonl")) == _without_time(
        read_jsonl(tmp_path / "one" / "metrics.jsonl"))
    for a, b in zip(one.policy.model.parameters(), two.policy.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    (dict(reward_transform="rankgan"), "reward_transform must be one of seqgan, maligan, dense"),
    (dict(reward_transform="maligan", baseline="mean"), "baseline mean is for reward_transform seqgan"),
    (dict(reward_transform="dense", dense_gamma=1.5), "dense_gamma"),
])
def test_bad_reward_transform_options_are_refused(kw, match):
    with pytest.raises(UserError, match=match):
        SeqGANConfig(task="oracle", model="lstm", **kw)


@pytest.mark.parametrize("transform", ["maligan", "dense"])
def test_text_task_and_compare_take_each_reward_transform(tmp_path, tiny_classifier, monkeypatch, transform):
    """The text task: maligan reads D's logit of the replies (texts; no rollouts generated), dense the rollouts'
    Q. A comparison's seqgan section takes the transform (its batch-mean baseline is seqgan's only)."""
    from pathlib import Path

    from rlgen.config import CompareConfig

    seen = _advantages_seen(monkeypatch)
    cfg = SeqGANConfig(task="text", model="tiny", discriminator=tiny_classifier, output_dir=str(tmp_path / "run"),
                       max_new_tokens=4, batch_size=4, max_steps=1, rollout_num=2, d_pretrain_rounds=1,
                       d_negatives=4, d_max_length=16, eval_num_prompts=0, reward_transform=transform)
    s = train_seqgan(cfg).summary
    assert len(seen) == 1 and seen[0].shape[0] == 4
    assert (s["generated"]["rollouts"] == 0) == (transform == "maligan")
    compare = CompareConfig(model="tiny", methods=["seqgan"], seeds=[0], max_steps=3,
                            seqgan={"reward_transform": transform})
    stage = compare.method_config("seqgan", "tiny", Path("o"), 0)
    assert (stage.reward_transform, stage.baseline) == (transform, "none")
