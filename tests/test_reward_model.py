"""Learned reward models: pair building, metrics, TRL RewardTrainer end to end on tiny models, normalisation,
and the optional toxicity reward. Offline; the whole file runs in well under a minute on one CPU thread."""

import doctest
import itertools
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

from rlgen import reward_model  # noqa: E402
from rlgen.errors import UserError  # noqa: E402
from rlgen.files import read_jsonl  # noqa: E402
from rlgen.reward_model import (  # noqa: E402
    RewardModelConfig,
    context_key,
    load_reward_base,
    match_by_margin,
    similar_context_pairs,
    tokenize_pairs,
    train_reward_model,
)
from rlgen.rewards import LearnedReward, load_reward, rules  # noqa: E402

GOOD = ["great", "lovely", "wonderful", "happy", "nice", "fun"]
BAD = ["awful", "terrible", "sad", "horrible", "bad", "boring"]


def _pairs(n, seed=0, offset=0):
    """Trivially separable pairs: the chosen reply uses only upbeat words, the rejected one only gloomy words."""
    rng = random.Random(seed)
    return [{"prompt": f"How was day {offset + i}? ", "chosen": f"it was {rng.choice(GOOD)} and {rng.choice(GOOD)}",
             "rejected": f"it was {rng.choice(BAD)} and {rng.choice(BAD)}"} for i in range(n)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, data, **overrides):
    values = dict(model="tiny", dataset=str(data), output_dir=str(tmp_path / "rm"), max_steps=40, batch_size=8,
                  learning_rate=1e-3, logging_steps=5, calibration_model="none", calibration_samples=64,
                  gold_reward="sentiment_positive")
    return RewardModelConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A tiny reward model trained once on 120 separable pairs from a single file (~10% held out by hash)."""
    tmp = tmp_path_factory.mktemp("toy")
    data = _write_jsonl(tmp / "pairs.jsonl", _pairs(120))
    summary = train_reward_model(_config(tmp, data))
    return tmp / "rm", summary


# ---------------------------------------------------------------- pure functions


def test_doctests():
    result = doctest.testmod(reward_model)
    assert result.attempted >= 8 and result.failed == 0


def _most_pairs(scores, margin):
    """Brute force: the largest matching whose pairs differ by at least `margin`."""
    for k in range(len(scores) // 2, 0, -1):
        for chosen in itertools.permutations(range(len(scores)), 2 * k):
            if all(abs(scores[chosen[2 * i]] - scores[chosen[2 * i + 1]]) >= margin for i in range(k)):
                return k
    return 0


def test_match_by_margin_is_maximal_and_valid():
    rng = random.Random(1)
    for _ in range(40):
        scores = [round(rng.uniform(-1, 1), 1) for _ in range(rng.randint(0, 6))]
        pairs = match_by_margin(list(range(len(scores))), scores, 0.5)
        used = [i for p in pairs for i in p]
        assert len(used) == len(set(used))
        assert all(scores[hi] - scores[lo] >= 0.5 for hi, lo in pairs)
        assert len(pairs) == _most_pairs(scores, 0.5)


def test_similar_context_pairs():
    rng = random.Random(0)
    contexts = ["How are you?", "how are things", "Do you like dogs?", "do you cook", "Hello!", "hello there"]
    rows = [{"prompt": rng.choice(contexts) + f" {i}", "completion": f"reply {i}"} for i in range(600)]
    scores = [rng.choice([-0.8, 0.0, 0.0, 0.3, 0.9]) for _ in rows]
    scores[5] = None  # unscored rows are skipped
    by_text = {r["completion"]: (r["prompt"], s) for r, s in zip(rows, scores)}
    pairs = similar_context_pairs(rows, scores, margin=0.5, rng=random.Random(0))
    assert len(pairs) > 100
    replies = [p[side] for p in pairs for side in ("chosen", "rejected")]
    assert len(replies) == len(set(replies)) and "reply 5" not in replies
    true_chosen = 0
    for p in pairs:
        (chosen_context, chosen_score), (rejected_context, rejected_score) = by_text[p["chosen"]], by_text[p["rejected"]]
        assert chosen_score - rejected_score >= 0.5 and p["gold_gap"] == chosen_score - rejected_score
        assert context_key(chosen_context) == context_key(rejected_context)
        assert p["prompt"] in (chosen_context, rejected_context)
        true_chosen += p["prompt"] == chosen_context
    assert 0.35 < true_chosen / len(pairs) < 0.65  # the reply that followed the prompt is not a label


def test_correlations_and_accuracy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = np.round(x + rng.normal(size=200), 0)  # many ties
    assert reward_model.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    stats = pytest.importorskip("scipy.stats")
    assert reward_model.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert reward_model.pairwise_accuracy([2.0, 1.0], [1.0, 2.0]) == 0.5


def test_normalisation_function():
    raw = list(np.random.default_rng(0).normal(3.0, 2.0, size=500))
    gain, bias = reward_model.normalisation(raw)
    scaled = gain * np.asarray(raw) + bias
    assert scaled.mean() == pytest.approx(0.0, abs=1e-9) and scaled.std() == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="constant"):
        assert reward_model.normalisation([2.0, 2.0]) == (1.0, -2.0)


def test_tokenize_pairs_matches_learned_reward_inputs():
    model, tokenizer = load_reward_base("tiny")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    pairs = _pairs(3)
    ds = tokenize_pairs(pairs, tokenizer, max_length=128)
    for row, pair in zip(ds, pairs):
        assert row["chosen_ids"] == tokenizer(pair["prompt"] + pair["chosen"])["input_ids"]  # no EOS appended
        assert row["rejected_ids"] == tokenizer(pair["prompt"] + pair["rejected"])["input_ids"]
    cut = tokenize_pairs(pairs, tokenizer, max_length=4)[0]["chosen_ids"]
    assert cut == ds[0]["chosen_ids"][-4:]  # the completion survives truncation
    with_margin = tokenize_pairs([{**pairs[0], "margin": 0.5}, pairs[1]], tokenizer, max_length=128)
    assert with_margin["margin"] == [0.5, 0.0]  # TRL's margin loss column


def _chat(pair):
    """A pair in TRL's conversational format with an implicit prompt (the shared first message)."""
    user = [{"role": "user", "content": pair["prompt"]}]
    return {side: user + [{"role": "assistant", "content": pair[side]}] for side in ("chosen", "rejected")}


