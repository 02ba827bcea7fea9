"""Reward protocol: rule rewards, spec loading, scoring/validation and the learned reward model."""

import doctest
import importlib.util
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

from rlgen.errors import RewardError, UserError  # noqa: E402
from rlgen.rewards import (  # noqa: E402
    BUILTIN_REWARDS,
    LearnedReward,
    load_reward,
    reward_mean_metrics,
    reward_name,
    rules,
    score_rewards,
)


def _call(fn, completions, **kwargs):
    return fn([""] * len(completions), completions, **kwargs)


# ---------------------------------------------------------------- rule rewards


def test_rule_docstring_examples():
    result = doctest.testmod(rules)
    assert result.attempted >= 7 and result.failed == 0


@pytest.mark.parametrize(
    ("fn", "completions", "kwargs", "expected"),
    [
        (rules.target_length, ["a b c d e"], {"target": 5}, [0.0]),
        (rules.target_length, ["a b", "a b c d e f g h i j"], {"target": 5}, [-0.6, -1.0]),
        (rules.target_length, ["", "  spaced   out  "], {"target": 2}, [-1.0, 0.0]),
        (rules.target_length, ["abcd", "abcdefgh"], {"target": 4, "unit": "chars"}, [0.0, -1.0]),
        (rules.target_length, [" ".join(["w"] * 20)], {}, [0.0]),
        (rules.keyword, ["Great fun", "great", "nothing"], {"include": ["great", "fun"]}, [1.0, 0.5, 0.0]),
        (rules.keyword, ["GREAT", "great"], {"include": ["great"], "case_sensitive": True}, [0.0, 1.0]),
        (rules.keyword, ["so boring", "fine"], {"exclude": ["boring"]}, [-1.0, 0.0]),
        (rules.keyword, ["funny", "fun.", "new york"], {"include": ["fun", "New York"]}, [0.0, 0.5, 0.5]),
        (rules.keyword, ["great but dull"], {"include": "great", "exclude": ("dull", "slow")}, [0.0]),
        (rules.regex_match, ["abc123", "abc"], {"pattern": r"\d"}, [1.0, 0.0]),
        (rules.regex_match, ["The end.", "the end"], {"pattern": r"^The .*\.$"}, [1.0, 0.0]),
        (rules.repetition_penalty, ["a b c d e"], {}, [0.0]),
        (rules.repetition_penalty, ["a b c a b c"], {}, [-0.25]),
        (rules.repetition_penalty, ["a a a a a a"], {"n": 1}, [-5 / 6]),
        (rules.repetition_penalty, ["a b", ""], {"n": 3}, [0.0, 0.0]),
        (rules.repetition_penalty, ["x y x y x y x y"], {"n": 2}, [-5 / 7]),
    ],
)
def test_rule_rewards(fn, completions, kwargs, expected):
    assert _call(fn, completions, **kwargs) == pytest.approx(expected)


def test_rules_ignore_extra_kwargs():
    for fn in (rules.target_length, rules.repetition_penalty, rules.sentiment_positive):
        assert len(fn(["p"], ["some text here"], answer="x", trainer_state=None)) == 1
    assert rules.regex_match(["p"], ["x"], pattern="x", completion_ids=[[1]]) == [1.0]


def test_sentiment_matches_vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["What a wonderful, happy day, I love it!", "This is awful, I hate it and feel terrible."]
    compound = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    positive = _call(rules.sentiment_positive, texts)
    negative = _call(rules.sentiment_negative, texts)
    assert positive == compound and negative == [-c for c in compound]
    assert positive[0] > 0.5 and positive[1] < -0.5
    assert all(-1.0 <= v <= 1.0 for v in positive + negative)
    assert rules._analyzer() is rules._analyzer()


