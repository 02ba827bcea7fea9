"""SeqGAN runs that survive: checkpoints after each phase and every save_steps epochs, exact resume from any of
them, SIGINT and SIGTERM, and the one-process refusal."""

import json
import os
import signal

import pytest
import torch
from test_seqgan import tiny_oracle_config

from rlgen.checkpoint import MARKER, TrainingInterrupted, complete_checkpoints
from rlgen.config import SeqGANConfig
from rlgen.errors import UserError
from rlgen.files import read_jsonl
from rlgen.seqgan import train_seqgan
from rlgen.tracking import MetricsWriter

torch.set_num_threads(1)


def oracle_config(tmp_path, out, **kw):
    """4 adversarial epochs with every source of randomness in play: D dropout (global torch RNG), the data
    generator's shuffles and samples, the delayed rollout policy, the KL reference made from the MLE generator."""
    values = dict(output_dir=str(out), max_steps=4, save_steps=3, save_total_limit=0, eval_every=1, num_train=256,
                  num_test=200, eval_samples=200, d_negatives=256, d_pretrain_epochs=1, rollout_num=4, kl_coef=0.05,
                  baseline="mean")
    return tiny_oracle_config(tmp_path, **{**values, **kw})


def _cpu(monkeypatch):
    monkeypatch.setattr("rlgen.seqgan.default_device", lambda: torch.device("cpu"))


def _stop_when_logged(monkeypatch, key, at_step, sig=signal.SIGINT):
    """`sig` to this process right after the row holding `key` at step `at_step` is logged (StopSignals then
    lets the current unit of work finish)."""
    log = MetricsWriter.log

    def log_then_signal(self, metrics, step):
        log(self, metrics, step)
        if key in metrics and step == at_step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(MetricsWriter, "log", log_then_signal)


