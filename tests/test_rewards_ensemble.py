"""The `ensemble` reward (Coste et al. 2024): spec loading, combine modes by hand, None handling, per-member values
in score_rewards' per_fn and the metrics, errors naming the culprit, learned reward-model members, the evaluator."""

import json
import math
import shutil
import warnings

import pytest
import torch

from rlgen.config import SamplingConfig
from rlgen.errors import RewardError, UserError
from rlgen.evaluation import evaluate_policy
from rlgen.rewards import (
    LearnedReward,
    RewardEnsemble,
    load_reward,
    reward_mean_metrics,
    reward_name,
    score_rewards,
    scored_names,
)

torch.set_num_threads(1)

# Three members' values for 4 samples: sample 2 has 2 members (b gives None), sample 3 none.
MEMBERS = '''
def a(completions, **kwargs):
    return [1.0, 2.0, 0.0, None][:len(completions)]


def b(completions, **kwargs):
    return [3.0, 2.0, None, None][:len(completions)]


def c(completions, **kwargs):
    return [2.0, 2.0, 4.0, None][:len(completions)]


def wrong_length(completions, **kwargs):
    return [0.0] * (len(completions) + 1)


def solved(prompts, completions, solution, **kwargs):
    """Needs the `solution` column and gets conversational completions, as TRL passes them."""
    return [float(s in c[0]["content"]) for c, s in zip(completions, solution, strict=True)]
'''
PROMPTS, COMPLETIONS = ["p"] * 4, ["w", "x", "y", "z"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    path = tmp_path_factory.mktemp("members") / "members.py"
    path.write_text(MEMBERS)
    return {name: f"{path}:{name}" for name in ("a", "b", "c", "wrong_length", "solved")}


def spec(members_, **kwargs):
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"ensemble(members={members_!r}{args})"


def test_the_spec_loads_each_member_and_names_the_ensemble(members):
    text = spec([members["a"], members["b"], "keyword(include=['x'])"], combine="min")
    name, fn = load_reward(text)
    assert name == reward_name(text) == fn.__name__ == "ensemble"
    assert isinstance(fn, RewardEnsemble) and fn.combine == "min" and fn.lam == 1.0
    assert fn.member_names == ["a", "b", "keyword"] and fn.rlgen_spec == text  # config.yaml records the spec
    assert load_reward(spec([members["a"]]))[1].combine == "mean"  # the default


def test_an_ensemble_built_in_python_is_recorded_as_a_spec_that_loads_it_again(members, tiny_reward_models):
    from rlgen.config.fields import recorded

    built = RewardEnsemble([load_reward(members["a"]), load_reward(tiny_reward_models[0]),
                            load_reward("keyword(include=['x'])")], combine="uwo", lam=0.5)
    text = recorded(built)
    assert text == spec([members["a"], tiny_reward_models[0], "rlgen.rewards.rules:keyword(include=['x'])"],
                        combine="uwo", lam=0.5)  # each member as config.yaml records any reward
    again = load_reward(text)[1]
    assert again.member_names == built.member_names and (again.combine, again.lam) == ("uwo", 0.5)
    assert again(PROMPTS, COMPLETIONS) == pytest.approx(built(PROMPTS, COMPLETIONS))


@pytest.mark.parametrize(("combine", "lam", "expected"), [
    ("mean", 1.0, [2.0, 2.0, 2.0, None]),
    ("min", 1.0, [1.0, 2.0, 0.0, None]),
    # population variances over the members that scored: 2/3 (1, 3, 2), 0, 4 (0 and 4: b gave None)
    ("uwo", 1.5, [2.0 - 1.5 * 2 / 3, 2.0, 2.0 - 1.5 * 4, None]),
    ("uwo", 0.0, [2.0, 2.0, 2.0, None]),
])
def test_combine_modes_by_hand_over_the_members_that_gave_a_value(members, combine, lam, expected):
    _, fn = load_reward(spec([members[m] for m in "abc"], combine=combine, lam=lam))
    got = fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 4)  # TRL's convention, as TRL calls it
    assert got[3] is None and got[:3] == pytest.approx(expected[:3], abs=1e-12)
    totals, per_fn = score_rewards([("ensemble", fn)], PROMPTS, COMPLETIONS)
    assert per_fn["ensemble"] == got and totals == pytest.approx(expected[:3] + [0.0])  # None adds nothing


