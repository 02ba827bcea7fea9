"""PPO runs that survive: atomic checkpoints, exact resume, SIGINT/SIGTERM, non-finite faults, bad rewards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlgen.checkpoint import (
    MARKER,
    NonFiniteError,
    TrainingInterrupted,
    complete_checkpoints,
    find_checkpoint,
)
from rlgen.config import PPOConfig
from rlgen.errors import RewardError, UserError
from rlgen.files import read_jsonl
from rlgen.ppo import train_ppo
from tests.conftest import STOP_REWARD

torch.set_num_threads(1)

REWARDS = STOP_REWARD + '''

def huge_at(completions, at=2, value=1e39, **kwargs):
    """A finite Python float at update `at`: 1e39 overflows float32 (inf score), 1e37 squares to inf (value loss)."""
    global _calls
    _calls += 1
    return [value if _calls == at else 0.5] * len(completions)


def raises_at(completions, at=3, **kwargs):
    global _calls
    _calls += 1
    if _calls == at:
        raise RuntimeError("reward server down")
    return [0.5] * len(completions)
'''

TIME_KEYS = {"time/rollout", "time/score", "time/update", "time/eval"}


@pytest.fixture
def reward_file(tmp_path):
    """One file per test: a reward file runs once per process, so its call counter spans the test's runs."""
    path = tmp_path / "resume_rewards.py"
    path.write_text(REWARDS)
    return path


def config(tiny_folder, reward_file, out, **overrides):
    values = dict(model=str(tiny_folder), output_dir=str(out), max_steps=6, save_steps=2, batch_size=4,
                  mini_batch_size=2, ppo_epochs=2, max_new_tokens=8, learning_rate=3e-3, adaptive_kl=True,
                  kl_target=0.1, reward=[f"{reward_file}:vowels"])
    return PPOConfig(**{**values, **overrides})


def _params(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if not k.startswith("ref_model.")}


def _without_time(rows):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


@pytest.mark.parametrize("overrides", [
    {}, dict(lora_r=4, separate_critic=True, gradient_accumulation_steps=2),
    # the evaluations use another reward: the vowels counter stops the run at a given update
    dict(eval_steps=2, evaluate={"num_prompts": 2, "batch_size": 2, "reward": ["keyword(include=['a'])"]}),
    # group estimators without a critic: 2 prompts x 2 completions per update
    dict(preset="grpo", num_generations=2), dict(preset="rloo", num_generations=2),
], ids=["full", "lora_critic", "eval_steps", "grpo", "rloo"])
def test_interrupt_and_resume_equals_one_go(tiny_folder, reward_file, tmp_path, monkeypatch, overrides):
    """6 updates in one go == 3 updates, SIGINT, resume from checkpoint-2 (dropping the killed run's row 3),
    4 more updates. Tolerance: exact. Both runs do the same float ops in the same order on one CPU thread,
    from bit-identical restored state (weights and Adam moments saved as float32 safetensors/torch files,
    RNG states, scheduler step, KL coefficient, data position), so nothing can drift; the time/* metrics are
    wall-clock and excluded. With eval_steps, the evaluation rows (after updates 2, 4, 6) are kept alike."""
    one_go = tmp_path / "one_go"
    policy_a = train_ppo(config(tiny_folder, reward_file, one_go, **overrides))
    rows_a = read_jsonl(one_go / "metrics.jsonl")
    assert [n for n, _ in complete_checkpoints(one_go)] == [4, 6]  # save_total_limit 2

    split = tmp_path / "split"
    monkeypatch.setenv("RLGEN_TEST_STOP_AT", "9")  # update 3 of this run: the one-go run made calls 1-6
    with pytest.raises(TrainingInterrupted) as stopped:
        train_ppo(config(tiny_folder, reward_file, split, **overrides))
    monkeypatch.delenv("RLGEN_TEST_STOP_AT")
    assert (stopped.value.update, stopped.value.exit_code) == (3, 130)
    assert f"--resume_from_checkpoint {split.resolve() / 'checkpoint-3'}" in str(stopped.value)
    assert [n for n, _ in complete_checkpoints(split)] == [2, 3]
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl") if "objective/scores" in r] == [1, 2, 3]
    assert not list(split.glob("*.tmp-*"))

    policy_b = train_ppo(config(tiny_folder, reward_file, split, resume_from_checkpoint=str(split / "checkpoint-2"),
                                **overrides))
    rows_b = read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in rows_b if "objective/scores" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r["step"] for r in rows_b if "eval/reward/mean" in r]
    assert evals == ([2, 4, 6] if overrides.get("eval_steps") else [])
    assert _without_time(rows_b) == _without_time(rows_a)
    params_a, params_b = _params(policy_a), _params(policy_b)
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    assert (split / "ppo_curves.png").is_file() and (split / "samples.md").read_text() == \
        (one_go / "samples.md").read_text()


