"""Sharded PPO (`--fsdp full_shard`, torch FSDP2) in 2 CPU processes over gloo, started by torchrun.

Every 2-process run prints each rank's share of the parameter elements; the tests check that both ranks of a world
of 2 ran and that each held a part of the weights (the shards add up to the whole), so two independent
single-process copies cannot pass. The runs are module-scoped and shared by the tests (one fixture: 4 torchrun
launches of 2 processes, 1 single process, 2 in-process runs).

Sampling is made greedy in these runs (torch.multinomial -> argmax, and EOS where the argmax is 1 modulo 7, so
that completions end at unequal lengths): every completion then has the same tokens whether it is sampled in a
batch of 8 (one process) or 4 (two), so the sharded and the single-process runs see the same data. With the
defaults (advantage whitening on) and unequal lengths, only statistics and loss denominators over the global batch
(all processes) make the two agree: per-process means would not.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from rlgen.checkpoint import SHARDED_DIR, STATE_FILE, complete_checkpoints
from rlgen.config import PPOConfig
from rlgen.files import read_jsonl
from rlgen.policy import Policy
from rlgen.ppo import train_ppo
from tests.conftest import STOP_REWARD

# on the tests that start processes: the runs need torch.distributed with gloo
multiprocess = [pytest.mark.multiprocess, pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable")]


def _marked(test):
    for mark in multiprocess:
        test = mark(test)
    return test


GREEDY_CLI = '''
import sys

import torch

EOS = 2  # the tiny model's


def greedy(probs, num_samples=1, **kwargs):
    tokens = probs.argmax(-1, keepdim=True)
    return torch.where(tokens % 7 == 1, torch.full_like(tokens, EOS), tokens)


torch.multinomial = greedy

from rlgen.cli import main

raise SystemExit(main(sys.argv[1:]))
'''

# One process: batch_size 8 = the sharded runs' 2 x 4; one mini-batch per epoch, split in 2 accumulation steps.
COMMON = dict(max_steps=3, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=6,
              learning_rate=3e-3, adaptive_kl=True, kl_target=0.1, save_steps=1, save_total_limit=0)
# grpo: no critic, the KL in the loss, seq-mean-token-mean over the global mini-batch (greedy groups are all equal,
# so the KL loss alone trains)
VARIANTS = {"full_critic": dict(separate_critic=True), "lora": dict(lora_r=4),
            "grpo": dict(preset="grpo", num_generations=2)}


def _greedy(probs, num_samples=1, **kwargs):
    """The launched runs' `greedy` (GREEDY_CLI), for the in-process runs."""
    tokens = probs.argmax(-1, keepdim=True)
    return torch.where(tokens % 7 == 1, torch.full_like(tokens, 2), tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(values: dict) -> list[str]:
    return [a for k, v in values.items() for x in (v if isinstance(v, list) else [v]) for a in (f"--{k}", str(x))]


def _launch(tmp, nproc: int, options: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N greedy_cli.py ppo --fsdp full_shard ...` (nproc 0: no launcher at all)."""
    script = tmp / "greedy_cli.py"
    script.write_text(GREEDY_CLI)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(_free_port())] if nproc else [sys.executable]
    cmd = [*launcher, str(script), "ppo", "--fsdp", "full_shard", *_args(options)]
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp, env=full_env)


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _shards(output: str) -> dict[int, tuple[int, int, int]]:
    """rank -> (world, held, total) from the runs' '[rlgen] ppo: FSDP2 full_shard, rank r of w holds x of y' lines."""
    # matched anywhere: two processes printing at once can write their lines into one (text, text, newlines)
    pattern = r"FSDP2 full_shard, rank (\d+) of (\d+) holds (\d+) of (\d+) parameter elements"
    return {int(m[1]): (int(m[2]), int(m[3]), int(m[4])) for m in re.finditer(pattern, output)}


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """The sharded runs (2 processes) and their single-process counterparts, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "fsdp_rewards.py").write_text(STOP_REWARD)
    base = dict(model=str(tiny_folder), reward=[f"{tmp / 'fsdp_rewards.py'}:vowels"], **COMMON)
    out = {}
    for name, variant in VARIANTS.items():
        options = {**base, **variant, "batch_size": 4, "output_dir": tmp / name}
        out[name] = _launch(tmp, 2, options)
        assert out[name].returncode == 0, out[name].stderr[-3000:]
    # interrupted at update 2 by SIGINT to rank 1 (both ranks save checkpoint-2), then resumed at world size 2 and 1
    split = {**base, **VARIANTS["full_critic"], "batch_size": 4, "output_dir": tmp / "split"}
    out["interrupted"] = _launch(tmp, 2, split, env={"RLGEN_TEST_STOP_AT": "2", "RLGEN_TEST_STOP_RANK": "1"})
    out["resumed"] = _launch(tmp, 2, {**split, "resume_from_checkpoint": tmp / "split" / "checkpoint-2"})
    out["resumed_1"] = _launch(tmp, 0, {**split, "output_dir": tmp / "world1",
                                        "resume_from_checkpoint": tmp / "split" / "checkpoint-2"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "multinomial", _greedy)
        for name, variant in VARIANTS.items():
            values = {**base, **variant, "batch_size": 8, "mini_batch_size": 8, "output_dir": str(tmp / f"one_{name}")}
            out[f"one_{name}"] = train_ppo(PPOConfig(**values))
    return tmp, out


@_marked
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_each_hold_a_shard(runs, name):
    _, out = runs
    shards = _shards(out[name].stdout)
    assert sorted(shards) == [0, 1]
    (world0, held0, total), (world1, held1, total1) = shards[0], shards[1]
    assert world0 == world1 == 2 and total == total1
    assert 0 < held0 < total and 0 < held1 < total and held0 + held1 == total


@_marked
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sharded_equals_one_process_at_the_same_global_batch(runs, name):
    """3 updates (2 PPO epochs, 2 accumulation steps, adaptive KL, advantage whitening, completions of unequal
    lengths) at world size 2 x batch 4 and 1 x batch 8: same metrics and weights. Tolerance rel 1e-4 (weights also abs 1e-5; measured: at most 1.2e-6 apart): the runs
    sum the same terms in another order (batches of 4 vs 8, gradients reduce-scattered over 2 processes), which
    float32 rounds differently."""
    tmp, out = runs
    rows, single = read_jsonl(tmp / name / "metrics.jsonl"), read_jsonl(tmp / f"one_{name}" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in single] == [1, 2, 3]
    lengths = [r["completions/mean_length"] for r in single]
    assert any(x != round(x) for x in lengths), lengths  # unequal completion lengths
    for row, ref in zip(rows, single):
        for key in ("loss/policy", "loss/value", "loss/kl", "objective/kl", "objective/kl_coef", "objective/scores",
                    "policy/approxkl", "val/ratio", "completions/mean_length"):
            if key in ref or key in row:
                assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert rows[-1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]  # the adaptive controller moved
    sharded = Policy.from_pretrained(str(tmp / name), separate_critic=name == "full_critic", reference=False,
                                     value_head=name != "grpo")
    one = out[f"one_{name}"]
    one_params = dict(one.named_parameters()) if name != "lora" else {}
    if name == "lora":  # the folder holds the merged model: compare with the single run's merged weights
        one.save(tmp / "one_lora_saved")
        one_params = dict(Policy.from_pretrained(str(tmp / "one_lora_saved"), reference=False).named_parameters())
    for key, value in sharded.named_parameters():
        assert torch.allclose(value, one_params[key], rtol=1e-4, atol=1e-5), key


@_marked
def test_checkpoints_record_the_world_size_and_the_final_folder_evaluates(runs, tiny_folder):
    from rlgen.cli import main

    tmp, _ = runs
    run = tmp / "full_critic"
    assert [n for n, _ in complete_checkpoints(run)] == [1, 2, 3]
    for _, folder in complete_checkpoints(run):
        assert json.loads((folder / STATE_FILE).read_text())["world_size"] == 2
        assert sorted(p.name for p in (folder / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert sorted(p.name for p in folder.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not list(run.glob("*.tmp-*"))
    args = ["evaluate", "--model", str(run), "--num_prompts", "4", "--batch_size", "4", "--max_new_tokens", "6",
            "--output_dir", str(tmp / "eval"), "--reward", "keyword(include=['a'])"]
    assert main(args) == 0
    assert (tmp / "eval" / "eval_samples.jsonl").is_file()


@_marked
def test_interrupted_on_one_rank_and_resumed_equals_one_go(runs):
    """SIGINT reaches rank 1 only, during update 2: both ranks finish the update, save checkpoint-2 and exit 130;
    resumed with 2 processes, the run ends exactly as the uninterrupted one (same float ops, restored state)."""
    tmp, out = runs
    assert out["interrupted"].returncode != 0
    assert "SIGINT received: stopped after update 2" in out["interrupted"].stderr
    assert out["resumed"].returncode == 0, out["resumed"].stderr[-3000:]
    assert sorted(_shards(out["resumed"].stdout)) == [0, 1]
    assert _untimed(read_jsonl(tmp / "split" / "metrics.jsonl")) == _untimed(read_jsonl(tmp / "full_critic" /
                                                                                         "metrics.jsonl"))
    for file in ("model.safetensors", "value_head.safetensors", "critic/model.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(str(tmp / "full_critic" / file)), load_file(str(tmp / "split" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


@_marked
def test_resumed_at_world_size_1_says_it_resharded_and_finishes(runs):
    tmp, out = runs
    result = out["resumed_1"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert _shards(result.stdout) == {0: (1, _shards(out["full_critic"].stdout)[0][2],
                                          _shards(out["full_critic"].stdout)[0][2])}
    assert "(written by 2 processes) on 1: weights and optimiser state resharded" in result.stdout
    rows = read_jsonl(tmp / "world1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the history up to the checkpoint, then an update of half the prompts (4 per process, 1 process)
    assert _untimed(rows[:2]) == _untimed(read_jsonl(tmp / "full_critic" / "metrics.jsonl")[:2])
    assert all(math.isfinite(rows[2][k]) for k in ("loss/policy", "loss/value", "objective/kl"))
    assert json.loads((tmp / "world1" / "checkpoint-3" / STATE_FILE).read_text())["world_size"] == 1
    Policy.from_pretrained(str(tmp / "world1"), separate_critic=True, reference=False)


@pytest.mark.parametrize("args, message", [
    (["--fsdp", "shard_grad_op"], "fsdp 'shard_grad_op' is not supported for ppo: use full_shard"),
    (["--fsdp", "full_shard", "--eval_steps", "2"], "eval_steps is not supported with fsdp"),
])
def test_unsupported_sharding_options_are_one_line_errors(tiny_folder, tmp_path, capsys, args, message):
    from rlgen.cli import main

    assert main(["ppo", "--model", str(tiny_folder), "--output_dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [["ppo"], ["sft"], ["reward-model", "train"]], ids=" ".join)
@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_sharding_config_on_cpu_processes_is_refused(tiny_folder, tmp_path, capsys, monkeypatch, stage,
                                                                env):
    """What `accelerate launch` sets for an FSDP/DeepSpeed config; on CPU processes the plugin would not engage."""
    from rlgen.cli import main

    monkeypatch.setenv(env, "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*stage, "--model", str(tiny_folder), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config does not shard on CPU processes (they would train unsharded)" in err[0]
    assert not (tmp_path / "out").exists()


@_marked
def test_accelerate_launch_with_the_fsdp_config_on_cpu_processes_is_refused(tiny_folder, tmp_path):
    """The real launch: experiments/accelerate/fsdp.yaml, 2 processes, no GPU. Each process stops with the
    one-line error (exit 2) before training, so nothing runs as 2 independent copies; rank 0 prints it (both
    did), and the launcher's failure summary shows each process's line from its error file."""
    from pathlib import Path

    config = Path(__file__).parents[1] / "experiments" / "accelerate" / "fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "rlgen", "ppo", "--model", str(tiny_folder),
           "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "does not shard on CPU processes" in line]
    assert len([line for line in refusals if line.startswith("rlgen: error: ")]) == 1, result.stderr[-3000:]
    assert len([line for line in refusals if line.strip().startswith("traceback : rlgen: error: ")]) == 2
    assert not (tmp_path / "out").exists()


@_marked
def test_memory_benchmark_shards_params_grads_and_adam_to_about_half(tmp_path):
    """benchmarks/fsdp_memory.py at 2 processes: per-rank bytes of parameters + gradients + Adam state from the
    local shards <= 0.55x the whole copy DDP keeps, and the computed table agrees with the measurement."""
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "fsdp_memory.py"
    result = subprocess.run([sys.executable, str(script), "--separate_critic"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    total = sum(report["counts"].values())
    assert all(0 < r["held_elements"] < total for r in report["ranks"])
    assert sum(r["held_elements"] for r in report["ranks"]) == total
    assert report["ratio"] <= 0.55
    for check in report["check"].values():  # Adam's step counters are the only bytes the table leaves out
        assert check["measured"] == pytest.approx(check["computed"], rel=0.01)
    for r in report["ranks"]:  # generation holds the whole policy (the size of its frozen copy), resharded after
        assert r["rollout"]["policy_gathered_while_generating"] == r["reference_whole"]
        assert r["rollout"]["policy_shards"] < r["reference_whole"]


def test_sharded_forward_returns_no_view_and_the_values_of_the_plain_policy(tiny_folder, recwarn):
    """FSDP2 warned "returned a view tensor ... wrong gradients" on every forward with grad: the root returned
    `output_hidden_states`, whose first entry is FSDP's own view of the first decoder layer's input. The policy
    now reads the last hidden states with a hook on the LM head; log-probs and values are the plain policy's."""
    from rlgen import distributed

    plain = Policy.from_pretrained(str(tiny_folder), reference=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    expected = [t.detach() for t in plain(ids, mask, 3)[:2]]
    own = distributed.ensure_process_group(torch.device("cpu"))
    try:
        sharded = Policy.from_pretrained(str(tiny_folder), reference=False)
        distributed.shard_policy(sharded, torch.device("cpu"), torch.float32)
        logprobs, values, _ = sharded(ids, mask, 3)
        (logprobs.sum() + values.sum()).backward()
    finally:
        if own:
            torch.distributed.destroy_process_group()
    assert not [w for w in recwarn if "view tensor" in str(w.message)]
    torch.testing.assert_close(logprobs.detach(), expected[0])
    torch.testing.assert_close(values.detach(), expected[1])


def test_the_row_rank_note_is_printed_by_the_first_process_only(tmp_path, capsys, monkeypatch):
    """Every process of a launch loads the data; the note came once per process."""
    from rlgen.data import file_splits

    rows = [{"prompt": f"p{i}"} for i in range(12)]
    monkeypatch.setenv("RANK", "1")
    file_splits(tmp_path / "a.jsonl", rows)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    file_splits(tmp_path / "b.jsonl", rows)
    assert capsys.readouterr().out.count("too few prompts to split by their hash") == 1