def test_score_rewards_reports_every_member_under_the_ensembles_name(members):
    """Members under <ensemble>/<member> (a repeated member name gets _2), in per_fn and the metrics; only the
    combined value enters the totals; two ensembles are ensemble and ensemble_2, as any repeated reward."""
    _, first = load_reward(spec([members["a"], members["b"], members["a"]], combine="min"))
    _, second = load_reward(spec([members["c"]]))
    fns = [("ensemble", first), ("keyword", load_reward("keyword(include=['x'])")[1]), ("ensemble", second)]
    totals, per_fn = score_rewards(fns, PROMPTS, COMPLETIONS, weights=[2.0, 1.0, -1.0])
    assert list(per_fn) == scored_names(fns) == ["ensemble", "ensemble/a", "ensemble/b", "ensemble/a_2", "keyword",
                                                 "ensemble_2", "ensemble_2/c"]
    assert per_fn["ensemble"] == [1.0, 2.0, 0.0, None]
    assert per_fn["ensemble/b"] == [3.0, 2.0, None, None] and per_fn["ensemble_2/c"] == [2.0, 2.0, 4.0, None]
    assert totals == [2 * 1.0 + 0 - 2.0, 2 * 2.0 + 1 - 2.0, 0.0 + 0 - 4.0, 0.0]
    assert reward_mean_metrics(per_fn) == {
        "rewards/ensemble/mean": 1.0, "rewards/ensemble/a/mean": 1.0, "rewards/ensemble/b/mean": 2.5,
        "rewards/ensemble/a_2/mean": 1.0, "rewards/keyword/mean": 0.25, "rewards/ensemble_2/mean": 8 / 3,
        "rewards/ensemble_2/c/mean": 8 / 3,
        # the share of None (issue 30, item 13): sample 3 has no member's value, sample 2 none of b's
        **{f"rewards/{k}/none_fraction": v for k, v in {
            "ensemble": 0.25, "ensemble/a": 0.25, "ensemble/b": 0.5, "ensemble/a_2": 0.25, "ensemble_2": 0.25,
            "ensemble_2/c": 0.25}.items()}}


def test_an_ensemble_inside_an_ensemble_reports_its_members_too(members):
    inner = spec([members["a"], members["b"]], combine="min")
    _, fn = load_reward(spec([inner, members["c"]]))
    totals, per_fn = score_rewards([("ensemble", fn)], PROMPTS, COMPLETIONS)
    assert list(per_fn) == scored_names([("ensemble", fn)]) == [
        "ensemble", "ensemble/ensemble", "ensemble/ensemble/a", "ensemble/ensemble/b", "ensemble/c"]
    assert per_fn["ensemble"] == [1.5, 2.0, 2.0, None]  # mean of min(a, b) and c


def test_a_single_member_ensemble_is_that_member(members):
    for combine in ("mean", "min", "uwo"):
        _, fn = load_reward(spec([members["c"]], combine=combine, lam=5.0))
        assert fn(PROMPTS, COMPLETIONS) == [2.0, 2.0, 4.0, None]
    assert load_reward(spec([members["c"]]))[1]([], []) == []


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ("", ["ensemble needs members=[spec, ...]"]),
    ("members=[]", ["needs at least one member"]),
    ("members='keyword'", ["members must be a list of reward specs", "'keyword'"]),
    ("members=[3]", ["member 1 of 1 is 3"]),
    ("members=['keyword(include=[\"a\"])', 'no_such_reward']", ["member 2 of 2", "unknown reward 'no_such_reward'"]),
    ("members=['missing_dir/rm']", ["member 1 of 1", "missing_dir/rm"]),
    ("members=['target_length(target=-1)']", ["member 1 of 1", "target must be a positive number"]),
    ("members=['keyword(include=[\"a\"])'], combine='max'", ["unknown combine 'max'", "mean, min, uwo"]),
    ("members=['keyword(include=[\"a\"])'], combine='uwo', lam=-1", ["lam must be a finite number >= 0", "-1"]),
    ("members=['keyword(include=[\"a\"])'], lam='big'", ["lam must be", "'big'"]),
    ("members=['keyword(include=[\"a\"])'], lamda=1", ["unknown argument 'lamda'", "members, combine, lam"]),
])
def test_bad_ensemble_specs_are_one_line_user_errors_naming_the_culprit(kwargs, fragments):
    text = f"ensemble({kwargs})"
    with pytest.raises(UserError) as info:
        load_reward(text)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward spec {text!r}: ")
    assert all(f in message for f in fragments), message


def test_combine_and_lam_are_checked_before_any_member_loads(members, tmp_path):
    never_run = tmp_path / "never_run.py"
    never_run.write_text("raise RuntimeError('loaded')\n")
    with pytest.raises(UserError, match="unknown combine 'max'"):
        load_reward(spec([f"{never_run}:fn"], combine="max"))


def test_a_bad_member_value_names_the_ensemble_and_the_member(members):
    _, fn = load_reward(spec([members["a"], members["wrong_length"]]))
    with pytest.raises(RewardError, match="reward 'ensemble': reward 'wrong_length' returned the wrong number"):
        score_rewards([("ensemble", fn)], PROMPTS, COMPLETIONS)


def test_members_get_the_columns_and_conversational_completions_as_any_reward(members):
    prompts = [[{"role": "user", "content": f"say {w}"}] for w in ("one", "two")]
    _, fn = load_reward(spec([members["solved"], "keyword(include=['one'])"], combine="min"))
    totals, per_fn = score_rewards([("ensemble", fn)], prompts, ["one", "three"], columns={"solution": ["one", "two"]})
    assert per_fn == {"ensemble": [1.0, 0.0], "ensemble/solved": [1.0, 0.0], "ensemble/keyword": [1.0, 0.0]}


# ---------------------------------------------------------------- learned reward-model members

PAIRS = (["the cat", "a dog", "the tree"], [" sat on the mat", " ran", " is big and happy"])