def test_conversational_pairs_are_scored_as_learned_reward_scores_conversations(tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", [_chat(p) for p in _pairs(60)])
    train, heldout = reward_model.load_preference_pairs(str(data))
    first = next(p for p in _pairs(60) if p["prompt"] == train[0]["prompt"][0]["content"])
    assert train[0]["chosen"] == [{"role": "assistant", "content": first["chosen"]}] and len(train) + len(heldout) == 60
    summary = train_reward_model(_config(tmp_path, data, max_steps=2))
    assert summary["counts"]["eval_pairs"] == len(heldout)
    _, tokenizer = load_reward_base("tiny")
    ids = tokenize_pairs(train[:1], tokenizer, max_length=128)[0]["chosen_ids"]
    text = f"user: {first['prompt']}\nassistant: {first['chosen']}\n"
    assert ids == tokenizer(text)["input_ids"]
    reward = LearnedReward(tmp_path / "rm")
    scores = reward([train[0]["prompt"]] * 2, [first["chosen"], train[0]["chosen"]])
    assert scores == pytest.approx([reward([text], [""])[0]] * 2, abs=1e-5)


# ---------------------------------------------------------------- training end to end


def test_reward_trainer_end_to_end(tmp_path, capsys):
    """A handful of pairs from a folder (train + validation), calibrated on tiny-policy samples; the accuracy is
    printed with its number of pairs, and no empty checkpoints/ folder is left."""
    data = tmp_path / "prefs"
    _write_jsonl(data / "train.jsonl", _pairs(8))
    _write_jsonl(data / "validation.jsonl", _pairs(4, seed=1, offset=100))
    cfg = _config(tmp_path, data, max_steps=3, logging_steps=1, calibration_model="tiny", calibration_samples=4,
                  max_new_tokens=4)
    summary = train_reward_model(cfg)
    out = tmp_path / "rm"
    assert summary["counts"]["train_pairs"] == 8 and summary["counts"]["eval_pairs"] == 4
    assert summary["steps"] == 3
    # the held-out accuracy is the trained model's on the validation pairs (ties count half)
    heldout, scorer = _pairs(4, seed=1, offset=100), LearnedReward(out, device="cpu")
    prompts = [p["prompt"] for p in heldout]
    chosen = scorer(prompts, [p["chosen"] for p in heldout])
    rejected = scorer(prompts, [p["rejected"] for p in heldout])
    right = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected))
    assert summary["metrics"]["eval/pairwise_accuracy"] == right / 4, (chosen, rejected)
    printed = capsys.readouterr().out
    assert f"held-out pairwise accuracy {right / 4:.3f}" in printed and "on 4 pairs" in printed
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "reward_model_summary.json").read_text())["counts"] == summary["counts"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    assert {"loss/reward", "reward_model/pairwise_accuracy", "eval/pairwise_accuracy", "eval/gold_pearson",
            "eval/gold_spearman"} <= names
    calibration = [json.loads(line) for line in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(calibration) == 4 and all(isinstance(c["completion"], str) for c in calibration)
    assert json.loads((out / "rlgen_reward.json").read_text())["calibration_model"] == "tiny"
    # every consumer loads the folder: LearnedReward, the reward-spec loader, and TRL GRPO's loader
    name, reward = load_reward(str(out))
    assert name == "rm" and len(reward(["a "], ["b"])) == 1
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).config.num_labels == 1


def test_learned_reward_prefers_trained_preference(toy_model):
    folder, summary = toy_model
    assert summary["counts"]["eval_pairs"] > 0
    assert summary["metrics"]["eval/pairwise_accuracy"] == 1.0
    reward = LearnedReward(folder, device="cpu")
    good, bad = reward(["How was your weekend? "] * 2, ["it was lovely and fun", "it was boring and awful"])
    assert good > bad


def test_normalisation_on_calibration_set(toy_model):
    folder, summary = toy_model
    calibration = [json.loads(line) for line in (folder / "calibration.jsonl").read_text().splitlines()]
    assert len(calibration) == summary["normalisation"]["calibration_samples"] >= 16
    scores = np.asarray(LearnedReward(folder, device="cpu")([c["prompt"] for c in calibration],
                                                            [c["completion"] for c in calibration]))
    assert scores.mean() == pytest.approx(0.0, abs=1e-4)
    assert scores.std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("prompts, sizes", [(4, (20, 20)), (16, (35, 5)), (1, (36, 4))])
def test_a_small_preference_file_is_split_by_prompt_where_it_can(tmp_path, prompts, sizes):
    """40 pairs over 4 or 16 prompts that hash into too few splits: whole prompts are held out (prompt rank), so no
    prompt's pairs are on both sides; one prompt can only be split by row rank."""
    from rlgen.reward_model import load_preference_pairs

    data = tmp_path / "prefs.jsonl"
    _write_jsonl(data, [{**pair, "prompt": f"How was your day {i % prompts}? "} for i, pair in enumerate(_pairs(40))])
    train, heldout = load_preference_pairs(str(data))
    assert (len(train), len(heldout)) == sizes
    assert sorted(map(json.dumps, train + heldout)) == sorted(json.dumps(r) for r in read_jsonl(data))
    if prompts > 1:
        assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("rows", "overrides", "pattern"),
    [
        (None, {}, r"prefs\.jsonl does not exist"),
        ([], {}, r"prefs\.jsonl is empty"),
        ([{"prompt": "p", "chosen": "a"}], {}, r"prefs\.jsonl has no column 'rejected'"),
        ([{"prompt": "p", "chosen": "a", "rejected": None}], {}, r"prefs\.jsonl: row 1 has an empty 'rejected'"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], {}, r"prefs\.jsonl: no held-out pairs"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], {}, r"row 1 has a non-numeric margin"),
        (_pairs(60), {"model": "no/such/folder/"}, r"no/such/folder/ does not exist"),
        (_pairs(60), {"dataset": "chitchat-upbeat", "gold_reward": "none"}, r"gold_reward"),
        (_pairs(60), {"calibration_samples": 1}, r"calibration_samples must be at least 2"),
    ],
)
def test_bad_input_names_the_culprit(tmp_path, rows, overrides, pattern):
    data = tmp_path / "prefs.jsonl"
    if rows is not None:
        _write_jsonl(data, rows)
    with pytest.raises(UserError, match=pattern):
        train_reward_model(_config(tmp_path, data, **overrides))
    assert not (tmp_path / "rm").exists()  # nothing written: the retry of the same command is not refused


# ---------------------------------------------------------------- optional toxicity reward


def test_toxicity_penalty():
    pytest.importorskip("profanity_check")
    clean, rude = rules.toxicity_penalty(["", ""], ["have a nice day", "you are a fucking idiot"])
    assert -0.5 < clean <= 0.0 and -1.0 <= rude < -0.9
    assert rules.toxicity_penalty([], []) == []
    assert load_reward("toxicity_penalty") == ("toxicity_penalty", rules.toxicity_penalty)


def test_toxicity_penalty_without_package(monkeypatch):
    rules._profanity_prob.cache_clear()
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import fails as if not installed
    try:
        with pytest.raises(UserError, match="pip install alt-profanity-check"):
            load_reward("toxicity_penalty")
    finally:
        rules._profanity_prob.cache_clear()