@pytest.mark.parametrize(
    ("fn", "kwargs", "fragment"),
    [
        (rules.target_length, {"unit": "lines"}, "unit"),
        (rules.target_length, {"target": 0}, "target"),
        (rules.target_sentiment, {"target": 1.5}, "target must be a number in"),
        (rules.keyword, {}, "at least one keyword"),
        (rules.regex_match, {"pattern": "(unclosed"}, "bad pattern"),
        (rules.repetition_penalty, {"n": 0}, "n must be"),
    ],
)
def test_rule_bad_arguments(fn, kwargs, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        fn([], [], **kwargs)
    assert fn.__name__ in str(info.value)


# ---------------------------------------------------------------- load_reward


def test_builtin_table():
    assert set(BUILTIN_REWARDS) == {
        "sentiment_positive",
        "sentiment_negative",
        "sentiment_textblob",
        "sentiment_lexicons",
        "target_sentiment",
        "target_length",
        "keyword",
        "regex_match",
        "repetition_penalty",
        "toxicity_penalty",
        "ensemble",
        "adversarial",
    }
    optional_missing = set() if importlib.util.find_spec("profanity_check") else {"toxicity_penalty"}
    # those that need arguments aside (ensemble: tests/test_rewards_ensemble.py), and the adversarial factory
    # (tests/test_adversarial.py)
    for name in BUILTIN_REWARDS:
        if name not in ("regex_match", "keyword", "ensemble", "adversarial", *optional_missing):
            assert load_reward(name) == (name, BUILTIN_REWARDS[name])


@pytest.mark.parametrize(
    ("spec", "name", "completion", "expected"),
    [
        ("target_length(target=2)", "target_length", "a b c", -0.5),
        (" target_length( target = 4 , unit='chars' ) ", "target_length", "abcdef", -0.5),
        ("keyword(include=['great', 'fun'])", "keyword", "great", 0.5),
        ("keyword(include=('a',), exclude={'b'}, case_sensitive=True)", "keyword", "a B", 0.5),
        ("regex_match(pattern=r'\\d+$')", "regex_match", "year 2024", 1.0),
        ("repetition_penalty(n=1)", "repetition_penalty", "a a", -0.5),
        ("repetition_penalty()", "repetition_penalty", "a a", 0.0),
    ],
)
def test_builtin_with_arguments(spec, name, completion, expected):
    got_name, fn = load_reward(spec)
    assert got_name == name and fn.__name__ == name
    assert fn(prompts=["p"], completions=[completion]) == pytest.approx([expected])


@pytest.fixture
def reward_package(tmp_path, monkeypatch):
    package = tmp_path / "myrewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "def scaled_length(prompts, completions, scale=1.0, **kwargs):\n"
        "    return [scale * len(c) for c in completions]\n"
        "def strict(prompts, completions, scale=1.0):\n"
        "    return [scale] * len(completions)\n"
        "NOT_CALLABLE = 3\n"
    )
    (package / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_module_function(reward_package):
    name, fn = load_reward("myrewards.mod:scaled_length")
    assert name == "scaled_length" and fn(["p"], ["abc"]) == [3.0]
    name, fn = load_reward("myrewards.mod:scaled_length(scale=2.0)")
    assert name == "scaled_length" and fn.__name__ == "scaled_length"
    assert fn(prompts=["p"], completions=["abc"], extra_column=1) == [6.0]
    name, fn = load_reward("myrewards.mod:scaled_length(anything=1)")
    assert fn(["p"], ["ab"]) == [2.0]


def test_file_function(tmp_path):
    path = tmp_path / "my reward.py"
    path.write_text(
        "def bonus(prompts, completions, value=1.0, **kwargs):\n    return [value] * len(completions)\n"
    )
    name, fn = load_reward(f"{path}:bonus(value=0.5)")
    assert name == "bonus" and fn(["p", "q"], ["a", "b"]) == [0.5, 0.5]
    other_name, other = load_reward(f"{path}:bonus")
    assert other_name == "bonus" and other is fn.func  # the file ran once: one module


def test_a_reward_file_runs_once_per_process(tmp_path):
    """Before, every load_reward of a file spec ran the file again (several times per comparison)."""
    runs = tmp_path / "runs.txt"
    path = tmp_path / "counted.py"
    path.write_text(f"open({str(runs)!r}, 'a').write('ran\\n')\n\n\n"
                    "def first(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n\n\n"
                    "def second(prompts, completions, scale=1.0, **kwargs):\n    return [scale] * len(completions)\n")
    specs = [f"{path}:first", f"{path}:second(scale=2.0)", f"{tmp_path}/../{tmp_path.name}/counted.py:first"]
    loaded = [load_reward(spec) for spec in specs]
    assert runs.read_text() == "ran\n"
    assert [name for name, _ in loaded] == ["first", "second", "first"] and loaded[0][1] is loaded[2][1]
    assert [fn(["p"], ["c"]) for _, fn in loaded] == [[1.0], [2.0], [1.0]]


def test_reward_name_loads_nothing(tmp_path, reward_package):
    """compare names rewards with reward_name: before, it loaded each learned model (here: a broken one)."""
    from rlgen.compare import _reward_names

    broken = tmp_path / "my rm"
    broken.mkdir()
    assert reward_name(str(broken)) == reward_name(f"{broken}(batch_size=2)") == "my_rm"
    with pytest.raises(UserError, match="config.json is missing"):
        load_reward(str(broken))
    assert _reward_names([str(broken), "target_length(target=3)", str(broken)]) == ["my_rm", "target_length",
                                                                                     "my_rm_2"]
    never_run = tmp_path / "never_run.py"
    never_run.write_text("raise RuntimeError('ran')\n")
    assert reward_name(f"{never_run}:fn(scale=2)") == "fn"
    for spec in ("target_length(target=3)", "myrewards.mod:scaled_length(scale=2.0)", "sentiment_positive"):
        assert reward_name(spec) == load_reward(spec)[0], spec


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("no_such_reward", ["no_such_reward", "sentiment_positive", "repetition_penalty"]),
        ("Target_Length(target=3)", ["Target_Length", "target_length"]),
        ("rlgen_no_such_module_xyz:fn", ["cannot import module", "rlgen_no_such_module_xyz"]),
        ("myrewards.broken:fn", ["RuntimeError", "boom at import"]),
        ("myrewards.mod:missing", ["module myrewards.mod", "has no function 'missing'"]),
        ("myrewards.mod:NOT_CALLABLE", ["NOT_CALLABLE", "not callable"]),
        ("myrewards.mod:strict(nope=1)", ["unknown argument 'nope'", "scale"]),
        ("math:pi", ["'pi'", "not callable"]),
        ("missing_dir/rewards.py:fn", ["file not found", "missing_dir/rewards.py"]),
        ("missing_dir/model", ["neither a local folder", "missing_dir/model"]),
        ("target_length(30)", ["only keyword arguments"]),
        ("target_length(target=30", ["bad syntax"]),
        ("target_length(target=len('abc'))", ["not a literal", "target=len('abc')"]),
        ("target_length(target=30, target=40)", ["repeated argument 'target'"]),
        ("target_length(**{'target': 3})", ["unpacking"]),
        ("target_length(target=)", ["bad arguments"]),
        ("target_length(x=1), keyword(", ["bad"]),
        ("target_length(targt=30)", ["unknown argument 'targt'", "target, unit"]),
        ("target_length(unit='lines')", ["target_length(unit='lines')", "unit"]),
        ("keyword", ["at least one keyword"]),
        ("keyword(include=5)", ["keyword(include=5)", "TypeError"]),
        ("regex_match", ["pattern"]),
        ("target_length(prompts=['x'])", ["prompts"]),
        ("", ["empty"]),
    ],
)
def test_bad_specs(spec, fragments, reward_package):
    with pytest.raises(UserError) as info:
        load_reward(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_reward_factory_is_called_at_load_time():
    """Before, the factory's arguments were bound to it and it failed when first called as a reward (after the
    model loaded): a target that takes neither prompts/completions nor **kwargs is now a factory, called here."""
    spec = "trl.rewards:get_soft_overlong_punishment(max_completion_len=16, soft_punish_cache=4)"
    name, fn = load_reward(spec)
    assert name == reward_name(spec) == "get_soft_overlong_punishment"
    scores = fn(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1] * 10, [1] * 14])
    assert scores == [0.0, -0.5]  # 14 tokens: 2 into the 4-token cache before 16


