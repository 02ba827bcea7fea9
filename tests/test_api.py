"""The Python API: the README example runs as written (in a temporary folder); configs take Python objects."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'eval/rewards/brevity/mean'" in printed and "'eval/kl'" in printed
    assert (tmp_path / "runs" / "notebook" / "metrics.jsonl").is_file()


def test_import_rlgen_is_light_and_names_resolve():
    import rlgen

    assert rlgen.PPOConfig.__module__ == "rlgen.config.stages"
    assert callable(rlgen.train_ppo) and set(rlgen.__all__) <= set(dir(rlgen))


ROWS = [{"prompt": f"tell me about topic {i}", "completion": f"topic {i} is fun", "bonus": i % 3}
        for i in range(60)]


def _one(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def _bonus(prompts, completions, bonus, **kwargs):  # a dataset column reaches the reward, as in TRL
    return [2.0 + 0 * b for b in bonus]


def test_callable_rewards_weights_and_rows_in_a_ppo_config_run_and_are_recorded(tmp_path):
    """Before, PPOConfig(reward=[fn, ...]) died dumping config.yaml after the output folder was made, weights were
    checked against the default reward list, and config.yaml named rewards that did not run."""
    import datasets
    import yaml

    from rlgen import PPOConfig, train_ppo
    from rlgen.files import read_jsonl

    out = tmp_path / "ppo"
    cfg = PPOConfig(model="tiny", output_dir=str(out), max_steps=1, batch_size=2, mini_batch_size=2,
                    max_new_tokens=4, ppo_epochs=1, missing_eos_penalty=0.0, reward=[_one, _bonus],
                    reward_weights=[1.0, 0.5], dataset=datasets.Dataset.from_list(ROWS))
    train_ppo(cfg)
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert row["objective/scores"] == 2.0 and row["rewards/_bonus/mean"] == 2.0  # 1 + 0.5 * 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward"] == [f"{__name__}:_one", f"{__name__}:_bonus"] and saved["reward_weights"] == [1.0, 0.5]
    assert saved["dataset"].startswith("<Dataset given in Python: 60 rows, sha1 ")


def test_configs_take_python_objects_and_refuse_others():
    import functools

    from rlgen.config import CompareConfig, EvalConfig, PPOConfig, SFTConfig, to_dict
    from rlgen.errors import UserError
    from rlgen.rewards import load_reward

    for bad, message in [(dict(reward=[3]), "reward: 3 is neither a reward spec nor a callable"),
                         (dict(dataset=5), "dataset must be a name, a file or folder"),
                         (dict(reward=[_one], reward_weights=[1.0, 2.0]), "reward_weights has 2 values for 1")]:
        with pytest.raises(UserError, match=message):
            PPOConfig(**bad)
    # what a comparison derives keeps the objects; config.yaml names them
    cfg = CompareConfig(methods=["ppo", "sft", "seqgan"], dataset=ROWS, reward=[functools.partial(_one, scale=2)],
                        gold_reward=[load_reward("target_length(target=3)")[1]])
    ppo = cfg.method_config("ppo", "start", Path("o"), 0)
    assert ppo.dataset is ROWS and ppo.reward[0] is cfg.reward[0] and cfg.eval_config("m", Path("e"), 0).dataset is ROWS
    assert cfg.method_config("sft", "start", Path("o"), 0).dataset is ROWS
    recorded = to_dict(cfg)
    assert recorded["reward"] == [f"{__name__}:_one(scale=2)"]
    assert recorded["gold_reward"] == ["rlgen.rewards.rules:target_length(target=3)"]
    assert recorded["dataset"].startswith("<list given in Python: 60 rows, sha1 ")
    assert to_dict(ppo)["evaluate"]["gold_reward"] == recorded["gold_reward"]
    assert to_dict(SFTConfig(dataset={"train": ROWS[:5]}))["dataset"]["train"].startswith("<list given in Python: 5")
    assert to_dict(EvalConfig(dataset="chitchat"))["dataset"] == "chitchat"


def test_every_stage_reads_rows_given_in_python(tmp_path, tiny_folder, capsys):
    """load_rows (sft, ppo, seqgan text, evaluate, compare) and load_preference_pairs (reward-model train) take a
    Dataset, a list of dicts (split by a hash of each prompt, as a single file) or a DatasetDict (its own splits)."""
    import datasets
    import yaml

    from rlgen import EvalConfig, SFTConfig, run_evaluation, train_sft
    from rlgen.data import load_rows, split_of
    from rlgen.errors import UserError
    from rlgen.reward_model import load_preference_pairs

    train = load_rows(ROWS, "train")
    assert train == load_rows(datasets.Dataset.from_list(ROWS), "train")
    assert 0 < len(train) < 60 and all(split_of(r["prompt"]) == "train" for r in train)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:50]),
                                   "test": datasets.Dataset.from_list(ROWS[50:])})
    assert load_rows(splits, "test") == ROWS[50:]
    with pytest.raises(UserError, match="has no split 'validation'"):
        load_rows(splits, "validation")
    with pytest.raises(UserError, match="no column 'chosen'"):
        load_rows(ROWS, "train", ("chosen",))
    pairs = [{"prompt": r["prompt"], "chosen": "great", "rejected": "awful"} for r in ROWS]
    fit, held = load_preference_pairs(pairs)
    assert len(fit) + len(held) == 60 and held
    fit, held = load_preference_pairs({"train": pairs[:40], "validation": pairs[40:]})
    assert (len(fit), len(held)) == (40, 20)

    sft = train_sft(SFTConfig(model=str(tiny_folder), output_dir=str(tmp_path / "sft"), dataset=ROWS, max_steps=1,
                              batch_size=2))
    assert sft is not None and yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())["dataset"].startswith(
        "<list given in Python: 60 rows")
    metrics = run_evaluation(EvalConfig(model=str(tiny_folder), output_dir=str(tmp_path / "eval"), dataset=splits,
                                        num_prompts=3, max_new_tokens=4, reward=[_one]))
    assert metrics["eval/rewards/_one/mean"] == 1.0 and metrics["eval/num_samples"] == 3
    assert "the first 3 prompts of the test split of <DatasetDict given in Python" in capsys.readouterr().out
