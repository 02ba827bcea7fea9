"""PPO stage on the tiny random model: it learns a rule reward, logs the fixed metric names, runs every
variant, surfaces bad rewards as RewardError, and runs under `accelerate launch` with 2 CPU processes."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from rlgen.config import PPOConfig, SamplingConfig
from rlgen.data import load_rows
from rlgen.errors import RewardError, UserError
from rlgen.files import read_jsonl
from rlgen.policy import Policy
from rlgen.ppo import train_ppo

torch.set_num_threads(1)

METRIC_NAMES = {
    "objective/scores", "objective/kl", "objective/kl_coef", "objective/rlhf_reward", "objective/entropy",
    "policy/approxkl", "policy/clipfrac", "policy/learning_rate", "loss/policy", "loss/value", "val/ratio",
    "val/explained_variance", "completions/mean_length", "completions/eos_fraction",
    "time/rollout", "time/score", "time/update",
}

REWARDS = '''
import math
import os


def starts_with_vowel(completions, **kwargs):
    """1 for a reply that starts with a vowel: the random tiny model starts near 0.3."""
    return [1.0 if c[:1].lower() in "aeiou" else 0.0 for c in completions]


def vowel_share(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def process_rank(completions, **kwargs):
    """The process rank, to check that metrics are reduced over processes."""
    return [float(os.environ.get("RANK", "0"))] * len(completions)


def raises(completions, **kwargs):
    raise ValueError("boom")


def wrong_length(completions, **kwargs):
    return [0.0] * (len(completions) + 1)


def not_a_number(completions, **kwargs):
    return [math.nan] * len(completions)


def column_weights(completions, weights, **kwargs):
    """The dataset's `weights` column, named like score_rewards' own argument."""
    return list(weights)
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def small_config(tiny_folder, out, **overrides):
    values = dict(model=str(tiny_folder), output_dir=str(out), max_steps=2, batch_size=4, mini_batch_size=2,
                  ppo_epochs=1, max_new_tokens=8, reward=["keyword(include=['the'])"])
    return PPOConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def learned_run(tiny_folder, reward_file, tmp_path_factory):
    """25 updates on a reward from a .py file; a high learning rate so the random model learns in seconds
    (with seeds 0-3 it went from ~0.3 to 0.90-0.97)."""
    out = tmp_path_factory.mktemp("learned")
    cfg = PPOConfig(model=str(tiny_folder), output_dir=str(out), max_steps=25, batch_size=32, mini_batch_size=16,
                    max_new_tokens=8, reward=[f"{reward_file}:starts_with_vowel"], learning_rate=1e-2,
                    lr_scheduler_type="constant", kl_coef=0.01, missing_eos_penalty=0.0)
    policy = train_ppo(cfg)
    return out, policy, read_jsonl(out / "metrics.jsonl")


def test_ppo_raises_a_rule_reward_with_finite_kl(learned_run):
    _, _, rows = learned_run
    scores = [r["objective/scores"] for r in rows]
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    assert end > start + 0.4, (start, end)
    assert all(math.isfinite(r["objective/kl"]) for r in rows)
    assert abs(rows[0]["objective/kl"]) < 1e-3  # the policy starts as its reference
    assert rows[-1]["objective/kl"] > 0.1


def test_metric_names_are_exactly_the_documented_ones(learned_run):
    _, _, rows = learned_run
    assert len(rows) == 25 and [r["step"] for r in rows] == list(range(1, 26))
    for row in rows:
        assert set(row) == METRIC_NAMES | {"step", "rewards/starts_with_vowel/mean"}


def test_outputs_are_written_and_the_policy_reloads(learned_run):
    out, policy, _ = learned_run
    assert (out / "ppo_curves.png").stat().st_size > 1000
    samples = (out / "samples.md").read_text()
    assert samples.count("**before:**") == 4 and samples.count("**after:**") == 4
    reloaded = Policy.from_pretrained(str(out), reference=False)
    assert torch.equal(reloaded.value_head.weight, policy.value_head.weight.detach().cpu())  # trained on CUDA if present


def test_rollout_logprobs_and_values_match_a_forward_pass(tiny_folder):
    """PPO's old log-probs and values come from generation: they must equal the training forward's, at the
    sampling temperature, and sampling must be pure (no hidden top-k=50 from generate's defaults)."""
    policy = Policy.from_pretrained(str(tiny_folder), reference=False)
    torch.nn.init.normal_(policy.value_head.weight)
    torch.manual_seed(0)
    settings = SamplingConfig(max_new_tokens=16, temperature=0.7)
    ro = policy.sample(["hello there", "how was your weekend? it was long"], settings)
    T = ro.completion_ids.shape[1]
    logprobs, values, _ = policy(ro.input_ids, ro.attention_mask, T, temperature=0.7)
    real = ro.completion_mask.bool()
    assert torch.allclose(logprobs[real], ro.logprobs[real], atol=1e-4)
    assert torch.allclose(values[real], ro.values[real], atol=1e-4)
    with torch.no_grad():
        logits = policy.model(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits[:, -T - 1:-1]
    ranks = (logits > logits.gather(-1, ro.completion_ids.unsqueeze(-1))).sum(-1)[real]
    assert ranks.max() >= 50  # tokens outside the top 50 get sampled


def _cpu_bf16() -> bool:
    from rlgen.models import _cpu_runs

    return torch.cuda.is_available() or _cpu_runs(torch.bfloat16)


@pytest.mark.parametrize("overrides", [
    dict(lora_r=4, learning_rate=1e-3),
    dict(separate_critic=True),
    dict(lora_r=4, separate_critic=True, adaptive_kl=True, kl_target=0.1, kl_estimator="k3", whiten_rewards=True,
         stop_token="e", target_kl=1e-9, gradient_accumulation_steps=2, ppo_epochs=2),
    pytest.param(dict(lora_r=4, dtype="bfloat16", gradient_checkpointing=True, batch_size=2),
                 marks=pytest.mark.skipif(not _cpu_bf16(), reason="no bfloat16 kernels")),
], ids=["lora", "separate_critic", "lora_critic_and_options", "bf16_checkpointing"])
def test_variants_run(tiny_folder, tmp_path, overrides):
    policy = train_ppo(small_config(tiny_folder, tmp_path, **overrides))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert abs(rows[0]["objective/kl"]) < 1e-3
    assert (policy.critic is not None) == overrides.get("separate_critic", False)
    if overrides.get("lora_r"):
        assert policy.is_peft and policy.ref_model is None  # reference = adapter disabled
        assert (tmp_path / "adapter").is_dir()
    if overrides.get("adaptive_kl"):
        assert rows[1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]
    if overrides.get("dtype") == "bfloat16":  # one mini-batch, one epoch: the only ratio is the first, exactly 1
        assert policy.base_model.dtype == torch.bfloat16
        assert rows[0]["val/ratio"] == 1.0 and rows[0]["policy/approxkl"] == 0.0


def test_user_reward_file_by_path(tiny_folder, reward_file, tmp_path):
    train_ppo(small_config(tiny_folder, tmp_path, max_steps=1, reward=[f"{reward_file}:vowel_share", "keyword(include=['a'])"],
                           reward_weights=[1.0, 0.5]))
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert 0.0 < row["rewards/vowel_share/mean"] < 1.0 and "rewards/keyword/mean" in row


def test_an_ensembles_members_reach_the_metrics_and_the_evaluations(tiny_folder, tiny_reward_models, reward_file,
                                                                     tmp_path):
    """An ensemble of two tiny reward-model folders and a rule: every member's mean is logged beside the combined
    reward's, in the update rows and in the evaluator's."""
    rm_a, rm_b = tiny_reward_models
    members = ["rm_a", "rm_b", "vowel_share"]
    ensemble = f"ensemble(members=[{rm_a!r}, {rm_b!r}, '{reward_file}:vowel_share'], combine='min')"
    train_ppo(small_config(tiny_folder, tmp_path, max_steps=2, reward=[ensemble], eval_steps=2,
                           evaluate={"num_prompts": 2, "batch_size": 2}))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    updates, evals = [r for r in rows if "objective/scores" in r], [r for r in rows if "eval/reward/mean" in r]
    assert len(updates) == 2 and len(evals) == 1
    for row in updates:
        assert set(row) == METRIC_NAMES | {"step", "rewards/ensemble/mean", *(f"rewards/ensemble/{m}/mean" for m in members)}
        assert row["objective/scores"] == pytest.approx(row["rewards/ensemble/mean"], abs=1e-5)  # the min is optimised
        assert row["rewards/ensemble/mean"] <= min(row[f"rewards/ensemble/{m}/mean"] for m in members) + 1e-6
    assert all(f"eval/rewards/ensemble/{m}/mean" in evals[0] for m in members)


def test_a_dataset_column_named_weights_reaches_the_reward(tiny_folder, reward_file, tmp_path):
    """Before, the column went to score_rewards(**columns) and collided with its `weights`: a TypeError."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "hello {i}", "weights": 0.25}}\n' for i in range(8)))
    train_ppo(small_config(tiny_folder, tmp_path / "run", max_steps=1, dataset=str(data),
                           reward=[f"{reward_file}:column_weights"]))
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["rewards/column_weights/mean"] == 0.25


@pytest.mark.parametrize("name, message", [("raises", "raised ValueError: boom"),
                                           ("wrong_length", "wrong number of values"),
                                           ("not_a_number", "must be finite")])
def test_bad_reward_stops_the_run_naming_it(tiny_folder, reward_file, tmp_path, name, message):
    with pytest.raises(RewardError, match=f"reward '{name}'.*{message}"):
        train_ppo(small_config(tiny_folder, tmp_path, reward=[f"{reward_file}:{name}"]))


@pytest.mark.parametrize("overrides, message", [
    (dict(reward=["no_such_reward"]), "unknown reward 'no_such_reward'"),
    (dict(reward=["missing.py:f"]), "file not found: missing.py"),
    (dict(batch_size=5), "batch_size 5 is not a multiple of mini_batch_size 2"),
    (dict(kl_estimator="k9"), "kl_estimator must be k1 or k3"),
    (dict(stop_token="two words"), "stop_token 'two words' is"),
    (dict(eval_steps=-1), "eval_steps must be at least 0, got -1"),
    (dict(evaluate={"num_prompt": 4}), "ppo option 'evaluate': unknown key 'num_prompt'"),
    (dict(evaluate={"seed": 4}), "evaluate: 'seed' is this run's own setting"),
])
def test_bad_options_are_user_errors(tiny_folder, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_ppo(small_config(tiny_folder, tmp_path, **overrides))


EVAL_KEYS = {"step", "completions/generated", "eval/reward/mean", "eval/rewards/keyword/mean", "eval/kl",
             "eval/gold/sentiment_positive/mean", "eval/perplexity_ref", "eval/num_samples", "time/eval"}


def _trained(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if not k.startswith("ref_model.")}


@pytest.mark.parametrize("overrides", [{}, dict(lora_r=4)], ids=["full", "lora"])
def test_eval_steps_log_evaluations_and_leave_training_unchanged(tiny_folder, tmp_path, overrides):
    """Every eval_steps updates a row of the shared evaluator's metrics (its own prompts, proxy and gold) on the
    live policy; its random draws and its eval mode are undone, so the weights are bit-identical to a run without."""
    plain = train_ppo(small_config(tiny_folder, tmp_path / "plain", max_steps=3, **overrides))
    evaluate = {"num_prompts": 3, "batch_size": 2, "gold_reward": ["sentiment_positive"]}
    evaluated = train_ppo(small_config(tiny_folder, tmp_path / "eval", max_steps=3, eval_steps=2, evaluate=evaluate,
                                       **overrides))
    a, b = _trained(plain), _trained(evaluated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_jsonl(tmp_path / "eval" / "metrics.jsonl")
    updates = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/reward/mean" in r]
    drop = {"time/rollout", "time/score", "time/update"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in updates] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(tmp_path / "plain" / "metrics.jsonl")]
    assert [(r["step"], r["completions/generated"], r["eval/num_samples"]) for r in evals] == [(2, 8, 3)]
    assert EVAL_KEYS <= set(evals[0]) and len(rows) == 4
    samples = read_jsonl(tmp_path / "eval" / "eval_steps" / "step2" / "eval_samples.jsonl")
    assert len(samples) == 3 and all(set(s["rewards"]) == {"keyword", "gold/sentiment_positive"} for s in samples)


DDP_SCRIPT = '''
import os
import sys

from rlgen.config import PPOConfig

from rlgen.ppo import train_ppo

model, out, reward = sys.argv[1:4]
cfg = PPOConfig(model=model, output_dir=out, max_steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                max_new_tokens=8, reward=[reward], eval_steps=2, evaluate={"num_prompts": 2, "batch_size": 2})
policy = train_ppo(cfg)
rank = os.environ["RANK"]
total = sum(p.detach().double().sum().item() for p in policy.model.parameters())
open(f"{out}/../param_sum_{rank}.txt", "w").write(repr(total))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_accelerate_launch(tiny_folder, reward_file, tmp_path):
    """Two CPU processes over gloo. accelerate 1.15's `launch --cpu --num_processes 2` starts a single process
    unless given an mpirun hostfile, so the processes are started with its torchrun launcher (`--multi_gpu`)
    and the GPUs hidden; `Accelerator(cpu=True)` then runs them as MULTI_CPU with the gloo backend. The main
    process alone runs the evaluation along training (eval_steps), while the other waits."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    script = tmp_path / "ddp_ppo.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tiny_folder), str(out),
           f"{reward_file}:process_rank"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("metrics.jsonl")) == [out / "metrics.jsonl"]
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward/mean" in r]
    assert [(r["step"], r["completions/generated"]) for r in evals] == [(2, 16)]  # 2 updates x 4 prompts x 2
    rows = [r for r in rows if r not in evals]
    assert len(rows) == 2
    for row in rows:  # rank 0 scores 0 and rank 1 scores 1: the logged means are over both processes
        assert row["objective/scores"] == pytest.approx(0.5)
        assert row["rewards/process_rank/mean"] == pytest.approx(0.5)
    sums = [float((tmp_path / f"param_sum_{rank}.txt").read_text()) for rank in (0, 1)]
    assert sums[0] == sums[1]  # gradients were averaged, so both processes hold the same weights