def test_resume_refuses_changed_settings(tiny_folder, reward_file, tmp_path):
    """Resuming with another seed or learning rate would continue a different run: refused in one line naming
    the keys; the length, checkpointing and threads may change."""
    out = tmp_path / "run"
    train_ppo(config(tiny_folder, reward_file, out, max_steps=2, save_steps=0))
    with pytest.raises(UserError) as refused:
        train_ppo(config(tiny_folder, reward_file, out, max_steps=3, seed=1, learning_rate=1e-3,
                         resume_from_checkpoint="latest"))
    message = str(refused.value)
    assert "seed: 0 there, 1 now; learning_rate: 0.003 there, 0.001 now" in message and "\n" not in message
    assert [n for n, _ in complete_checkpoints(out)] == [2]
    train_ppo(config(tiny_folder, reward_file, out, max_steps=3, save_steps=1, save_total_limit=0, threads=0,
                     resume_from_checkpoint="latest"))
    assert [n for n, _ in complete_checkpoints(out)] == [2, 3]


def test_checkpoint_contents_and_latest(tiny_folder, reward_file, tmp_path):
    out = tmp_path / "run"
    train_ppo(config(tiny_folder, reward_file, out, max_steps=3, save_steps=0))
    ckpt = find_checkpoint("latest", out)
    assert ckpt.name == "checkpoint-3"  # save_steps 0: only at the end
    names = {p.name for p in ckpt.iterdir()}
    assert {MARKER, "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "config.yaml",
            "config.json", "model.safetensors", "value_head.safetensors"} <= names
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["update"], state["rows_consumed"], len(state["history"])) == (3, 12, 3)
    # a half-written folder (no marker) is never picked up; resuming a finished run just re-saves the outputs
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert find_checkpoint("latest", out).name == "checkpoint-3"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        find_checkpoint(str(out / "checkpoint-9"), out)
    with pytest.raises(UserError, match="no complete checkpoint-N folder"):
        find_checkpoint("latest", tmp_path / "empty")


@pytest.mark.parametrize("value, quantity, overrides", [
    (1e39, "reward", {}), (1e37, "loss", {}), (1e39, "reward", dict(preset="grpo", num_generations=2)),
], ids=["reward", "loss", "grpo_reward"])
def test_nonfinite_stops_keeping_the_last_good_checkpoint(tiny_folder, reward_file, tmp_path, value, quantity,
                                                          overrides):
    out = tmp_path / "run"
    cfg = config(tiny_folder, reward_file, out, save_steps=1, reward=[f"{reward_file}:huge_at(at=3, value={value})"],
                 **overrides)
    with pytest.raises(NonFiniteError, match=f"^update 3: non-finite {quantity}; .*checkpoint-2") as e:
        train_ppo(cfg)
    assert "\n" not in str(e.value)
    assert [n for n, _ in complete_checkpoints(out)] == [1, 2] and not list(out.glob("*.tmp-*"))
    assert not any(torch.load(out / "checkpoint-2" / "optimizer.pt")["state"][0]["exp_avg"].isnan().flatten())