def test_factory_errors_name_the_spec(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text("def make(scale):\n    return lambda prompts, completions, **kw: [scale] * len(completions)\n"
                    "def broken(scale):\n    raise ValueError('scale too big')\n"
                    "def not_a_reward():\n    return 3\n"
                    "def returns_a_factory():\n    return make\n")
    assert load_reward(f"{path}:make(scale=2.0)")[1](["p"], ["c"]) == [2.0]
    for target, fragments in [("make(scale=1, other=2)", ["unknown argument 'other'"]),
                              ("make", ["reward factory", "TypeError", "scale"]),
                              ("broken(scale=9)", ["reward factory", "ValueError: scale too big"]),
                              ("not_a_reward", ["must return a reward", "returned 3"]),
                              ("returns_a_factory", ["must return a reward", "takes neither"])]:
        with pytest.raises(UserError) as info:
            load_reward(f"{path}:{target}")
        assert all(f in str(info.value) for f in [f"{path}:{target}", *fragments]), str(info.value)


def test_file_without_function(tmp_path):
    path = tmp_path / "rewards_file.py"
    path.write_text("def other(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match="rewards_file.py has no function 'wanted'"):
        load_reward(f"{path}:wanted")


# ---------------------------------------------------------------- score_rewards


def _constant(values):
    def fn(prompts, completions, **kwargs):
        return list(values)

    return fn


def test_score_rewards_weights_and_none():
    fns = [("a", _constant([1.0, None, None])), ("b", _constant([2.0, 3.0, None]))]
    totals, per_fn = score_rewards(fns, ["p"] * 3, ["c"] * 3, weights=[0.5, -2.0])
    assert totals == [0.5 * 1.0 - 2.0 * 2.0, -6.0, 0.0]
    assert per_fn == {"a": [1.0, None, None], "b": [2.0, 3.0, None]}
    totals, _ = score_rewards(fns, ["p"] * 3, ["c"] * 3)
    assert totals == [3.0, 3.0, 0.0]


def test_score_rewards_passes_kwargs_and_accepts_arrays():
    def uses_column(completions, answer, **kwargs):
        return np.array([float(c == a) for c, a in zip(completions, answer)])

    def tensor(prompts, completions, **kwargs):
        return torch.tensor([0.25] * len(completions))

    totals, per_fn = score_rewards(
        [("col", uses_column), ("t", tensor), ("t", _constant((True, 1)))],
        ["p", "q"],
        ["x", "y"],
        columns={"answer": ["x", "z"]},
    )
    assert per_fn == {"col": [1.0, 0.0], "t": [0.25, 0.25], "t_2": [1.0, 1.0]}
    assert totals == [2.25, 1.25]


def test_columns_named_like_score_rewards_arguments_reach_the_reward():
    """Before columns were a dict, a `weights` column was score_rewards' own argument: a TypeError traceback."""

    def sees(prompts, completions, weights, reward_fns, columns, **kwargs):
        return [w * r + c for w, r, c in zip(weights, reward_fns, columns)]

    columns = {"weights": [2.0, 3.0], "reward_fns": [1.0, 10.0], "columns": [0.5, 0.0]}
    totals, per_fn = score_rewards([("sees", sees)], ["p", "q"], ["a", "b"], [2.0], columns)
    assert per_fn == {"sees": [2.5, 30.0]} and totals == [5.0, 60.0]
    for name in ("prompts", "completions"):
        with pytest.raises(UserError, match=f"^dataset column '{name}' collides with the reward argument"):
            score_rewards([("sees", sees)], ["p"], ["a"], columns={name: ["x"]})


def test_score_rewards_with_builtins():
    fns = [load_reward("target_length(target=2)"), load_reward("keyword(include=['b'])")]
    totals, per_fn = score_rewards(fns, ["", ""], ["a b", "b"], weights=[1.0, 2.0])
    assert per_fn == {"target_length": [0.0, -0.5], "keyword": [1.0, 1.0]}
    assert totals == [2.0, 1.5]


def _raises(prompts, completions, **kwargs):
    raise ValueError("bad input\non two lines")


@pytest.mark.parametrize(
    ("fn", "fragments"),
    [
        (_raises, ["raised ValueError", "bad input on two lines"]),
        (_constant([1.0]), ["wrong number", "expected 2, got 1"]),
        (lambda prompts, completions, **kw: 1.0, ["returned float"]),
        (lambda prompts, completions, **kw: "ab", ["returned str"]),
        (lambda prompts, completions, **kw: np.zeros((2, 1)), ["returned ndarray"]),
        (_constant([1.0, float("nan")]), ["nan", "index 1"]),
        (_constant([float("-inf"), 1.0]), ["-inf", "index 0"]),
        (_constant([1.0, "0.5"]), ["non-numeric", "'0.5'", "index 1"]),
        (_constant([[1.0], 0.0]), ["non-numeric", "index 0"]),
    ],
)
def test_score_rewards_validation(fn, fragments):
    with pytest.raises(RewardError) as info:
        score_rewards([("ok", _constant([0.0, 0.0])), ("my_reward", fn)], ["p", "q"], ["a", "b"])
    message = str(info.value)
    assert "'my_reward'" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    if fn is _raises:
        assert isinstance(info.value.__cause__, ValueError)


def test_score_rewards_bad_weights():
    fns = [("a", _constant([1.0]))]
    with pytest.raises(UserError, match="2 weights for 1 reward"):
        score_rewards(fns, ["p"], ["c"], weights=[1.0, 2.0])
    with pytest.raises(UserError, match="not a finite number"):
        score_rewards(fns, ["p"], ["c"], weights=[float("nan")])


def test_reward_mean_metrics():
    metrics = reward_mean_metrics({"a": [1.0, None, 2.0], "b": [None, None], "c": [-1.0]})
    assert metrics == {"rewards/a/mean": 1.5, "rewards/a/none_fraction": 1 / 3, "rewards/b/none_fraction": 1.0,
                       "rewards/c/mean": -1.0}


# ---------------------------------------------------------------- LearnedReward

WORDS = (
    "the a an cat dog bird fish sat ran flew swam on in under over mat log tree pond happy sad big small "
    "red blue green quick slow lazy bright dark good bad very not and or but is was it this that one two "
    "three four five six seven"
).split()


def _save_tiny_model(folder, with_pad):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "[PAD]"} if with_pad else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", **special
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        max_position_embeddings=16,
        pad_token_id=0 if with_pad else None,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["pad", "no_pad"])
