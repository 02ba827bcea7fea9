"""The RL loop with every estimator (rlgen.ppo + rlgen.estimators): presets and option checks, groups, no critic
without gae, DAPO's dynamic sampling and overlong punishment, and losses over the global mini-batch."""

import dataclasses

import pytest
import torch

from rlgen import estimators
from rlgen.config import PPOConfig
from rlgen.config.stages import ADVANTAGE_NAMES, GROUP_ADVANTAGES, LOSS_AGGS, POLICY_LOSS_NAMES, RL_PRESETS
from rlgen.errors import UserError
from rlgen.files import read_jsonl
from rlgen.policy import VALUE_HEAD_FILE, Rollout
from rlgen.ppo import _equal_groups, _select_groups, _shaped_scores, train_ppo
from tests.test_ppo import METRIC_NAMES

torch.set_num_threads(1)

REWARDS = '''
def vowel_share(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def even_prompts_flat(prompts, completions, **kwargs):
    """0 for every completion of a prompt of even length (its group's scores are all equal), else the length."""
    return [0.0 if len(str(p)) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "loop_rewards.py"
    path.write_text(REWARDS)
    return path


def config(tiny_folder, out, **overrides):
    values = dict(model=str(tiny_folder), output_dir=str(out), max_steps=2, batch_size=4, mini_batch_size=4,
                  ppo_epochs=1, max_new_tokens=8, learning_rate=3e-3, reward=["keyword(include=['a'])"])
    return PPOConfig(**{**values, **overrides})


def test_the_configs_names_are_the_estimators():
    assert ADVANTAGE_NAMES == tuple(estimators.ADVANTAGES)
    assert POLICY_LOSS_NAMES == tuple(estimators.POLICY_LOSSES)
    assert LOSS_AGGS == estimators.LOSS_AGGS
    for name in ADVANTAGE_NAMES:  # a group estimator refuses groups of one
        group = name in GROUP_ADVANTAGES
        x, mask = torch.tensor([[1.0], [2.0]]), torch.ones(2, 1)
        values = torch.zeros(2, 1) if estimators.needs_critic(name) else None
        if group:
            with pytest.raises(ValueError):
                estimators.ADVANTAGES[name](x, x[:, 0], values, mask, group_size=1, gamma=1.0, lam=0.95)
        else:
            estimators.ADVANTAGES[name](x, x[:, 0], values, mask, group_size=1, gamma=1.0, lam=0.95)


def test_a_preset_fills_only_the_options_left_at_their_defaults():
    plain = PPOConfig(model="tiny")
    assert PPOConfig(model="tiny", preset="ppo") == dataclasses.replace(plain, preset="ppo")
    grpo = PPOConfig(model="tiny", preset="grpo", kl_coef=0.1)
    assert (grpo.advantage, grpo.num_generations, grpo.kl_in, grpo.kl_estimator, grpo.kl_coef, grpo.loss_agg) == (
        "grpo", 4, "loss", "k3", 0.1, "seq-mean-token-mean")
    dapo = PPOConfig(model="tiny", preset="dapo", max_new_tokens=20)
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling, dapo.overlong_buffer, dapo.loss_agg) == (
        0.2, 0.28, True, 4, "token-mean")
    assert (plain.clip_low, plain.clip_high) == (0.2, 0.2)  # cliprange
    assert PPOConfig(model="tiny", cliprange=0.3).clip_high == 0.3
    for name in RL_PRESETS:  # each builds with the defaults around it
        PPOConfig(model="tiny", preset=name)


@pytest.mark.parametrize("overrides, message", [
    (dict(advantage="grpo"), "advantage grpo compares the samples of a prompt: set num_generations >= 2"),
    (dict(preset="grpo", batch_size=6, mini_batch_size=6), "batch_size 6 is not a multiple of num_generations 4"),
    (dict(dynamic_sampling=True), "dynamic_sampling drops groups whose rewards are all equal"),
    (dict(kl_estimator="k2"), "kl_estimator must be k1 or k3 with kl_in reward"),
    (dict(preset="rloo", separate_critic=True), "separate_critic: advantage rloo trains no critic"),
    (dict(preset="grpo_typo"), "preset 'grpo_typo' is not one of"),
    (dict(loss_agg="seq-mean"), "loss_agg 'seq-mean' is not one of"),
    (dict(clip_low=1.5), "clip_low must be at most 1"),
    (dict(dual_clip=0.5), "dual_clip must be 0 (off) or > 1"),
    (dict(overlong_buffer=20, max_new_tokens=8), "overlong_buffer 20 exceeds max_new_tokens 8"),
])
def test_bad_combinations_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        PPOConfig(model="tiny", **overrides)
    assert "\n" not in str(e.value)


def _rollout(lengths: list[int], T: int = 4, P: int = 2, offset: int = 0) -> Rollout:
    B = len(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.arange(B * T).view(B, T) + offset
    return Rollout(torch.full((B, P), 7), torch.ones(B, P, dtype=torch.long), ids * mask, mask,
                   torch.randn(B, T) * mask, None, torch.tensor([n < T for n in lengths]),
                   [f"p{i + offset}" for i in range(B)], [f"c{i + offset}" for i in range(B)])


def test_dynamic_sampling_keeps_groups_that_differ_and_fills_up_with_equal_ones():
    """Two rounds of 2 groups of 2: round 1 has one varied and one flat group, round 2 one flat and one varied. The
    batch of 2 groups takes both varied ones in round order (rows 0-1 of round 1, rows 2-3 of round 2, padded to the
    longer prompt and completion); both flat groups are dropped. Short of varied groups, flat ones fill."""
    cfg = PPOConfig(model="tiny", preset="dapo", batch_size=4, mini_batch_size=4, num_generations=2)
    r1, r2 = _rollout([1, 2] + [3, 3], T=3), _rollout([2, 2] + [4, 1], T=4, P=3, offset=100)
    s1, s2 = torch.tensor([0.0, 1.0, 5.0, 5.0]), torch.tensor([2.0, 2.0, 0.0, 3.0])
    rounds = [(r1, s1, s1, {"f": s1.tolist()}), (r2, s2, s2, {"f": s2.tolist()})]
    assert _equal_groups(s1, 2).tolist() == [False, True] and _equal_groups(s2, 2).tolist() == [True, False]
    ro, raw, scores, per_fn, stats = _select_groups(rounds, cfg, 2, pad_id=0, world=1)
    assert raw.tolist() == scores.tolist() == per_fn["f"] == [0.0, 1.0, 0.0, 3.0]
    assert ro.prompts == ["p0", "p1", "p102", "p103"]
    assert ro.prompt_ids.shape == (4, 3) and ro.prompt_mask[:2, 0].tolist() == [0, 0]  # left-padded
    assert ro.completion_mask.sum(1).tolist() == [1, 2, 4, 1] and ro.completion_ids.shape == (4, 4)
    assert torch.equal(ro.logprobs[2:], r2.logprobs[2:]) and torch.equal(ro.logprobs[:2, :3], r1.logprobs[:2])
    assert {k: v.item() for k, v in stats.items()} == {"policy/zero_std_groups": 2, "policy/dropped_groups": 2}
    _, _, short, _, stats = _select_groups(rounds[:1], cfg, 2, pad_id=0, world=2)
    assert short.tolist() == s1.tolist()  # filled with the flat group, none dropped; counts x processes
    assert {k: v.item() for k, v in stats.items()} == {"policy/zero_std_groups": 2, "policy/dropped_groups": 0}


def test_overlong_punishment_is_dapos_and_adds_to_the_eos_penalty():
    """max_new_tokens 8, buffer 4: lengths <= 4 unpunished, 6 -> -0.5, 8 -> -1 (DAPO eq. 13), times the penalty;
    a completion without EOS also loses missing_eos_penalty."""
    cfg = PPOConfig(model="tiny", max_new_tokens=8, overlong_buffer=4, overlong_penalty=2.0, missing_eos_penalty=0.5)
    ro = _rollout([4, 6, 8], T=8)  # ended_with_eos: lengths below T
    scores = _shaped_scores(cfg, ro, torch.tensor([1.0, 1.0, 1.0]))
    assert scores.tolist() == pytest.approx([1.0, 1.0 - 1.0, 1.0 - 2.0 - 0.5])


def test_group_estimators_train_without_a_value_head(tiny_folder, reward_file, tmp_path):
    """grpo and rloo: no value head is built, optimised, checkpointed or saved; the metrics are ppo's without the
    value ones, plus the group counts (and loss/kl with the KL in the loss)."""
    for preset, extra in (("grpo", {"loss/kl"}), ("rloo", set())):
        out = tmp_path / preset
        policy = train_ppo(config(tiny_folder, out, preset=preset, num_generations=2,
                                  reward=[f"{reward_file}:vowel_share"], save_steps=1))
        assert policy.value_head is None and not any("value_head" in k for k, _ in policy.named_parameters())
        assert not (out / VALUE_HEAD_FILE).exists() and not (out / "checkpoint-2" / VALUE_HEAD_FILE).exists()
        rows = read_jsonl(out / "metrics.jsonl")
        expected = (METRIC_NAMES - {"loss/value", "val/explained_variance"}) | extra | {
            "policy/zero_std_groups", "policy/dropped_groups", "rewards/vowel_share/mean"}
        assert set(rows[0]) - {"step"} == expected
        assert all(r["completions/mean_length"] > 0 for r in rows)


def test_dynamic_sampling_in_the_loop_drops_flat_groups(tiny_folder, reward_file, tmp_path):
    """Half the chitchat prompts give flat groups (even_prompts_flat): each update samples extra rounds, counts the
    flat groups it saw and drops the ones it did not need."""
    out = tmp_path / "dapo"
    train_ppo(config(tiny_folder, out, preset="dapo", num_generations=2, batch_size=8, mini_batch_size=8,
                     max_steps=3, reward=[f"{reward_file}:even_prompts_flat"]))
    rows = read_jsonl(out / "metrics.jsonl")
    assert sum(r["policy/zero_std_groups"] for r in rows) > 0
    assert all(r["policy/dropped_groups"] <= r["policy/zero_std_groups"] for r in rows)
    assert sum(r["policy/dropped_groups"] for r in rows) > 0


def _eos_now_and_then(tokenizer):
    """torch.multinomial that sets EOS for about a third of the rows at each step, drawing from torch's generator:
    completions of unequal lengths, the same in every run with the same seed."""
    original = torch.multinomial

    def sample(probs, num_samples=1, **kwargs):
        out = original(probs, num_samples, **kwargs)
        out[torch.rand(out.shape[0]) < 0.3] = tokenizer.eos_token_id
        return out

    return sample


@pytest.mark.parametrize("preset", ["ppo", "grpo"])
def test_accumulation_steps_leave_the_update_unchanged(tiny_folder, reward_file, tmp_path, monkeypatch, preset):
    """One mini-batch of 4 completions of unequal lengths in 1 or 2 accumulation steps, 2 epochs (the second's ratios
    move the loss off 0): the same losses and weights (the loss is aggregated over the mini-batch's tokens, not averaged over micro-batch means; whitening on). Tolerance
    1e-5: the sums are split differently."""
    from rlgen.models import load_model

    monkeypatch.setattr(torch, "multinomial", _eos_now_and_then(load_model(str(tiny_folder))[1]))
    extra = dict(num_generations=2) if preset == "grpo" else {}
    runs = {}
    for steps in (1, 2):
        out = tmp_path / f"acc{steps}"
        policy = train_ppo(config(tiny_folder, out, preset=preset, gradient_accumulation_steps=steps, ppo_epochs=2,
                                  reward=[f"{reward_file}:vowel_share"], **extra))
        runs[steps] = (read_jsonl(out / "metrics.jsonl"), dict(policy.named_parameters()))
    (rows1, params1), (rows2, params2) = runs[1], runs[2]
    lengths = [r["completions/mean_length"] for r in rows1]
    assert lengths == [r["completions/mean_length"] for r in rows2] and any(x != round(x) for x in lengths)
    for a, b in zip(rows1, rows2):
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-6)
        assert a["loss/policy"] != pytest.approx(0.0, abs=1e-4)
    for name, value in params1.items():
        if not name.startswith("ref_model."):
            assert torch.allclose(value, params2[name], rtol=1e-5, atol=1e-6), name


class _RecordingEngine:
    """An inference engine stand-in: completion i of prompt p is [p's last token + i] then EOS 2; log-probs -i."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, settings, eos_ids, n=1):
        self.calls.append((prompt_ids, n))
        ids = [[p[-1] + i, 2] for p in prompt_ids for i in range(n)]
        return ids, [[-float(i), 0.0] for _ in prompt_ids for i in range(n)]


def test_an_engine_samples_a_group_as_one_request_of_n(tiny_policy):
    """group_size 2: the engine gets each group's prompt once with n = 2, and the rows come back in group order."""
    from rlgen.config import SamplingConfig

    engine = tiny_policy.engine = _RecordingEngine()
    try:
        ro = tiny_policy.sample(["hello", "hello", "good day", "good day"], SamplingConfig(max_new_tokens=4),
                                with_values=False, group_size=2)
    finally:
        tiny_policy.engine = None
    (prompts, n), = engine.calls
    assert n == 2 and len(prompts) == 2 and prompts[0] != prompts[1]
    last = [p[-1] for p in prompts]
    assert ro.completion_ids[:, 0].tolist() == [last[0], last[0] + 1, last[1], last[1] + 1]
    assert ro.engine_logprobs[:, 0].tolist() == [0.0, -1.0, 0.0, -1.0]


def test_evaluations_along_training_run_for_a_group_estimator(tiny_folder, reward_file, tmp_path):
    out = tmp_path / "grpo_eval"
    train_ppo(config(tiny_folder, out, preset="grpo", num_generations=2, eval_steps=1,
                     evaluate={"num_prompts": 2, "batch_size": 2}))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["completions/generated"]) for r in rows if "eval/reward/mean" in r] == [(1, 4), (2, 8)]
    assert (out / "eval_steps" / "step2" / "eval_samples.jsonl").is_file()
