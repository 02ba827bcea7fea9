"""Bad input to `rlgen ppo`: exit status 2, exactly one line on stderr naming the culprit, no traceback, and
an existing output folder untouched, even with --overwrite_output_dir (every check runs before any write)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from rlgen.cli import main
from rlgen.policy import Policy

torch.set_num_threads(1)

REWARDS = "def other(completions, **kwargs):\n    return [0.0] * len(completions)\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nocol.jsonl").write_text('{"question": "hi"}\n')
    # a single file is split by a hash of the prompt: ten rows leave some in every split
    (tmp_path / "ok.jsonl").write_text("".join(f'{{"prompt": "hi there {i}"}}\n' for i in range(10)))
    (tmp_path / "unknown_key.yaml").write_text("max_stepz: 3\n")
    (tmp_path / "wrong_type.yaml").write_text("learning_rate: fast\n")
    (tmp_path / "eval_key.yaml").write_text("eval_steps: 2\nevaluate: {num_prompt: 4}\n")
    (tmp_path / "run_section.yaml").write_text("ppo:\n  max_steps: 2\n")
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def _cases(d, tiny):
    ok = ["--model", str(tiny), "--dataset", str(d / "ok.jsonl")]
    return [
        ("unknown config key (YAML)", ["--config", str(d / "unknown_key.yaml")], "unknown key 'max_stepz'"),
        ("wrong type (YAML)", ["--config", str(d / "wrong_type.yaml")], "key 'learning_rate': expected a number"),
        ("wrong type (flag)", ["--max_steps", "three"], "--max_steps: expected an integer, got 'three'"),
        ("missing config file", ["--config", str(d / "nope.yaml")], f"config file {d / 'nope.yaml'} does not exist"),
        ("missing dataset file", [*ok, "--dataset", str(d / "none.jsonl")], "does not exist"),
        ("empty dataset", [*ok, "--dataset", str(d / "empty.jsonl")], "empty.jsonl is empty"),
        ("dataset without 'prompt'", [*ok, "--dataset", str(d / "nocol.jsonl")], "has no column 'prompt'"),
        ("prompt + completion beyond the context", [*ok, "--max_prompt_length", "1000", "--max_new_tokens", "48"],
         "max_prompt_length 1000 + max_new_tokens 48 exceeds the model's context of 1024 tokens"),
        ("model path that does not exist", ["--model", str(d / "no-model")], "does not exist"),
        ("unknown reward name", [*ok, "--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
        ("reward file without the function", [*ok, "--reward", f"{d / 'rewards.py'}:score"],
         "has no function 'score'"),
        ("missing reward file", [*ok, "--reward", f"{d / 'missing.py'}:score"], "file not found"),
        ("resume from a missing checkpoint", [*ok, "--resume_from_checkpoint", str(d / "checkpoint-7")],
         "does not exist"),
        ("batch_size not a multiple", [*ok, "--batch_size", "5", "--mini_batch_size", "2"],
         "batch_size 5 is not a multiple of mini_batch_size 2"),
        ("negative eval_steps", [*ok, "--eval_steps", "-1"], "eval_steps must be at least 0, got -1"),
        ("unknown evaluation option (YAML)", ["--config", str(d / "eval_key.yaml")],
         "ppo option 'evaluate': unknown key 'num_prompt'"),
        ("tiny model with vLLM (heads of 16)", [*ok, "--model", "tiny", "--rollout_engine", "vllm"],
         "rollout_engine vllm: model tiny has attention heads of size 16, and vLLM's attention kernels take sizes "
         "from 32 up: use rollout_engine hf with it"),
        ("unknown rollout engine", [*ok, "--rollout_engine", "sglang"], "rollout_engine must be one of hf, vllm"),
        # issue 30, items 9 and 19: a negative learning rate in scientific notation is a value (argparse took -1e-4
        # for an option and printed 38 lines), refused with 0 before anything loads (was a torch traceback)
        ("negative learning rate (=)", [*ok, "--learning_rate=-1e-4"], "learning_rate must be > 0, got -0.0001"),
        ("negative learning rate (space)", [*ok, "--learning_rate", "-1e-4"], "learning_rate must be > 0, got -0.0001"),
        ("zero learning rate", [*ok, "--learning_rate", "0"], "learning_rate must be > 0, got 0.0"),
        ("zero max_steps", [*ok, "--max_steps", "0"], "max_steps must be at least 1, got 0"),
        ("negative max_steps", [*ok, "--max_steps=-3"], "max_steps must be at least 1, got -3"),
        ("misspelt flag", [*ok, "--lerning_rate", "1e-4"], "--lerning_rate (did you mean '--learning_rate'?)"),
        ("misspelt key (YAML)", ["--config", str(d / "unknown_key.yaml")], "'max_stepz' (did you mean 'max_steps'?)"),
        ("a run file's section without stages", ["--config", str(d / "run_section.yaml")],
         "unknown key 'ppo': a section, which only a `rlgen run` file has (one with `stages:`, e.g. `stages: [ppo]`)"),
        ("importance cap below 1", [*ok, "--vllm_importance_sampling_cap", "0.5"],
         "vllm_importance_sampling_cap must be -1 (auto), 0 (off) or > 1, got 0.5"),
    ] + ([] if importlib.util.find_spec("vllm") else [
        ("vllm not installed", [*ok, "--rollout_engine", "vllm"],
         "rollout_engine vllm: vLLM is not installed: pip install 'rlgen[vllm]'"),
    ])


def test_bad_input_is_one_line_status_2_and_touches_nothing(files, tiny_folder, capsys):
    out = files / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    seen = []
    for what, argv, message in _cases(files, tiny_folder):
        status = main(["ppo", *argv, "--output_dir", str(out), "--overwrite_output_dir", "true"])
        err = capsys.readouterr().err
        seen.append((what, err.strip()))
        assert status == 2, (what, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert err.startswith("rlgen: error: ") and message in err, (what, err)
        assert [p.name for p in out.iterdir()] == ["precious.txt"], what  # nothing written, nothing removed
        assert (out / "precious.txt").read_text() == "keep"
    print(json.dumps(seen, indent=1))


def test_non_empty_output_dir_needs_overwrite(files, tiny_folder, capsys):
    out = files / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(["ppo", "--model", str(tiny_folder), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"rlgen: error: output_dir {out} is not empty: pass --overwrite_output_dir true or choose " \
                  "another folder\n"
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_resume_latest_without_checkpoints(files, tiny_folder, capsys):
    out = files / "out"
    assert main(["ppo", "--model", str(tiny_folder), "--output_dir", str(out), "--resume_from_checkpoint",
                 "latest"]) == 2
    assert capsys.readouterr().err == f"rlgen: error: resume_from_checkpoint latest: no complete checkpoint-N " \
                                      f"folder in {out}\n"
    assert not out.exists()


def test_long_prompts_are_cut_from_the_left(tiny_folder, tmp_path):
    """A prompt far beyond the model's context trains: it is cut from the left to max_prompt_length."""
    from rlgen.config import PPOConfig
    from rlgen.ppo import train_ppo

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 5000 + "the end?"}) + "\n")
    policy = Policy.from_pretrained(str(tiny_folder), reference=False)
    ids, _ = policy.tokenize_prompts(["word " * 5000 + "the end?"], 32)
    assert ids.shape[1] == 32
    assert "the end?" in policy.tokenizer.decode(ids[0])  # the end of the prompt survives
    train_ppo(PPOConfig(model=str(tiny_folder), dataset=str(data), output_dir=str(tmp_path / "o"), max_steps=1,
                        batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, max_prompt_length=32,
                        reward=["keyword(include=['the'])"]))