def tiny_model(request, tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_rm") / "tiny_rm", with_pad=request.param)


def _manual_scores(folder, texts, max_length=None):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_length]
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


PROMPTS = ["the cat", "a dog", "one bird", "the fish"]
COMPLETIONS = [" sat on the mat", " ran", " flew over the big green tree and was happy", " zebra swam"]


def test_learned_reward_matches_unbatched_forward(tiny_model):
    reward = LearnedReward(tiny_model, batch_size=3, device="cpu")
    assert reward.__name__ == "tiny_rm" and not reward.model.training
    expected = _manual_scores(tiny_model, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = reward(PROMPTS, COMPLETIONS, extra_column=[1, 2, 3, 4])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 4
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(scores, abs=1e-6)
    assert reward([], []) == []


def test_learned_reward_normalisation(tiny_model, tmp_path):
    raw = LearnedReward(tiny_model, device="cpu")(PROMPTS, COMPLETIONS)
    (tiny_model / "rlgen_reward.json").write_text(json.dumps({"gain": 2.0, "bias": -0.5}))
    try:
        name, reward = load_reward(str(tiny_model))
        assert name == "tiny_rm" and isinstance(reward, LearnedReward)
        assert reward(PROMPTS, COMPLETIONS) == pytest.approx([2.0 * r - 0.5 for r in raw], abs=1e-5)
    finally:
        (tiny_model / "rlgen_reward.json").unlink()


def test_learned_reward_truncation_warning(tiny_model):
    reward = LearnedReward(tiny_model, batch_size=2, device="cpu")
    assert reward.max_length == 16
    long_text = " ".join(WORDS[:30])
    texts = ["the cat sat", long_text, "a dog"]
    with pytest.warns(UserWarning, match="truncated 1 of 3 texts to 16 tokens") as record:
        scores = reward(texts, [""] * 3)
    assert len(record) == 1
    assert all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx(_manual_scores(tiny_model, texts, max_length=16), abs=1e-5)


def test_learned_reward_spec_arguments(tiny_model):
    name, reward = load_reward(f"{tiny_model}(batch_size=1, max_length=4)")
    assert name == "tiny_rm" and reward.batch_size == 1 and reward.max_length == 4
    with pytest.raises(UserError, match="bad arguments for a reward model"):
        load_reward(f"{tiny_model}(nope=1)")


def test_learned_reward_errors(tmp_path, tiny_model):
    with pytest.raises(UserError, match="folder not found.*nowhere"):
        LearnedReward(tmp_path / "nowhere")
    empty = tmp_path / "empty_rm"
    empty.mkdir()
    with pytest.raises(UserError, match="no reward model in .*empty_rm"):
        load_reward(str(empty))
    (empty / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load reward model from .*empty_rm"):
        load_reward(str(empty))
    with pytest.raises(UserError, match="max_length must be"):
        LearnedReward(tiny_model, max_length=0)
    (tiny_model / "rlgen_reward.json").write_text("{not json")
    try:
        with pytest.raises(UserError, match="rlgen_reward.json"):
            LearnedReward(tiny_model, device="cpu")
    finally:
        (tiny_model / "rlgen_reward.json").unlink()


# ---------------------------------------------------------------- conversational data, Hub ids

CHAT = [[{"role": "user", "content": "the cat"}], [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "a dog"}]]


def test_conversational_prompts_get_conversational_completions_as_in_trl():
    from trl.rewards import think_format_reward

    seen = {}

    def record(prompts, completions, completion_ids, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, solution=solution)
        return [0.0] * len(completions)

    fns = [("think", think_format_reward), load_reward("target_length(target=2)"), ("record", record)]
    completions = ["<think>hm</think> yes", "no"]
    _, per_fn = score_rewards(fns, CHAT, completions, columns={"completion_ids": [[1], [2, 3]], "solution": ["a", "b"]})
    assert per_fn["think"] == [1.0, 0.0] and per_fn["target_length"] == [0.0, -0.5]
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in completions]
    assert seen["prompts"] == CHAT and seen["ids"] == [[1], [2, 3]] and seen["solution"] == ["a", "b"]
    score_rewards([("record", record)], ["the cat", "a dog"], completions,
                  columns={"completion_ids": [[1], [2]], "solution": [1, 2]})
    assert seen["completions"] == completions  # text prompts: text completions, as before


