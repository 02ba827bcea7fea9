"""A run that fails before it has anything to continue from leaves its output folder as it found it, so the same
command runs again once the cause is fixed (issue 23: a failed run used to leave config.yaml behind and the retry
stopped at "output_dir is not empty")."""

import json
from types import SimpleNamespace

import pytest
import torch

from rlgen.checkpoint import MARKER, TrainingInterrupted
from rlgen.cli import main
from rlgen.files import read_jsonl
from rlgen.tracking import leaves_output_dir_as_found

torch.set_num_threads(1)


def _failing(write, exc=None, resumable=None):
    """A stage function that writes into its output folder with `write(folder)`, then raises `exc`."""
    decorate = leaves_output_dir_as_found() if resumable is None else leaves_output_dir_as_found(resumable)

    @decorate
    def stage(cfg):
        from pathlib import Path

        folder = Path(cfg.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text("seed: 0\n")
        write(folder)
        raise exc or RuntimeError("boom")

    return stage


def test_a_failed_run_removes_its_folder_and_the_parents_it_made(tmp_path):
    out = tmp_path / "runs" / "a" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        _failing(lambda f: (f / "eval_steps").mkdir())(SimpleNamespace(output_dir=str(out)))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_what_was_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    (out / "old").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _failing(lambda f: (f / "metrics.jsonl").write_text("{}\n"), KeyboardInterrupt())(
            SimpleNamespace(output_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["old", "precious.txt"]


@pytest.mark.parametrize("checkpoint", ["checkpoint-2", "checkpoints/checkpoint-2"])
def test_a_run_with_a_checkpoint_is_kept_for_resume(tmp_path, checkpoint):
    def write_checkpoint(folder):
        (folder / checkpoint).mkdir(parents=True)
        (folder / checkpoint / MARKER).write_text("update 2\n")

    with pytest.raises(RuntimeError):
        _failing(write_checkpoint)(SimpleNamespace(output_dir=str(tmp_path / "out")))
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / checkpoint / MARKER).is_file()


def test_a_failed_run_removes_only_what_it_wrote(tmp_path, capsys):
    """Issue 30, item 4: a file someone else made in the folder while the run ran stays (it was removed)."""
    out = tmp_path / "runs" / "out"

    def write(folder):
        (folder / "metrics.jsonl").write_text("{}\n")
        (folder / "checkpoint-1.tmp-7").mkdir()
        (folder / "notes.txt").write_text("mine")  # the user's, or another job's
        (folder / "other_job").mkdir()

    with pytest.raises(RuntimeError):
        _failing(write)(SimpleNamespace(output_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "other_job"]
    assert capsys.readouterr().out == f"[rlgen] kept notes.txt, other_job in {out}: not written by this run\n"


def test_an_interrupted_run_keeps_its_checkpoint(tmp_path):
    stopped = TrainingInterrupted(2, 1, tmp_path / "out" / "checkpoint-1")
    with pytest.raises(TrainingInterrupted):
        _failing(lambda f: None, stopped)(SimpleNamespace(output_dir=str(tmp_path / "out")))
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.fixture
def flaky(tmp_path):
    """A reward spec that raises while the file `broken` exists, and that file."""
    broken = tmp_path / "broken"
    broken.touch()
    (tmp_path / "flaky.py").write_text(
        "import os\n\n\ndef flaky(completions, **kwargs):\n"
        f"    if os.path.exists({str(broken)!r}):\n        raise RuntimeError('reward server down')\n"
        "    return [0.5] * len(completions)\n")
    return f"{tmp_path / 'flaky.py'}:flaky", broken


def _argv(command, tiny, data, reward, out):
    sampling = ["--max_new_tokens", "4", "--threads", "1"]
    if command == "ppo":
        return ["ppo", "--model", str(tiny), "--dataset", str(data), "--reward", reward, "--max_steps", "1",
                "--batch_size", "2", "--mini_batch_size", "2", "--ppo_epochs", "1", *sampling, "--output_dir", out]
    if command == "evaluate":
        return ["evaluate", "--model", str(tiny), "--dataset", str(data), "--reward", reward, "--num_prompts", "2",
                *sampling, "--output_dir", out]
    if command == "compare":
        return ["compare", "--model", "tiny", "--dataset", str(data), "--reward", reward, "--methods", "bon",
                "--bon_n", "2", "--seeds", "0", "--max_steps", "1", "--batch_size", "2",
                "--evaluate.num_prompts", "2", *sampling, "--output_dir", out]
    return ["run", "--model", str(tiny), "--dataset", str(data), "--stages", "ppo", "--evaluate.reward", reward,
            "--ppo.reward", reward, "--evaluate.num_prompts", "2", "--evaluate.max_new_tokens", "4", "--ppo.max_steps", "1",
            "--ppo.batch_size", "2", "--ppo.mini_batch_size", "2", "--ppo.ppo_epochs", "1",
            "--ppo.max_new_tokens", "4", "--output_dir", out]


@pytest.mark.parametrize("command", ["ppo", "evaluate", "compare", "run"])
def test_the_same_command_runs_once_the_cause_is_fixed(tiny_folder, tmp_path, flaky, capsys, command):
    """The reward raises on its first batch: one line, exit 2, no folder; with the reward fixed the same command
    runs (before: "output_dir ... is not empty", or for compare "a comparison with other settings")."""
    reward, broken = flaky
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(16)))
    out = tmp_path / "runs" / "out"
    argv = _argv(command, tiny_folder, data, reward, str(out))
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("rlgen: error: ") and "reward server down" in last and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    broken.unlink()
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / ("compare_config.yaml" if command == "compare" else "config.yaml")).is_file()