def test_learned_reward_model_members(tiny_reward_models, tmp_path):
    rm_a, rm_b = tiny_reward_models
    a, b = (LearnedReward(folder, device="cpu")(*PAIRS) for folder in (rm_a, rm_b))
    assert all(abs(x - y) > 1e-4 for x, y in zip(a, b))  # the members disagree
    for combine, expected in [("min", [min(x, y) for x, y in zip(a, b)]),
                              ("uwo", [(x + y) / 2 - 0.5 * ((x - y) / 2) ** 2 for x, y in zip(a, b)])]:
        name, fn = load_reward(spec([rm_a, f"{rm_b}(batch_size=2)"], combine=combine, lam=0.5))
        assert fn.member_names == ["rm_a", "rm_b"] and all(isinstance(m, LearnedReward) for _, m in fn.members)
        _, per_fn = score_rewards([(name, fn)], *PAIRS)
        assert per_fn["ensemble"] == pytest.approx(expected, abs=1e-5)
        assert per_fn["ensemble/rm_a"] == pytest.approx(a, abs=1e-5)
        assert per_fn["ensemble/rm_b"] == pytest.approx(b, abs=1e-5)
    # seeds of one reward model are often folders of one name in different runs: they get _2, _3
    copy = tmp_path / "run_1" / "rm_a"
    shutil.copytree(rm_b, copy)
    assert load_reward(spec([rm_a, str(copy)]))[1].member_names == ["rm_a", "rm_a_2"]


def test_a_reward_model_named_by_several_specs_loads_and_scores_once(tiny_reward_models, tmp_path, monkeypatch):
    """The sweep's rewards: a proxy on its own and as a member of three ensembles over the same members."""
    rm_a, rm_b = tiny_reward_models
    expected = {folder: LearnedReward(folder, device="cpu")(*PAIRS) for folder in (rm_a, rm_b)}
    specs = [rm_a] + [spec([rm_a, rm_b], combine=c) for c in ("mean", "min", "uwo")]
    fns = [load_reward(s) for s in specs]
    assert fns[0][1] is fns[1][1].members[0][1] is fns[3][1].members[0][1]  # one object per folder
    assert fns[1][1].members[1][1] is fns[2][1].members[1][1]
    assert load_reward(f"{rm_a}(batch_size=2)")[1] is not fns[0][1]  # other arguments: another reward
    runs = []
    score_batch = LearnedReward._score_batch
    monkeypatch.setattr(LearnedReward, "_score_batch", lambda self, texts: runs.append(self.path) or
                        score_batch(self, texts))
    _, per_fn = score_rewards(fns, *PAIRS)
    assert sorted(map(str, runs)) == sorted([rm_a, rm_b])  # each model ran once for the four rewards
    assert per_fn["rm_a"] == pytest.approx(expected[rm_a], abs=1e-6)
    for key in ("ensemble", "ensemble_2", "ensemble_3"):
        assert per_fn[f"{key}/rm_a"] == pytest.approx(expected[rm_a], abs=1e-6)
        assert per_fn[f"{key}/rm_b"] == pytest.approx(expected[rm_b], abs=1e-6)
    score_rewards(fns, PAIRS[0], PAIRS[1][::-1])  # other completions: scored anew
    assert len(runs) == 4
    copy = tmp_path / "rm"
    shutil.copytree(rm_b, copy)
    first = load_reward(str(copy))[1]
    shutil.copytree(rm_a, copy, dirs_exist_ok=True)  # the folder written again: its model loads again
    second = load_reward(str(copy))[1]
    assert second is not first and second(*PAIRS) == pytest.approx(expected[rm_a], abs=1e-6)


def test_the_evaluator_reports_each_member(tiny_policy, tiny_reward_models, members, tmp_path):
    rm_a, rm_b = tiny_reward_models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random tiny policy's replies may be long for the reward models
        out = evaluate_policy(tiny_policy, ["the cat", "a dog", "the tree"],
                              [spec([rm_a, rm_b], combine="min")], SamplingConfig(max_new_tokens=4),
                              gold_rewards=[spec([members["a"], members["c"]])], output_dir=tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert all(set(s["rewards"]) == {"ensemble", "ensemble/rm_a", "ensemble/rm_b", "gold/ensemble",
                                     "gold/ensemble/a", "gold/ensemble/c"} for s in samples)
    assert all(s["reward"] == s["rewards"]["ensemble"] == min(s["rewards"]["ensemble/rm_a"],
                                                              s["rewards"]["ensemble/rm_b"]) for s in samples)
    for key in ("eval/rewards/ensemble", "eval/rewards/ensemble/rm_a", "eval/rewards/ensemble/rm_b",
                "eval/gold/ensemble", "eval/gold/ensemble/a", "eval/gold/ensemble/c"):
        assert math.isfinite(out[f"{key}/mean"]), key
    assert out["eval/reward/mean"] == pytest.approx(out["eval/rewards/ensemble/mean"])
    assert out["eval/gold/ensemble/mean"] == pytest.approx((1.5 + 2.0 + 2.0) / 3)  # mean of a and c per sample
