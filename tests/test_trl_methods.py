"""TRL baselines (GRPO, RLOO, DPO) on the tiny model: budget, metrics, gold rewards, saved policy, bad input."""

import dataclasses
import json

import pytest
import torch

from rlgen.config import EvalConfig, SamplingConfig
from rlgen.errors import UserError
from rlgen.models import set_threads
from rlgen.policy import Policy
from rlgen.trl_methods import check_options, preference_pairs, train_trl

set_threads(1)
PROMPTS = ["hello there", "how are you", "what a day", "tell me more", "good morning", "any plans"]


def words(prompts, completions, **kwargs):
    return [len(c.split()) / 5 for c in completions]


def sometimes(prompts, completions, **kwargs):
    """A proxy that skips (None) about half the completions, so some samples get no optimised reward at all."""
    return [None if len(c) % 2 else float(c.count("e")) for c in completions]


def gold(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def run(method, folder, out, reward_fns=(("words", words), ("gold", gold)), weights=(1.0, 0.0), **overrides):
    kwargs = dict(model=str(folder), output_dir=out, prompts=PROMPTS, reward_fns=list(reward_fns),
                  weights=list(weights), max_steps=2, batch_size=4, num_generations=2, learning_rate=1e-3, beta=0.05,
                  sampling=SamplingConfig(max_new_tokens=8), lora={"lora_r": 0}, seed=0, threads=1, options={})
    return train_trl(method, **{**kwargs, **overrides})


def weights_of(folder):
    return Policy.from_pretrained(str(folder), reference=False).model.state_dict()


def changed(start, end):
    return any(not torch.equal(start[k], end[k]) for k in start)


@pytest.fixture(scope="module")
def start_weights(tiny_folder):
    return weights_of(tiny_folder)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_methods_budget_metrics_and_saved_policy(method, tiny_folder, start_weights, tmp_path):
    out = run(method, tiny_folder, tmp_path)
    assert out["completions"] == 8 and out["tokens"] > 0
    assert [(p["step"], p["completions"]) for p in out["curve"]] == [(1, 4), (2, 8)]
    assert all({"rewards/words/mean", "rewards/gold/mean"} <= set(p) for p in out["curve"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["completions/generated"] for r in rows] == [4, 8]
    expected = {"objective/scores", "objective/kl", "objective/entropy", "loss/policy", "policy/learning_rate",
                "policy/grad_norm", "completions/mean_length", "rewards/words/mean", "rewards/gold/mean"}
    assert all(expected <= set(r) for r in rows)
    assert all(k in expected | {"step", "completions/generated", "policy/clipfrac"} for r in rows for k in r)
    # the optimised score is the weighted proxy alone: the gold reward (weight 0) is not in it
    assert all(r["objective/scores"] == pytest.approx(r["rewards/words/mean"]) for r in rows)
    assert changed(start_weights, weights_of(tmp_path))
    assert not (tmp_path / "value_head.safetensors").exists()  # TRL trains no value head


def test_lora_run_saves_a_merged_changed_policy(tiny_folder, start_weights, tmp_path):
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
    out = run("grpo", tiny_folder, tmp_path, lora=lora)
    assert out["completions"] == 8
    assert (tmp_path / "adapter").is_dir()
    end = weights_of(tmp_path)  # a plain model folder: the adapter is merged
    assert set(end) == set(start_weights) and changed(start_weights, end)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_gold_reward_at_weight_zero_does_not_change_training(method, tiny_folder, tmp_path):
    skipped = []

    def proxy(prompts, completions, **kwargs):
        values = sometimes(prompts, completions)
        skipped.append(values.count(None))
        return values

    alone = run(method, tiny_folder, tmp_path / "alone", reward_fns=[("proxy", proxy)], weights=[1.0])
    with_gold = run(method, tiny_folder, tmp_path / "gold", reward_fns=[("proxy", proxy), ("gold", gold)],
                    weights=[1.0, 0.0])
    assert sum(skipped) > 0  # samples with no optimised reward occurred: TRL's unscorable-row rule was exercised
    assert "rewards/gold/mean" in with_gold["curve"][-1] and "rewards/gold/mean" not in alone["curve"][-1]
    a, b = weights_of(tmp_path / "alone"), weights_of(tmp_path / "gold")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_an_ensembles_members_are_logged_beside_it(method, tiny_folder, tmp_path):
    """GRPO gets the combined values (TRL's rewards/ensemble/mean) and the members' means through log_metric; a gold
    ensemble's members are logged too; DPO's sampled means carry them as well."""
    from rlgen.rewards import RewardEnsemble

    proxy = RewardEnsemble([("words", words), ("sometimes", sometimes)], combine="min")
    golds = RewardEnsemble([("gold", gold), ("words", words)])
    out = run(method, tiny_folder, tmp_path, reward_fns=[("ensemble", proxy), ("ensemble_2", golds)])
    keys = {f"rewards/{k}/mean" for k in ("ensemble", "ensemble/words", "ensemble/sometimes", "ensemble_2",
                                          "ensemble_2/gold", "ensemble_2/words")}
    for point in out["curve"]:
        assert keys - {"rewards/ensemble/sometimes/mean"} <= set(point)  # `sometimes` may give only None in a step
        assert point["rewards/ensemble_2/words/mean"] == pytest.approx(point["rewards/ensemble/words/mean"])
    if method == "grpo":
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(keys - {"rewards/ensemble/sometimes/mean"} <= set(r) for r in rows)
        assert all(r["objective/scores"] == pytest.approx(r["rewards/ensemble/mean"]) for r in rows)


def test_preference_pairs_rank_by_score_and_keep_ties():
    rows = preference_pairs(["p1", "p2", "p3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"], [1.0, 0.0, 0.5], [0.0, 2.0, 0.5])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a1", "b1"), ("b2", "a2"), ("a3", "b3")]
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(1.0, 0.0), (2.0, 0.0), (0.5, 0.5)]
    assert [r["prompt"] for r in rows] == ["p1", "p2", "p3"]


def test_dpo_samples_the_budget_ranks_pairs_and_trains(tiny_folder, start_weights, tmp_path):
    out = run("dpo", tiny_folder, tmp_path, beta=0.1)
    assert out["completions"] == 8 and out["tokens"] > 0
    pairs = [json.loads(line) for line in (tmp_path / "preference_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    assert all(p["chosen_score"] == pytest.approx(words([], [p["chosen"]])[0]) for p in pairs)  # gold weight 0
    assert [(p["step"], p["completions"]) for p in out["curve"]] == [(0, 8)]
    assert {"rewards/words/mean", "rewards/gold/mean"} <= set(out["curve"][0])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"loss/dpo", "objective/dpo_margin", "objective/dpo_accuracy", "completions/generated"} <= set(r)
               for r in rows)
    assert changed(start_weights, weights_of(tmp_path))


@pytest.mark.parametrize("method", ["grpo", "rloo", "dpo"])
def test_unknown_option_names_method_and_key(method, tiny_folder, tmp_path):
    with pytest.raises(UserError, match=rf"{method}: unknown option 'not_a_field'"):
        run(method, tiny_folder, tmp_path, options={"not_a_field": 1})
    assert not tmp_path.joinpath("metrics.jsonl").exists()
    with pytest.raises(UserError, match=rf"{method}: unknown option 'not_a_field'"):
        check_options(method, {"not_a_field": 1})
    check_options(method, {"learning_rate": 1e-5})


@pytest.mark.parametrize("num_generations", [3, 1])
def test_num_generations_must_divide_the_batch(num_generations, tiny_folder, tmp_path):
    with pytest.raises(UserError, match="num_generations"):
        run("grpo", tiny_folder, tmp_path, num_generations=num_generations)


def test_negative_eval_steps_is_refused(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="grpo: eval_steps must be at least 0, got -1"):
        run("grpo", tiny_folder, tmp_path, eval_steps=-1)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


LORA_DROPOUT = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_modules": "all-linear"}


@pytest.mark.parametrize("method, lora, options", [
    ("grpo", {"lora_r": 0}, {}),
    ("dpo", LORA_DROPOUT, {"disable_dropout": False}),  # dropout: dpo then draws random numbers while training
    ("rloo", LORA_DROPOUT, {}),
], ids=["grpo", "dpo_lora_dropout", "rloo_lora"])
def test_eval_steps_evaluate_the_live_policy_without_changing_training(method, lora, options, tiny_folder, tmp_path):
    """Every eval_steps optimiser steps the shared evaluator scores the trainer's model (put in eval mode and back:
    LoRA dropout is on in training) against the starting model; its random draws are undone, so the trained weights
    are bit-identical to a run without it. The last one is `rlgen evaluate` of the saved policy against the start."""
    from rlgen.evaluation import run_evaluation

    plain = run(method, tiny_folder, tmp_path / "plain", max_steps=4, lora=lora, options=options)
    evaluation = EvalConfig(output_dir=str(tmp_path / "evals"), num_prompts=3, batch_size=2, max_new_tokens=8,
                            reward=["keyword(include=['a'])"], gold_reward=["sentiment_positive"])
    out = run(method, tiny_folder, tmp_path / "eval", max_steps=4, lora=lora, options=options, eval_steps=2,
              eval_config=evaluation)
    a, b = weights_of(tmp_path / "plain"), weights_of(tmp_path / "eval")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert out["curve"] == plain["curve"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward/mean" in r]
    assert evals == out["evals"] and [r["step"] for r in rows if r not in evals] == [1, 2, 3, 4]
    generated = [16, 16] if method == "dpo" else [8, 16]  # dpo samples its whole budget before training
    assert [(r["step"], r["completions/generated"], r["eval/num_samples"]) for r in evals] == \
        [(2, generated[0], 3), (4, generated[1], 3)]
    assert {"eval/rewards/keyword/mean", "eval/gold/sentiment_positive/mean", "eval/kl", "time/eval"} <= set(evals[0])
    assert len((tmp_path / "evals" / "step2" / "eval_samples.jsonl").read_text().splitlines()) == 3
    final = run_evaluation(dataclasses.replace(evaluation, model=str(tmp_path / "eval"),
                                               output_dir=str(tmp_path / "final")), ref_name=str(tiny_folder))
    for key in ("eval/kl", "eval/perplexity_ref", "eval/reward/mean", "eval/gold/sentiment_positive/mean"):
        assert evals[-1][key] == pytest.approx(final[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", ["grpo", "rloo", "dpo"])
def test_rewards_get_conversational_completions_completion_ids_and_columns(method, tiny_folder, tiny_tokenizer,
                                                                           tmp_path):
    """As TRL calls its reward functions (and rlgen's PPO calls them): one assistant message per completion of a
    conversational prompt, the sampled token ids and the dataset's other columns, row by row."""
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    calls = []

    def check(prompts, completions, completion_ids, solution, **kwargs):
        texts = [c[0]["content"] for c in completions]
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in completions)
        assert texts == [tiny_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
        assert solution == [p[0]["content"].upper() for p in prompts]
        calls.append(len(completions))
        return [float(len(ids)) for ids in completion_ids]

    out = run(method, tiny_folder, tmp_path, prompts=prompts, reward_fns=[("check", check), ("gold", check)],
              columns={"solution": [p.upper() for p in PROMPTS]})
    assert sum(calls) == 2 * out["completions"]  # the proxy and the gold saw every completion


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_model_folders_generation_config_does_not_change_trl_sampling(method, tiny_folder, tmp_path, monkeypatch):
    """transformers fills the generation fields TRL leaves unset from the folder's generation_config.json (min_p,
    suppress_tokens, no_repeat_ngram_size...), whose processors TRL's log-probs ignore. TRL samples as
    Policy.sample does: from the same prompts and random state, the tokens Policy.sample draws from the plain
    folder."""
    from conftest import opinionated_copy
    from transformers.generation.utils import GenerationMixin

    generate, states, scored = GenerationMixin.generate, [], []

    def spy(self, *args, **kwargs):
        states.append(torch.get_rng_state())
        return generate(self, *args, **kwargs)

    def record(prompts, completions, completion_ids, **kwargs):
        scored.append((prompts, completion_ids))
        return [0.0] * len(completions)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    run(method, opinionated_copy(tiny_folder, tmp_path), tmp_path / "out", reward_fns=[("record", record)],
        weights=[1.0], max_steps=1)
    monkeypatch.setattr(GenerationMixin, "generate", generate)
    prompts, sampled = scored[0]
    plain = Policy.from_pretrained(str(tiny_folder), reference=False)
    torch.set_rng_state(states[0])
    assert plain.sample(prompts, SamplingConfig(max_new_tokens=8), with_values=False).completion_id_lists == sampled


def _rlgen_hooks(model):
    """The forward hooks a Policy put on `model`."""
    from rlgen.policy import _contiguous_input, _StepRecorder

    hooks = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    return [h for h in hooks if h is _contiguous_input or isinstance(getattr(h, "__self__", None), _StepRecorder)]


@pytest.mark.parametrize("lora", [{"lora_r": 0}, LORA_DROPOUT], ids=["full", "lora"])
def test_evaluations_along_training_leave_no_hooks_on_the_trained_model(lora, tiny_folder, tmp_path, monkeypatch):
    """The evaluation samples through a Policy's forward hooks; they are taken off the trained model again, so
    TRL's own generation and training forwards after it do not run them."""
    from transformers.generation.utils import GenerationMixin

    generate, models, hooked = GenerationMixin.generate, [], []

    def spy(self, *args, **kwargs):
        models.append(self)
        return generate(self, *args, **kwargs)

    def check(prompts, completions, **kwargs):  # called by TRL right after its own generation
        hooked.append(len(_rlgen_hooks(models[-1])))
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    evaluation = EvalConfig(output_dir=str(tmp_path / "evals"), num_prompts=2, batch_size=2, max_new_tokens=4,
                            reward=["keyword(include=['a'])"])
    out = run("grpo", tiny_folder, tmp_path / "out", reward_fns=[("check", check)], weights=[1.0], max_steps=3,
              lora=lora, eval_steps=1, eval_config=evaluation)
    assert [e["step"] for e in out["evals"]] == [1, 2, 3] and hooked == [0, 0, 0]
