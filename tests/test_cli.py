import subprocess
import sys

import pytest

from rlgen.cli import build_parser, main
from rlgen.config import EvalConfig, SFTConfig, parse_stage_config


def _parse(cls, argv, command):
    args = build_parser().parse_args([command, *argv])
    return parse_stage_config(cls, args, args.config, section=command)


def test_yaml_then_flags_override(tmp_path, monkeypatch):
    monkeypatch.setattr("rlgen.config.stages.tracker_installed", lambda name: True)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("max_steps: 7\nlearning_rate: 1.0e-4\nlora_r: 8\nreport_to: [tensorboard]\n")
    cfg = _parse(SFTConfig, ["--config", str(cfg_file), "--max_steps", "3", "--overwrite_output_dir"], "sft")
    assert (cfg.max_steps, cfg.learning_rate, cfg.lora_r, cfg.report_to) == (3, 1e-4, 8, ["tensorboard"])
    assert cfg.overwrite_output_dir is True
    assert SFTConfig().max_steps == 20  # defaults untouched


@pytest.mark.parametrize("command", ["sft", "ppo", "seqgan", "evaluate", "reward-model train", "run"])
def test_a_missing_or_unknown_tracker_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, command):
    """Before: sft exited 1 with the Trainer's traceback after loading the model, ppo warned and trained on."""
    monkeypatch.setattr("rlgen.config.stages.tracker_installed", lambda name: False)
    out = tmp_path / "out"
    for tracker, message in [("tensorboard", "report_to tensorboard needs the package tensorboard: pip install "
                                             "tensorboard"),
                             ("tensorbord", "report_to 'tensorbord' is not a tracker rlgen knows (tensorboard, ")]:
        argv = [*command.split(), "--model", "tiny", "--report_to", tracker, "--output_dir", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("rlgen: error: ") and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_repeatable_list_flags():
    cfg = _parse(EvalConfig, ["--reward", "sentiment_positive", "--reward", "target_length(target=10)",
                              "--reward_weights", "1.0", "0.5"], "evaluate")
    assert cfg.reward == ["sentiment_positive", "target_length(target=10)"]
    assert cfg.reward_weights == [1.0, 0.5]


def test_configs_are_frozen():
    cfg = SFTConfig()
    with pytest.raises(AttributeError):
        cfg.max_steps = 3


@pytest.mark.parametrize("yaml_text, message", [
    ("max_stepz: 3\n", "unknown key 'max_stepz'"),
    ("max_steps: three\n", "key 'max_steps': expected an integer"),
    ("learning_rate: [1]\n", "key 'learning_rate': expected a number"),
    ("overwrite_output_dir: maybe\n", "key 'overwrite_output_dir': expected true or false"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_config_files_name_the_key(tmp_path, capsys, yaml_text, message):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml_text)
    assert main(["sft", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if "key" in message:
        assert str(cfg_file) in err


def test_missing_config_file_and_bad_flag_type(capsys, tmp_path):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--num_prompts", "x"]) == 2
    assert "--num_prompts: expected an integer" in capsys.readouterr().err


def test_unknown_flag_is_rejected(capsys):
    assert main(["sft", "--max_stepz", "3"]) == 2
    assert capsys.readouterr().err == ("rlgen: error: unrecognized arguments: --max_stepz 3 (did you mean "
                                       "'--max_steps'?)\n")


def test_bad_inputs_give_one_line_and_status_2(tmp_path, capsys):
    cases = [
        (["evaluate", "--model", str(tmp_path / "missing-model")], "does not exist"),
        (["evaluate", "--model", "tiny", "--dataset", str(tmp_path / "none.jsonl")], "does not exist"),
        (["evaluate", "--model", "tiny", "--reward", "no_such_reward"], "no_such_reward"),
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"question": "hi"}\n')
    cases += [(["evaluate", "--model", "tiny", "--dataset", str(empty)], "is empty"),
              (["evaluate", "--model", "tiny", "--dataset", str(nocol)], "no column 'prompt'")]
    for i, (argv, message) in enumerate(cases):
        assert main([*argv, "--output_dir", str(tmp_path / f"o{i}")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_output_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(["evaluate", "--model", "tiny", "--output_dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep"


def test_run_sections_are_validated_before_training(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: tiny\nstages: [sft]\nsft:\n  max_stepz: 3\n")
    assert main(["run", "--config", str(cfg_file), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "section 'sft'" in err and "max_stepz" in err
    assert not (tmp_path / "o").exists()
    assert main(["run", "--model", "tiny", "--sft.nope", "1", "--output_dir", str(tmp_path / "o")]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err


def test_help_lists_every_option_with_help():
    out = subprocess.run([sys.executable, "-m", "rlgen.cli", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("--model", "--output_dir", "--max_steps", "--seed", "--save_steps", "--resume_from_checkpoint",
                 "--overwrite_output_dir", "--dataset", "--threads", "--lora_r", "--learning_rate"):
        assert name in out.stdout
    top = subprocess.run([sys.executable, "-m", "rlgen.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("sft", "evaluate", "run"):
        assert command in top


def test_stage_command_reads_its_section_of_a_run_file(tmp_path):
    from rlgen.config import PPOConfig

    run_file = tmp_path / "exp.yaml"
    run_file.write_text("model: tiny\nseed: 3\nstages: [ppo]\nppo:\n  max_steps: 7\n  lora_r: 4\n"
                        "evaluate:\n  num_prompts: 5\n")
    cfg = _parse(PPOConfig, ["--config", str(run_file), "--lora_r", "8"], "ppo")
    assert (cfg.model, cfg.seed, cfg.max_steps, cfg.lora_r) == ("tiny", 3, 7, 8)
    run_file.write_text("model: tiny\nstages: [ppo]\nppo:\n  max_stepz: 7\n")
    with pytest.raises(Exception, match="section 'ppo': unknown key 'max_stepz'"):
        _parse(PPOConfig, ["--config", str(run_file)], "ppo")


def test_stage_sections_take_dotted_flags(monkeypatch, capsys, tmp_path):
    """Before, `rlgen ppo --help` listed --evaluate but only `compare` took --evaluate.<key> VALUE."""
    import rlgen.cli

    ran = []
    monkeypatch.setattr(rlgen.cli, "_run_function", lambda target: ran.append)
    assert main(["ppo", "--model", "tiny", "--eval_steps", "2", "--evaluate.num_prompts", "3",
                 "--evaluate.split", "validation"]) == 0
    assert ran[0].evaluate == {"num_prompts": "3", "split": "validation"}
    assert (ran[0].eval_config().num_prompts, ran[0].eval_config().split) == (3, "validation")
    assert main(["ppo", "--evaluate.num_prompts", "x"]) == 2
    assert "'evaluate': key 'num_prompts': expected an integer" in capsys.readouterr().err
    assert main(["ppo", "--evaluat.num_prompts", "3"]) == 2
    assert "unknown section 'evaluat'" in capsys.readouterr().err
    assert main(["sft", "--evaluate.num_prompts", "3"]) == 2  # a stage without sections: as any unknown flag
    assert "unrecognized arguments: --evaluate.num_prompts" in capsys.readouterr().err
    # a section inside a section: more dots, merged with what the config file set there
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("compare:\n  gold_reward: [sentiment_positive]\n  evaluate: {num_prompts: 5, batch_size: 2}\n")
    assert main(["sweep", "--config", str(sweep), "--compare.evaluate.num_prompts", "3",
                 "--compare.evaluate.split", "validation", "--compare.ppo.learning_rate", "1e-3"]) == 0
    compare = ran[-1].compare_config("pairs", ["sentiment_positive"], ["ppo"], [0])
    assert compare.evaluate == {"num_prompts": "3", "batch_size": 2, "split": "validation"}
    assert compare.ppo == {"learning_rate": "1e-3"}
    assert ran[-1].compare_config("bon", ["sentiment_positive"], ["bon"], [0]).ppo == {}  # not best-of-n's
    assert compare.eval_config("tiny", "out", 0).num_prompts == 3
    assert main(["sweep", "--config", str(sweep), "--compare.evaluate", "3", "--compare.evaluate.split", "x"]) == 2
    assert "'evaluate' was given a value earlier, so it takes no keys" in capsys.readouterr().err
    from rlgen.cli import build_parser
    from rlgen.pipeline import parse_run_config

    run_file = tmp_path / "run.yaml"
    run_file.write_text("model: tiny\nstages: []\ncompare:\n  methods: [ppo]\n  ppo: {ppo_epochs: 2}\n")
    run = parse_run_config(*build_parser().parse_known_args(
        ["run", "--config", str(run_file), "--compare.ppo.learning_rate", "1e-3"]))
    assert run.compare["ppo"] == {"ppo_epochs": 2, "learning_rate": "1e-3"}
    # the help lists the dotted form, not a flag that cannot work
    out = subprocess.run([sys.executable, "-m", "rlgen.cli", "ppo", "--help"], capture_output=True, text=True).stdout
    assert "--evaluate.<key> VALUE" in out and "--evaluate EVALUATE" not in out


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_a_launcher_the_first_process_prints_and_each_fills_the_launchers_error_file(tmp_path, capsys,
                                                                                          monkeypatch, rank):
    """Every process of a launch hit the same refusal and printed it (twice with 2 processes); now rank 0 prints
    it and each process writes it to TORCHELASTIC_ERROR_FILE, which torchrun's failure summary shows per rank."""
    import json

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["ppo", "--max_steps", "-3"]) == 2
    err = capsys.readouterr().err
    recorded = json.loads(error_file.read_text())["message"]["message"]
    assert recorded.startswith("rlgen: error: ") and "max_steps" in recorded
    assert err == (f"{recorded}\n" if rank == "0" else "")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_stop_at_once_under_a_launcher_is_said_by_the_first_process(monkeypatch, capsys, rank):
    import rlgen.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlgen.cli, "_dispatch", interrupted)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert main(["ppo"]) == 130
    assert capsys.readouterr().err == ("rlgen: interrupted\n" if rank == "0" else "")