@pytest.mark.parametrize("argv", [
    ["run", "--model", "tiny", "--stages", "ppo", "sft"],
    ["compare", "--model", "tiny", "--methods", "bon", "sft", "--seeds", "0"],
], ids=["run", "compare"])
def test_a_data_error_of_a_late_stage_stops_before_any_model_loads(tmp_path, monkeypatch, capsys, argv):
    """A prompt-only file cannot train sft: said before the starting model is loaded and evaluated (before: after
    the starting model's evaluation and the stages before sft)."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rlgen.models.load_model", no_model)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(16)))
    out = tmp_path / "out"
    assert main([*argv, "--dataset", str(data), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlgen: error: dataset {data} needs a 'text' column") and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["sft", "ppo", "seqgan", "evaluate"])
def test_a_stage_command_reads_its_data_before_its_training_module_loads(tmp_path, monkeypatch, capsys, command):
    """A data error is one line before TRL, accelerate and the model load (before: after them, 7 s for sft)."""
    def no_stage(target):
        raise AssertionError(f"{target} was imported")

    monkeypatch.setattr("rlgen.cli._run_function", no_stage)
    data = tmp_path / "replies.jsonl"
    data.write_text("".join(json.dumps({"question": f"say something {i}"}) + "\n" for i in range(16)))
    assert main([command, "--model", "tiny", "--dataset", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlgen: error: dataset {data} ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failed_run_keeps_its_finished_steps_and_checkpoints_and_the_same_command_continues(
        tiny_folder, tmp_path, capsys):
    """Issue 30, item 3: the reward fails on the second PPO update, after checkpoint-1; the run folder went whole
    (the start's evaluation, the checkpoint). Now it stays, and the same command skips the start's evaluation and
    resumes PPO from checkpoint-1."""
    calls, broken = tmp_path / "calls", tmp_path / "broken"
    broken.touch()
    (tmp_path / "late.py").write_text(
        "import os\n\n\ndef late(completions, **kwargs):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n        f.write('x')\n"
        f"    if os.path.exists({str(broken)!r}) and os.path.getsize({str(calls)!r}) >= 3:\n"
        "        raise RuntimeError('reward server down')\n"
        "    return [0.5] * len(completions)\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    argv = [*_argv("run", tiny_folder, data, f"{tmp_path / 'late.py'}:late", str(out)), "--ppo.max_steps", "2",
            "--ppo.save_steps", "1"]
    assert main(argv) == 2  # calls: the start's evaluation, update 1 (checkpoint-1), update 2 raises
    captured = capsys.readouterr()
    assert "reward server down" in captured.err.strip().splitlines()[-1]
    assert f"[rlgen] kept {out} with what this run finished and its checkpoints" in captured.out
    assert (out / "eval_start" / "eval_summary.json").is_file() and (out / "ppo" / "checkpoint-1" / MARKER).is_file()
    broken.unlink()
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "[rlgen] continuing the run in" in printed and "evaluating start" not in printed
    assert "stage ppo: 2 steps from" in printed and "(resuming from its latest checkpoint)" in printed
    assert [row["step"] for row in read_jsonl(out / "ppo" / "metrics.jsonl")] == [1, 2]
    assert (out / "report.md").is_file() and (out / "eval_ppo" / "eval_summary.json").is_file()
    # other settings in that folder: one line, nothing touched
    assert main([*argv, "--ppo.learning_rate", "3e-5"]) == 2
    assert "holds a run with other settings (ppo:" in capsys.readouterr().err