def test_skip_nonfinite_counts_skipped_batches(tiny_folder, reward_file, tmp_path):
    out = tmp_path / "run"
    policy = train_ppo(config(tiny_folder, reward_file, out, max_steps=4, skip_nonfinite=True,
                              reward=[f"{reward_file}:huge_at(at=2, value=1e37)"]))
    rows = read_jsonl(out / "metrics.jsonl")
    skipped = [r["policy/skipped_batches"] for r in rows]
    assert skipped[0] == 0 and skipped[1] > 0 and skipped[2:] == [0, 0]
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_bad_reward_keeps_the_last_checkpoint_intact(tiny_folder, reward_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RewardError, match="reward 'raises_at' raised RuntimeError: reward server down"):
        train_ppo(config(tiny_folder, reward_file, out, reward=[f"{reward_file}:raises_at(at=5)"]))
    assert [n for n, _ in complete_checkpoints(out)] == [2, 4] and not list(out.glob("*.tmp-*"))
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["update"] == 4
    assert len(read_jsonl(out / "metrics.jsonl")) == 4  # the failed update logged nothing
    # resuming works from the intact checkpoint once the reward is back (its call counter is past `at`); with the
    # same spec, since another reward would continue a different run (refused)
    train_ppo(config(tiny_folder, reward_file, out, reward=[f"{reward_file}:raises_at(at=5)"],
                     resume_from_checkpoint="latest"))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _cli(*args):
    return [sys.executable, "-m", "rlgen.cli", "ppo", "--model", "tiny", "--batch_size", "4", "--mini_batch_size",
            "2", "--ppo_epochs", "1", "--max_new_tokens", "8", "--reward", "keyword(include=['the'])", *args]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_through_the_cli_writes_a_checkpoint_and_resumes(tmp_path, sig, code):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cli("--output_dir", str(out), "--max_steps", "100000"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    ckpt = find_checkpoint("latest", out)
    assert last.startswith(f"rlgen: {signal.Signals(sig).name} received: stopped after update ")
    assert last.endswith(f"--resume_from_checkpoint {ckpt.resolve()}") and "Traceback" not in err
    assert (ckpt / MARKER).is_file() and (ckpt / "rng_state_0.pth").is_file()
    if sig == signal.SIGINT:
        done = int(ckpt.name.split("-")[1])
        result = subprocess.run(_cli("--output_dir", str(out), "--max_steps", str(done + 2),
                                     "--resume_from_checkpoint", "latest"),
                                env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, done + 3))
        assert (out / "model.safetensors").is_file()


class _Planted:
    """Unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_files(folder) -> set[str]:
    """The files under `folder` that `torch.load` unpickles (torch.save's zip archives, plain pickles)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and p.read_bytes()[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")}


def assert_refused_in_one_line(err: str, path, what: str, ran) -> None:
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"rlgen: error: resume_from_checkpoint: {path} is not {what} rlgen wrote, refusing"), err
    assert "system" in err and not ran.exists()


PPO_PICKLES = {"rng_state_0.pth": "an RNG state", "optimizer.pt": "an optimiser state",
               "scheduler.pt": "a scheduler state"}