def test_a_bad_input_in_a_real_process(tmp_path):
    """The same through `python -m rlgen.cli`: the process's real stderr, not just the captured stream."""
    result = subprocess.run([sys.executable, "-m", "rlgen.cli", "ppo", "--model", "tiny", "--reward", "nope",
                             "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("rlgen: error: unknown reward 'nope'")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("split, dataset, splits", [
    ("every", "chitchat", "train, validation, test"),
    ("foo", "ok.jsonl", "train, validation, test"),
    ("test", "folder", "eval, train"),
])
def test_an_unknown_split_is_one_line_naming_the_splits(files, capsys, split, dataset, splits):
    """Issue 30, item 10: was a KeyError (a file) or a FileNotFoundError (the demo data, a folder) traceback."""
    (files / "folder").mkdir()
    for name in ("train", "eval"):
        (files / "folder" / f"{name}.jsonl").write_text('{"prompt": "hi"}\n')
    data = dataset if dataset == "chitchat" else str(files / dataset)
    assert main(["evaluate", "--model", "tiny", "--dataset", data, "--split", split, "--output_dir",
                 str(files / "out")]) == 2
    assert capsys.readouterr().err == f"rlgen: error: unknown split '{split}': dataset {data} has the splits {splits}\n"


def _strict(text: str):
    """json.loads refusing NaN and Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_summaries_are_valid_json_with_null_for_undefined_numbers(tiny_folder, tmp_path):
    """Issue 30, item 18: one prompt has no standard error; eval_summary.json held a bare NaN."""
    import math

    from rlgen.files import read_metrics, write_json

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_folder), "--num_prompts", "1", "--max_new_tokens", "3",
                 "--output_dir", str(out)]) == 0
    summary = _strict((out / "eval_summary.json").read_text())
    undefined = [k for k, v in summary.items() if v is None]
    assert undefined and all(k.endswith(("_se", "/se")) for k in undefined), summary
    assert math.isnan(read_metrics(out / "eval_summary.json")[undefined[0]])
    write_json(tmp_path / "x.json", {"a": [float("inf"), torch.tensor(float("nan")), 1.5], "b": None})
    assert _strict((tmp_path / "x.json").read_text()) == {"a": [None, None, 1.5], "b": None}


def test_a_reference_with_another_tokenizer_is_refused_in_one_line(tiny_folder, tmp_path, capsys, monkeypatch):
    """Issue 30, item 8: `evaluate --model <tiny run> --reference default` gave KL 29.5 and a reference perplexity of
    42,290, exit 0. The check runs before any model loads; the same tokenizer passes."""
    import rlgen.models
    from rlgen.evaluation import check_same_tokenizer

    monkeypatch.setattr(rlgen.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out, other = tmp_path / "eval", str(rlgen.models.minilm_folder())  # a BERT WordPiece vocabulary
    assert main(["evaluate", "--model", str(tiny_folder), "--reference", other, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlgen: error: reference {other}: its tokenizer (") \
        and f"is not that of model {tiny_folder} (" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    check_same_tokenizer(str(tiny_folder), "tiny")