def test_learned_reward_scores_a_conversation_with_its_chat_template(tiny_model):
    reward = LearnedReward(tiny_model, device="cpu")
    reward.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    replies = [[{"role": "assistant", "content": "sat on the mat"}], [{"role": "assistant", "content": "ran"}]]
    texts = [reward.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(CHAT, replies)]
    assert texts[1] == "be brief a dog ran "
    assert reward(CHAT, replies) == pytest.approx(reward(texts, ["", ""]), abs=1e-6)


def _hub_cache(root, repo_id, folder):
    """A Hugging Face cache holding `folder` as the snapshot of `repo_id` (what a download leaves behind)."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_reward_model_id_loads_from_the_hub_cache(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _hub_cache(tmp_path, "rlgen-test/tiny-rm", tiny_model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    name, reward = load_reward("rlgen-test/tiny-rm(batch_size=2)")
    assert name == "tiny-rm" and reward.batch_size == 2
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(LearnedReward(tiny_model)(PROMPTS, COMPLETIONS), abs=1e-5)


def test_hub_reward_model_id_not_in_the_cache_fails_at_once_naming_the_id(tmp_path, monkeypatch):
    """Online or not, an id the cache lacks is one line before any network call (it used to wait on retries)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match=r"reward model 'nobody-xyz/made-up-rm' is neither a local folder nor in the "
                                        r"Hugging Face cache: download it first \(hf download") as info:
        load_reward("nobody-xyz/made-up-rm")
    assert "\n" not in str(info.value)