@pytest.mark.parametrize("name", PPO_PICKLES)
def test_planted_pickle_in_any_checkpoint_file_is_refused_with_one_line(tiny_folder, reward_file, tmp_path, capsys,
                                                                        name):
    """Every file of a PPO checkpoint that torch.load reads. Before the fix the RNG file was unpickled with
    weights_only=False (the callable ran, resume went on), and the optimiser and scheduler files were refused
    with a traceback and exit 1."""
    from rlgen.cli import main

    out, ran = tmp_path / "run", tmp_path / "planted_code_ran"
    train_ppo(config(tiny_folder, reward_file, out, max_steps=1, save_steps=0))
    assert pickled_files(out / "checkpoint-1") == set(PPO_PICKLES)  # a new pickled file needs its case here
    planted = out / "checkpoint-1" / name
    torch.save({"state": _Planted(ran)}, planted)
    capsys.readouterr()
    argv = ["ppo", "--model", str(tiny_folder), "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4",
            "--mini_batch_size", "2", "--max_new_tokens", "8", "--reward", f"{reward_file}:vowels",
            "--ppo_epochs", "2", "--learning_rate", "3e-3", "--adaptive_kl", "true", "--kl_target", "0.1",
            "--resume_from_checkpoint", "latest"]  # the settings of `config` (resume refuses others)
    assert main(argv) == 2
    assert_refused_in_one_line(capsys.readouterr().err.strip(), planted, PPO_PICKLES[name], ran)


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_folder, tmp_path_factory):
    """A 1-process `--fsdp full_shard` run's checkpoint-1 (torch DCP shards, in-process over gloo)."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train_ppo(PPOConfig(model=str(tiny_folder), output_dir=str(out), max_steps=1, batch_size=2, mini_batch_size=2,
                        ppo_epochs=1, max_new_tokens=4, reward=["keyword(include=['a'])"], fsdp="full_shard"))
    return out / "checkpoint-1"


def _plant_in_shards(ckpt, ran, non_tensor: bool) -> None:
    """Append a planted pickle to the shard file and point the metadata at it: as the first tensor's data, or as a
    non-tensor item (which DCP's default planner loads with torch.load(weights_only=False))."""
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata_path = ckpt / "sharded" / ".metadata"
    metadata = pickle.loads(metadata_path.read_bytes())  # the test's own file: trusted
    key, info = next(iter((k, v) for k, v in metadata.storage_data.items() if not k.fqn.startswith("optimizer.p")))
    shard = ckpt / "sharded" / info.relative_path
    payload = io.BytesIO()
    torch.save({"state": _Planted(ran)}, payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    planted = type(info)(relative_path=info.relative_path, offset=offset, length=len(payload.getvalue()))
    if non_tensor:
        key = MetadataIndex("optimizer.param_groups.0.lr")
        metadata.state_dict_metadata[key.fqn] = BytesStorageMetadata()
    metadata.storage_data[key] = planted
    metadata_path.write_bytes(pickle.dumps(metadata))


SHARDED_PICKLES = {"sharded/.metadata": "a sharded checkpoint's metadata", "sharded/__0_0.distcp": "a shard",
                   "sharded/__0_0.distcp, non-tensor": "a sharded checkpoint's metadata",
                   "scheduler.pt": "a scheduler state", "rng_state_0.pth": "an RNG state"}


@pytest.mark.parametrize("name", SHARDED_PICKLES)
def test_planted_pickle_in_any_file_of_a_sharded_checkpoint_is_refused_with_one_line(sharded_checkpoint, tiny_folder,
                                                                                     tmp_path, capsys, name):
    """Before the fix `.metadata` was unpickled with plain pickle and non-tensor items with weights_only=False (the
    planted callable ran), and a shard that was not a tensor gave a traceback."""
    import pickle
    import shutil

    from rlgen.cli import main

    out, ran = tmp_path / "run", tmp_path / "planted_code_ran"
    shutil.copytree(sharded_checkpoint.parent, out)
    ckpt = out / "checkpoint-1"
    assert pickled_files(ckpt) == {n for n in SHARDED_PICKLES if "," not in n}  # a new pickled file needs its case
    if name == "sharded/.metadata":
        (ckpt / name).write_bytes(pickle.dumps(_Planted(ran)))
    elif name.startswith("sharded/__0_0.distcp"):
        _plant_in_shards(ckpt, ran, non_tensor="non-tensor" in name)
    else:
        torch.save({"state": _Planted(ran)}, ckpt / name)
    capsys.readouterr()
    argv = ["ppo", "--model", str(tiny_folder), "--output_dir", str(out), "--max_steps", "2", "--batch_size", "2",
            "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "4", "--reward",
            "keyword(include=['a'])", "--fsdp", "full_shard", "--resume_from_checkpoint", "latest"]
    try:
        code = main(argv)
    finally:  # a refused in-process sharded run leaves its one-process group behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    culprit = ckpt / ("sharded/.metadata" if "non-tensor" in name else name.split(",")[0])
    if "non-tensor" in name:  # refused from the metadata: never unpickled, so the callable's name is not known
        assert "\n" not in err and "'optimizer.param_groups.0.lr' as a non-tensor item" in err and not ran.exists()
        assert err.startswith(f"rlgen: error: resume_from_checkpoint: {culprit} is not {SHARDED_PICKLES[name]}")
    else:
        assert_refused_in_one_line(err, culprit, SHARDED_PICKLES[name], ran)


def test_sharded_checkpoint_resumes_in_one_process(sharded_checkpoint, tiny_folder, tmp_path):
    """The checked load (restricted metadata, JSON param groups) resumes the optimiser's hyperparameters."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(sharded_checkpoint.parent, out)
    train_ppo(PPOConfig(model=str(tiny_folder), output_dir=str(out), max_steps=2, batch_size=2, mini_batch_size=2,
                        ppo_epochs=1, max_new_tokens=4, reward=["keyword(include=['a'])"], fsdp="full_shard",
                        resume_from_checkpoint="latest"))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "checkpoint-2" / "sharded" / "optimizer_param_groups.json").read_text())[0]["betas"] == [
        0.9, 0.999]


@pytest.mark.parametrize("launcher", [True, False], ids=["torchrun", "alone"])
def test_a_launchers_forwarded_ctrl_c_is_not_a_second_signal(monkeypatch, launcher):
    """torchrun's agent forwards the Ctrl-C it got to processes that got it from the terminal too: that copy used
    to count as the second signal (stop at once, no checkpoint). Alone, a second Ctrl-C still stops at once."""
    from rlgen.checkpoint import StopSignals

    if launcher:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stopped_at_once = False
    with StopSignals() as stop:
        try:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs between bytecodes
        except KeyboardInterrupt:
            stopped_at_once = True
    assert stop.signum == signal.SIGINT and stopped_at_once is not launcher


def test_the_bar_counts_the_interrupted_update_and_a_resume_says_where_it_resumed(tiny_folder, reward_file, tmp_path,
                                                                                 monkeypatch, capsys):
    """The bar showed 1/4 while the message said update 2; a resume at the same world size printed nothing.
    TQDM_MININTERVAL: no redraw between updates, where the iterating bar's own count lags (it was 1/4 at random)."""
    out = tmp_path / "run"
    monkeypatch.setenv("RLGEN_TEST_STOP_AT", "2")
    monkeypatch.setenv("TQDM_MININTERVAL", "1000")
    with pytest.raises(TrainingInterrupted) as stopped:
        train_ppo(config(tiny_folder, reward_file, out, max_steps=4, save_steps=0))
    assert stopped.value.update == 2
    err = capsys.readouterr().err
    bars = [line for line in err.replace("\n", "\r").split("\r") if line.startswith("ppo:")]
    assert " 2/4 " in bars[-1], err[-2000:]  # its last state
    monkeypatch.delenv("RLGEN_TEST_STOP_AT")
    train_ppo(config(tiny_folder, reward_file, out, max_steps=4, save_steps=0, resume_from_checkpoint="latest"))
    printed = capsys.readouterr().out
    assert f"[rlgen] ppo: resumed from {out / 'checkpoint-2'} (update 2 of 4)\n" in printed, printed[-2000:]


def test_progress_numbers_that_round_to_zero_have_no_sign():
    from rlgen.ppo import _short

    assert [_short(x) for x in (-0.0004, -0.0006, 0.0, 1.23456)] == ["0.000", "-0.001", "0.000", "1.235"]


class _FakeEngine:
    """Stands in for VLLMEngine: fixed completions, counts rollouts and weight syncs."""

    def __init__(self):
        self.rollouts, self.syncs, self.closed = 0, 0, False

    def generate(self, prompt_ids, settings, eos_ids, n=1):
        self.rollouts += 1
        rows = len(prompt_ids) * n  # n completions per prompt, prompt by prompt
        return [[7] * settings.max_new_tokens for _ in range(rows)], [[-1.0] * settings.max_new_tokens for _ in range(rows)]

    def sync(self, policy):
        self.syncs += 1
        return 0.0

    def close(self):
        self.closed = True


def test_no_weight_sync_after_the_last_update(tiny_folder, reward_file, tmp_path, monkeypatch):
    """One sync per update that a rollout follows; the final samples come from generate, after the engine is
    closed. Before: a sync after the last update too, for the final samples only."""
    from rlgen import engines

    engine = _FakeEngine()

    def start(policy, cfg):
        policy.engine = engine

    monkeypatch.setattr(engines, "start", start)
    train_ppo(config(tiny_folder, reward_file, tmp_path / "run", max_steps=3, save_steps=0))
    assert (engine.rollouts, engine.syncs, engine.closed) == (3, 2, True)


def test_sharded_param_groups_that_are_not_json_are_one_line(sharded_checkpoint, tiny_folder, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(sharded_checkpoint.parent, out)
    groups = out / "checkpoint-1" / "sharded" / "optimizer_param_groups.json"
    groups.write_text("{not json")
    with pytest.raises(UserError, match=rf"^resume_from_checkpoint: {groups} is not JSON \("):
        try:
            train_ppo(PPOConfig(model=str(tiny_folder), output_dir=str(out), max_steps=2, batch_size=2,
                                mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, reward=["keyword(include=['a'])"],
                                fsdp="full_shard", resume_from_checkpoint="latest"))
        finally:  # a refused in-process sharded run leaves its one-process group behind
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
