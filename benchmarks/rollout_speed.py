"""One PPO rollout of the README's main job, sampled by `Policy.sample` as it is and as it was before issue 11.

The main job's PPO settings (experiments/default.yaml): the default model with a LoRA adapter (r 16, alpha 32),
the first 8 prompts of its prompt stream, 32 new tokens at temperature 1, values from the value head, and
`--threads` torch threads. The earlier `Policy` class is read from git (`--before`, default: the commit before
the change) and given its own copy of the model; both copies start equal (LoRA's B is zero at init), so with
the same seed they sample the same tokens, which the output checks. Runs alternate, before then after, so a
busy machine slows both alike.

Prints one JSON line: seconds per rollout (median and each run) before and after, the speed-up, and the largest
log-prob and value differences between the two paths' rollouts.
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
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from rlgen.config import SamplingConfig
    from rlgen.data import load_rows
    from rlgen.models import set_threads
    from rlgen.policy import Policy
    from rlgen.ppo import _row_stream

    set_threads(args.threads)
    lora = dict(lora_r=16, lora_alpha=32)
    policies = {"before": load_policy_class(args.before).from_pretrained(args.model, **lora, reference=False),
                "after": Policy.from_pretrained(args.model, **lora, reference=False)}
    for policy in policies.values():
        policy.eval()
    stream = _row_stream(load_rows("chitchat", "train"), 0)
    prompts = [str(next(stream)["prompt"]) for _ in range(args.batch_size)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    seconds = {name: [] for name in policies}
    rollouts = {}
    for _ in range(args.repeats):
        for name, policy in policies.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            rollouts[name] = policy.sample(prompts, sampling)
            seconds[name].append(round(time.perf_counter() - start, 3))
    before, after = rollouts["before"], rollouts["after"]
    same_tokens = torch.equal(before.completion_ids, after.completion_ids)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(json.dumps({
        "benchmark": "rollout_speed", "model": args.model, "lora_r": 16, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "completion_tokens": int(after.completion_mask.sum()),
        "threads": args.threads, "torch_threads": torch.get_num_threads(), "before": args.before,
        "s_per_rollout_before": median["before"], "s_per_rollout_after": median["after"],
        "speedup": round(median["before"] / median["after"], 2), "runs_before": seconds["before"],
        "runs_after": seconds["after"], "same_tokens": same_tokens,
        "max_logprob_diff": float((before.logprobs - after.logprobs).abs().max()) if same_tokens else None,
        "max_value_diff": float((before.values - after.values).abs().max()) if same_tokens else None}))


if __name__ == "__main__":
    main()