def test_reward_columns_pass_the_datasets_own_completion_as_reference_completion():
    from rlgen.rewards import reward_columns

    rows = [{"prompt": "p", "completion": "gold reply", "topic": "x"}]
    assert reward_columns(rows) == {"topic": ["x"], "reference_completion": ["gold reply"]}
    assert reward_columns([{"prompt": "p", "topic": "x"}]) == {"topic": ["x"]}


def test_a_reward_of_none_is_warned_once_and_its_share_logged(tiny_folder, tmp_path, capsys):
    """Issue 30, item 13: a reward returning None for every sample trained silently at score 0."""
    import json

    from rlgen.cli import main
    from rlgen.files import read_jsonl
    (tmp_path / "absent.py").write_text("def absent(completions, **kwargs):\n    return [None] * len(completions)\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(16)))
    out = tmp_path / "out"
    assert main(["ppo", "--model", str(tiny_folder), "--dataset", str(data), "--reward", f"{tmp_path}/absent.py:absent",
                 "--max_steps", "2", "--batch_size", "2", "--mini_batch_size", "2", "--ppo_epochs", "1",
                 "--max_new_tokens", "3", "--output_dir", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "returned None" in line]
    assert warned == ["[rlgen] warning: reward 'absent' returned None for all 2 completions of a batch, so it adds "
                      "nothing to their score (None means 'does not apply'); rewards/absent/none_fraction logs the "
                      "share"]
    assert [row.get("rewards/absent/none_fraction") for row in read_jsonl(out / "metrics.jsonl")] == [1.0, 1.0]
