"""gpu_check.sh part 1b: the tiny policy on CUDA: sampling, reference log-probs, evaluate_policy, train_ppo and
the `rlgen ppo` CLI; prints one JSON line {"cuda_smoke": ...} and exits non-zero on failure."""

import json
import os
import subprocess
import sys
import time

import torch

from rlgen.config import PPOConfig, SamplingConfig
from rlgen.data import load_rows
from rlgen.evaluation import evaluate_policy
from rlgen.policy import Policy
from rlgen.ppo import train_ppo
from rlgen.rewards import load_reward

quick = os.environ.get("GPU_CHECK_QUICK") == "1"
cuda = torch.cuda.is_available()
if not cuda and not quick:
    sys.exit("CUDA is not available")
dev = torch.device("cuda" if cuda else "cpu")
work = os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check")
res = {"device": str(dev)}


def sync():
    if cuda:
        torch.cuda.synchronize()


def on_dev(module):
    return sorted({p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()})


t = time.perf_counter()
policy = Policy.from_pretrained("tiny").to(dev)
res["s_build"] = time.perf_counter() - t
assert on_dev(policy) == [dev.type], on_dev(policy)
assert policy.ref_model is not None and on_dev(policy.ref_model) == [dev.type]
prompts = [str(r["prompt"]) for r in load_rows("chitchat", "validation")[:8]]
s = SamplingConfig(max_new_tokens=8 if quick else 32)

torch.manual_seed(0)
sync()
t = time.perf_counter()
ro = policy.sample(prompts, s)
sync()
res["s_sample_8"] = time.perf_counter() - t
T = ro.completion_ids.shape[1]
assert ro.completion_ids.device.type == dev.type and ro.values.device.type == dev.type
mask = ro.completion_mask.float()
sync()
t = time.perf_counter()
ref = policy.ref_logprobs(ro.input_ids, ro.attention_mask, T, s.temperature)
sync()
res["s_ref_logprobs"] = time.perf_counter() - t
with torch.no_grad():
    lp, values, _ = policy(ro.input_ids, ro.attention_mask, T, s.temperature)
# policy == reference at the start: generation-pass log-probs vs a separate forward (policy and reference)
res["max_abs_gen_vs_forward_logprob"] = float(((ro.logprobs - lp).abs() * mask).max())
res["max_abs_gen_vs_ref_logprob"] = float(((ro.logprobs - ref).abs() * mask).max())
res["max_abs_gen_vs_forward_value"] = float(((ro.values - values).abs() * mask).max())
res["completions"] = ro.completions[:3]

reward = [load_reward("target_length")]
sync()
t = time.perf_counter()
ev = evaluate_policy(policy, prompts, reward, s, batch_size=8)
sync()
res["s_evaluate_8"] = time.perf_counter() - t
res["eval"] = {k: ev[k] for k in ("eval/reward/mean", "eval/kl", "eval/perplexity_ref", "eval/mean_length")}
assert abs(ev["eval/kl"]) < 1e-3, ev["eval/kl"]  # policy == reference

steps = 2 if quick else 3
cfg = PPOConfig(model="tiny", output_dir=f"{work}/ppo_inproc", max_steps=steps, batch_size=8, mini_batch_size=4,
                reward=["target_length"], max_new_tokens=8 if quick else 32, overwrite_output_dir=True)
t = time.perf_counter()
trained = train_ppo(cfg)
sync()
res["s_train_ppo_inproc"] = time.perf_counter() - t
res["train_ppo_param_devices"] = on_dev(trained)
assert res["train_ppo_param_devices"] == [dev.type], res["train_ppo_param_devices"]
rows = [json.loads(line) for line in open(f"{work}/ppo_inproc/metrics.jsonl")]
assert len(rows) == steps, len(rows)
res["ppo_inproc_last"] = {k: rows[-1].get(k) for k in ("objective/scores", "objective/kl", "time/rollout",
                                                        "time/score", "time/update")}

cmd = [sys.executable, "-m", "rlgen.cli", "ppo", "--model", "tiny", "--max_steps", str(steps), "--batch_size", "8",
       "--mini_batch_size", "4", "--reward", "target_length", "--output_dir", f"{work}/ppo_cli",
       "--overwrite_output_dir"]
print("+", " ".join(cmd), flush=True)
t = time.perf_counter()
proc = subprocess.run(cmd, timeout=300)
res["s_cli_ppo"] = time.perf_counter() - t
res["cli_rc"] = proc.returncode
cli_rows = [json.loads(line) for line in open(f"{work}/ppo_cli/metrics.jsonl")] if proc.returncode == 0 else []
res["cli_updates"] = len(cli_rows)
if cuda:
    res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
ok = proc.returncode == 0 and len(cli_rows) == steps
res["ok"] = ok
print(json.dumps({"cuda_smoke": res}), flush=True)
sys.exit(0 if ok else 1)