TRL_REWARDS = '''
from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)
repetition = get_repetition_penalty_reward(ngram_size=2)


def solved(prompts, completions, solution, **kwargs):
    """TRL's accuracy_reward shape (math_verify is not installed): conversational completions, a solution column,
    checked against the prompt it belongs to (1.0 when the rows line up)."""
    assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
    return [float(s == p[-1]["content"].split()[-1]) for p, s in zip(prompts, solution, strict=True)]
'''


def test_trl_reward_functions_run_unchanged_in_ppo_and_the_evaluator(tiny_folder, tmp_path):
    from rlgen.cli import main

    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    rows = [{"prompt": [{"role": "system", "content": "answer"}, {"role": "user", "content": f"say {w}"}],
             "solution": w} for w in ["one", "two", "three", "four", "five", "six"]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = ["trl.rewards:think_format_reward", *(f"{tmp_path / 'trl_rewards.py'}:{f}"
                                                   for f in ("overlong", "repetition", "solved"))]
    train_ppo(small_config(tiny_folder, tmp_path / "ppo", dataset=str(data), reward=specs))
    names = ["think_format_reward", "overlong", "repetition", "solved"]
    shown = (tmp_path / "ppo" / "samples.md").read_text()  # conversational prompts as JSON messages, not a repr
    assert '**prompt:** [{"role": "system", "content": "answer"}, {"role": "user", "content": "say' in shown
    for row in read_jsonl(tmp_path / "ppo" / "metrics.jsonl"):
        assert row["rewards/solved/mean"] == 1.0 and all(f"rewards/{n}/mean" in row for n in names)
    args = ["evaluate", "--model", str(tmp_path / "ppo"), "--dataset", str(data), "--split", "train",
            "--num_prompts", "6", "--max_new_tokens", "8", "--output_dir", str(tmp_path / "eval")]
    assert main(args + [a for s in specs for a in ("--reward", s)]) == 0
    samples = [json.loads(line) for line in (tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in load_rows(str(data), "train")]
    for s in samples:  # completion_ids are the sampled tokens, EOS included
        assert s["rewards"]["overlong"] == pytest.approx(min(0.0, (4 - s["length"]) / 4))
        assert s["rewards"]["solved"] == 1.0 and s["rewards"]["think_format_reward"] == 0.0


def test_the_summary_time_spans_the_updates_as_the_progress_bar_does(tiny_folder, tmp_path, monkeypatch, capsys):
    """The summary's seconds are the updates' (what the progress bar shows), the saving and samples after them
    separate: a clock that jumps 1000 s while the curves are drawn shows in the second number only."""
    import time

    import rlgen.ppo

    jump = {"s": 0.0}
    perf_counter, plot = time.perf_counter, rlgen.ppo._plot_curves

    def slow_plot(*args):
        jump["s"] += 1000.0
        return plot(*args)

    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + jump["s"])
    monkeypatch.setattr(rlgen.ppo, "_plot_curves", slow_plot)
    train_ppo(small_config(tiny_folder, tmp_path / "ppo"))
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[rlgen] ppo:")]
    updates_s, after_s = (float(x.split("s")[0]) for x in (line.split(" in ")[1], line.split(", then ")[1]))
    assert line.startswith("[rlgen] ppo: 2 updates in ") and updates_s < 1000 <= after_s, line


def test_two_ddp_processes_train_as_one_at_the_same_global_batch(tiny_folder, reward_file, tmp_path):
    """DDP (accelerate launch, 2 CPU processes x batch 4) and one process x batch 8 (one mini-batch each) with the defaults (advantage
    whitening on) and completions of unequal lengths (greedy sampling, EOS where the argmax is 1 modulo 7, as in
    tests/test_fsdp.py): the same metrics and weights, since whitening and loss denominators cover the global batch
    and 2 accumulation steps. Tolerance rel 1e-4: the sums are split differently over processes."""
    from tests.test_fsdp import GREEDY_CLI, _args, _greedy

    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    script = tmp_path / "greedy_cli.py"
    script.write_text(GREEDY_CLI)
    common = dict(model=str(tiny_folder), reward=[f"{reward_file}:vowel_share"], max_steps=2, mini_batch_size=4,
                  gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=6, learning_rate=3e-3)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(script), "ppo", *_args({**common, "batch_size": 4, "output_dir": tmp_path / "ddp"})]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "multinomial", _greedy)
        one = train_ppo(PPOConfig(**{**common, "mini_batch_size": 8}, batch_size=8, output_dir=str(tmp_path / "one")))
    rows, single = read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert any(r["completions/mean_length"] != round(r["completions/mean_length"]) for r in single)
    for row, ref in zip(rows, single, strict=True):
        for key in ("loss/policy", "loss/value", "objective/kl", "objective/scores", "policy/approxkl",
                    "completions/mean_length"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
    ddp = Policy.from_pretrained(str(tmp_path / "ddp"), reference=False)
    one_params = dict(one.named_parameters())
    for key, value in ddp.named_parameters():
        assert torch.allclose(value, one_params[key], rtol=1e-4, atol=1e-5), key