def _without_time(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _results(summary):
    """The summary without wall-clock times and settings (resume_from_checkpoint differs), as JSON sees it."""
    kept = {k: v for k, v in summary.items() if k not in ("settings", "g_step_split") and not k.startswith("s_")}
    return json.loads(json.dumps(kept, default=str))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seqgan_one_go")
    with pytest.MonkeyPatch.context() as patch:
        _cpu(patch)
        result = train_seqgan(oracle_config(tmp, tmp / "run"))
    return tmp / "run", result, read_jsonl(tmp / "run" / "metrics.jsonl")


def test_save_steps_writes_checkpoints_after_each_phase_and_every_n_epochs(one_go):
    out, _, _ = one_go
    assert [n for n, _ in complete_checkpoints(out)] == [0, 3, 4]  # save_steps 3 of 4 epochs; 0 kept (limit 0)
    states = {n: json.loads((path / "trainer_state.json").read_text()) for n, path in complete_checkpoints(out)}
    assert [(s["progress"]["phase"], s["progress"]["d_pretrain_rounds"], s["progress"]["epoch"])
            for s in states.values()] == [(3, 2, 0), (4, 2, 3), (4, 2, 4)]
    assert [len([r for r in s["history"] if "loss/policy" in r]) for s in states.values()] == [0, 3, 4]
    names = {p.name for p in (out / "checkpoint-3").iterdir()}
    assert {MARKER, "trainer_state.json", "optimizer.pt", "optimizer_d.pt", "rng_state_0.pth", "config.yaml",
            "config.json", "model.safetensors", "rollout_model.safetensors", "reference_model.safetensors",
            "discriminator"} <= names
    assert "scheduler.pt" not in names and not list(out.glob("*.tmp-*"))
    assert (out / "checkpoint-3" / "discriminator" / "cnn_discriminator.json").is_file()


@pytest.mark.parametrize("key, step, checkpoint, after", [
    ("loss/mle", 0, 0, "MLE pre-training"),
    ("d_pretrain/loss/d", 1, 0, "D pre-training round 1"),
    ("loss/policy", 2, 2, "adversarial epoch 2"),
], ids=["mle", "d_pretrain", "adversarial"])
def test_interrupt_and_resume_equals_one_go(one_go, tmp_path, monkeypatch, capfd, key, step, checkpoint, after):
    """4 epochs in one go == SIGINT during a phase + resume from the checkpoint it wrote, bit for bit: the
    generator and D weights, every metric but wall-clock times, and the summary. Both runs do the same float
    ops in the same order on one CPU thread from bit-identical restored state (weights, both Adam states, the
    rollout policy and reference, the RNG states including the private generators, the task's state).
    The signal is acknowledged on stderr when it arrives, before the unit under way ends."""
    out_a, result_a, rows_a = one_go
    _cpu(monkeypatch)
    out = tmp_path / "split"
    _stop_when_logged(monkeypatch, key, step)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_seqgan(oracle_config(tmp_path, out, save_total_limit=2))
    assert ("\n[rlgen] SIGINT received: finishing the MLE phase, D pre-training round or adversarial epoch under "
            "way, then saving a checkpoint; send it again to stop at once\n") in capfd.readouterr().err
    monkeypatch.undo()
    _cpu(monkeypatch)
    path = (out / f"checkpoint-{checkpoint}").resolve()
    assert (stopped.value.update, stopped.value.exit_code, stopped.value.checkpoint) == (checkpoint, 130, path)
    assert str(stopped.value) == (f"SIGINT received: stopped after {after}, checkpoint saved; resume by running the "
                                  f"same command with --resume_from_checkpoint {path}")
    assert [n for n, _ in complete_checkpoints(out)][-1] == checkpoint and not (out / "discriminator").exists()

    result_b = train_seqgan(oracle_config(tmp_path, out, save_total_limit=2, resume_from_checkpoint="latest"))
    rows_b = read_jsonl(out / "metrics.jsonl")
    assert _without_time(rows_b) == _without_time(rows_a)
    _assert_same_weights(result_a.policy.model, result_b.policy.model)
    _assert_same_weights(result_a.discriminator, result_b.discriminator)
    assert _results(result_b.summary) == _results(result_a.summary)
    assert [n for n, _ in complete_checkpoints(out)] == [3, 4]  # save_total_limit 2


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_text_task_interrupt_and_resume_equals_one_go(tmp_path, tiny_folder, tiny_classifier, monkeypatch, lora_r):
    """The text task, with SFT as MLE pre-training (2 steps: the first is at warm-up learning rate 0, and the KL
    reference is the SFT'd generator, under LoRA a merged copy; resuming skips SFT and loads it): 2 epochs in
    one go == SIGINT after epoch 1 + resume, bit for bit."""
    def config(out, **kw):
        return SeqGANConfig(task="text", model=str(tiny_folder), discriminator=tiny_classifier, output_dir=str(out),
                            lora_r=lora_r,
                            mle_steps=2, max_new_tokens=4, batch_size=4, max_steps=2, rollout_num=2,
                            learning_rate=1e-3, max_grad_norm=1.0, kl_coef=0.05, d_pretrain_rounds=1,
                            d_pretrain_epochs=1, d_negatives=8, d_learning_rate=1e-3, d_max_length=16,
                            eval_num_prompts=0, **kw)

    _cpu(monkeypatch)
    result_a = train_seqgan(config(tmp_path / "one_go"))
    _stop_when_logged(monkeypatch, "loss/policy", 1)
    with pytest.raises(TrainingInterrupted, match="stopped after adversarial epoch 1"):
        train_seqgan(config(tmp_path / "split"))
    monkeypatch.undo()
    _cpu(monkeypatch)
    assert "reference_model.safetensors" in {p.name for p in (tmp_path / "split" / "checkpoint-1").iterdir()}
    result_b = train_seqgan(config(tmp_path / "split", resume_from_checkpoint="latest"))
    assert (_without_time(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
            == _without_time(read_jsonl(tmp_path / "one_go" / "metrics.jsonl")))
    _assert_same_weights(result_a.policy.model, result_b.policy.model)
    _assert_same_weights(result_a.discriminator, result_b.discriminator)
    assert result_b.summary["generated"] == result_a.summary["generated"]


def test_resume_refuses_other_settings(one_go, tmp_path):
    """A checkpoint of other models or another seed is refused by its config.yaml, naming the changed keys."""
    out, _, _ = one_go
    with pytest.raises(UserError, match="written with other settings .seed: 0 there, 3 now; hidden_size: 8 there, 6 now"):
        train_seqgan(oracle_config(tmp_path, tmp_path / "other", hidden_size=6, seed=3,
                                   resume_from_checkpoint=str(out / "checkpoint-3")))
    with pytest.raises(UserError, match="no complete checkpoint-N folder"):
        train_seqgan(oracle_config(tmp_path, tmp_path / "empty", resume_from_checkpoint="latest"))


def test_sigterm_through_the_cli_saves_and_exits_143(tmp_path, monkeypatch, capsys):
    from rlgen.cli import main

    _cpu(monkeypatch)
    _stop_when_logged(monkeypatch, "loss/mle", 0, signal.SIGTERM)
    out = tmp_path / "run"
    options = dict(task="oracle", model="lstm", output_dir=out, vocab_size=12, seq_len=6, embedding_size=8,
                   hidden_size=8, num_train=64, num_test=64, eval_samples=64, batch_size=64, mle_epochs=1,
                   eval_temperatures=1.0, d_embedding_size=16)
    assert main(["seqgan", *(f"--{k}={v}" for k, v in options.items())]) == 143
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"rlgen: SIGTERM received: stopped after MLE pre-training, checkpoint saved; resume by running "
                   f"the same command with --resume_from_checkpoint {(out / 'checkpoint-0').resolve()}")
    state = json.loads((out / "checkpoint-0" / "trainer_state.json").read_text())
    assert (state["progress"]["phase"], state["progress"]["d_pretrain_rounds"]) == (2, 0)


def test_several_processes_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from rlgen.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch / torchrun set for 2 processes
    out = tmp_path / "run"
    assert main(["seqgan", "--task", "oracle", "--model", "lstm", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("rlgen: error: seqgan runs in one process (its Monte-Carlo rollouts and discriminator "
                          "training are not distributed), but was launched with 2"), err
    assert not out.exists()


def _copy_run(one_go, tmp_path):
    import shutil

    out, _, _ = one_go
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run"


def test_a_cuda_checkpoint_resumes_on_the_cpu_exactly(one_go, tmp_path, monkeypatch):
    """D's Adam state as CUDA writes it (capturable: its step counters on the GPU, for the graphed D step) loaded
    on the CPU: the run's own flags win and epoch 4 equals the one-go run's. Before the fix the saved capturable
    flag stayed and the first D step failed (Adam's capturable steps need a GPU)."""
    _, result_a, rows_a = one_go
    out = _copy_run(one_go, tmp_path)
    path = out / "checkpoint-3" / "optimizer_d.pt"
    state = torch.load(path, weights_only=True)
    for group in state["param_groups"]:
        group["capturable"] = True
    torch.save(state, path)
    _cpu(monkeypatch)
    result_b = train_seqgan(oracle_config(tmp_path, out, resume_from_checkpoint=str(out / "checkpoint-3")))
    assert _without_time(read_jsonl(out / "metrics.jsonl")) == _without_time(rows_a)
    _assert_same_weights(result_a.discriminator, result_b.discriminator)
    _assert_same_weights(result_a.policy.model, result_b.policy.model)


@pytest.mark.parametrize("name, what", [("rng_state_0.pth", "an RNG state"), ("optimizer.pt", "an optimiser state"),
                                        ("optimizer_d.pt", "an optimiser state")])
def test_planted_pickle_in_any_checkpoint_file_is_refused_with_one_line(one_go, tmp_path, monkeypatch, capsys,
                                                                        name, what):
    """Every file of a SeqGAN checkpoint that torch.load reads; before the fix optimizer_d.pt and optimizer.pt
    were refused with a traceback and exit 1."""
    from test_ppo_resume import _Planted, assert_refused_in_one_line, pickled_files

    from rlgen.cli import main

    out, ran = _copy_run(one_go, tmp_path), tmp_path / "planted_code_ran"
    checkpoint = out / "checkpoint-3"
    assert pickled_files(checkpoint) == {"rng_state_0.pth", "optimizer.pt", "optimizer_d.pt"}
    torch.save({"state": _Planted(ran)}, checkpoint / name)
    _cpu(monkeypatch)
    capsys.readouterr()
    argv = ["seqgan", "--config", str(checkpoint / "config.yaml"), "--output_dir", str(out),
            "--resume_from_checkpoint", str(checkpoint)]
    assert main(argv) == 2
    assert_refused_in_one_line(capsys.readouterr().err.strip(), checkpoint / name, what, ran)
