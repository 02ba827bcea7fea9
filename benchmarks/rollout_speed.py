"""One PPO rollout of the README's main job, sampled by `Policy.sample` as it is and as it was before issue 11.

The main job's PPO settings (experiments/default.yaml): the default model with a LoRA adapter (r 16, alpha 32),
the first 8 prompts of its prompt stream, 32 new tokens at temperature 1, values from the value head, and
`--threads` torch threads. The earlier `Policy` class is read from git (`--before`, default: the commit before
the change) and given its own copy of the model; both copies start equal (LoRA's B is zero at init), so with
the same seed they sample the same tokens, which the output checks. `--dtypes` adds one arm per precision of the
current path (its own copy of the model in that dtype). Runs alternate between the arms, so a busy machine slows
all alike; CPU seconds (process time) are reported beside wall seconds, as they depend less on other jobs.

Prints one JSON line: seconds per rollout (median, best and each run) of each arm, the speed-ups over `before`, the
largest log-prob and value differences between the fp32 arms' rollouts, and for each current arm the largest
difference between its rollout log-probs and a forward pass over the rollout (the first PPO ratio's distance
from 1, in log space; 0 in half precision, whose rollouts re-read their log-probs with that forward pass, which
the timing includes).
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "45c3bc2"  # main before issue 11: generate() kept [B, T, V] logits and every layer's hidden states


def load_policy_class(ref: str):
    """The `Policy` class of rlgen/policy.py at git `ref`, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:rlgen/policy.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "policy_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("policy_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git revision of the earlier rlgen/policy.py")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="precisions of the current path to time (each its own arm)")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from rlgen.config import SamplingConfig
    from rlgen.data import load_rows
    from rlgen.models import resolve_dtype, set_threads
    from rlgen.policy import Policy
    from rlgen.ppo import _row_stream

    set_threads(args.threads)
    lora = dict(lora_r=16, lora_alpha=32)
    policies = {"before": load_policy_class(args.before).from_pretrained(args.model, **lora, reference=False)}
    for name in args.dtypes:
        policies[f"after_{name}"] = Policy.from_pretrained(args.model, **lora, reference=False,
                                                           dtype=resolve_dtype(name, "cpu"))
    for policy in policies.values():
        policy.eval()
    stream = _row_stream(load_rows("chitchat", "train"), 0)
    prompts = [str(next(stream)["prompt"]) for _ in range(args.batch_size)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    wall = {name: [] for name in policies}
    cpu = {name: [] for name in policies}
    rollouts = {}
    for _ in range(args.repeats):
        for name, policy in policies.items():
            torch.manual_seed(0)
            start, start_cpu = time.perf_counter(), time.process_time()
            rollouts[name] = policy.sample(prompts, sampling)
            wall[name].append(round(time.perf_counter() - start, 3))
            cpu[name].append(round(time.process_time() - start_cpu, 3))
    result = {"benchmark": "rollout_speed", "model": args.model, "lora_r": 16, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "torch_threads": torch.get_num_threads(), "before": args.before}
    for name in policies:
        result[f"s_per_rollout_{name}"] = statistics.median(wall[name])
        result[f"min_s_per_rollout_{name}"] = min(wall[name])
        result[f"cpu_s_per_rollout_{name}"] = statistics.median(cpu[name])
        result[f"runs_{name}"] = wall[name]
        result[f"completion_tokens_{name}"] = int(rollouts[name].completion_mask.sum())
        if name != "before":
            result[f"speedup_{name}"] = round(result["s_per_rollout_before"] / result[f"s_per_rollout_{name}"], 2)
            result[f"min_speedup_{name}"] = round(result["min_s_per_rollout_before"]
                                                  / result[f"min_s_per_rollout_{name}"], 2)
            result[f"cpu_speedup_{name}"] = round(result["cpu_s_per_rollout_before"]
                                                  / result[f"cpu_s_per_rollout_{name}"], 2)
            ro, policy = rollouts[name], policies[name]
            with torch.no_grad():
                forward = policy.forward(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1])[0]
            mask = ro.completion_mask.bool()
            gap = (ro.logprobs - forward)[mask].abs()
            result[f"max_logprob_vs_forward_{name}"] = float(gap.max())
            result[f"mean_logprob_vs_forward_{name}"] = float(gap.mean())
    if "after_float32" in rollouts:
        before, after = rollouts["before"], rollouts["after_float32"]
        same = torch.equal(before.completion_ids, after.completion_ids)
        result["same_tokens_float32"] = same
        result["max_logprob_diff_float32"] = float((before.logprobs - after.logprobs).abs().max()) if same else None
        result["max_value_diff_float32"] = float((before.values - after.values).abs().max()) if same else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
