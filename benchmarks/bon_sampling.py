"""Best-of-n sampling as the over-optimisation sweep runs it, with each repeated prompt prefilled once and without.

The sweep's best-of-n (experiments/overoptimization_sweep.yaml): the default model, the first 16 held-out
evaluation prompts each drawn `--repeat` times (draw j of prompt i is sample j * 16 + i, as `Evaluator` orders
them), 64 samples per `Policy.sample` call, 16 new tokens at temperature 1, no values. Arm `shared`: `Policy.sample`
as it is (`_shared_prompt_cache` prefills each distinct prompt once and copies its KV cache to the repeats); arm
`each`: the same with the shared prefill turned off, so that generate prefills every row. Both arms start from the
same seed, so they sample the same tokens, which the output checks. Runs alternate between the arms, so a busy
machine slows both alike; process (CPU) seconds are reported beside wall seconds.

Prints one JSON line: seconds per draw (a draw = one completion) of each arm, median and each run, the speed-up,
whether the tokens matched and the largest log-prob difference between the arms.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=8, help="draws per prompt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per arm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from rlgen.config import SamplingConfig
    from rlgen.data import load_rows
    from rlgen.models import set_threads
    from rlgen.policy import Policy
    from rlgen.text import prompt_of

    set_threads(args.threads)
    policy = Policy.from_pretrained(args.model, reference=False)
    rows = load_rows("chitchat", "test")[:args.num_prompts]
    prompts = [prompt_of(r) for r in rows] * args.repeat
    settings = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    shared_cache = policy._shared_prompt_cache

    def sample_all(arm: str):
        policy._shared_prompt_cache = shared_cache if arm == "shared" else (lambda *a: {})
        torch.manual_seed(0)
        return [policy.sample(prompts[i:i + args.batch_size], settings, with_values=False)
                for i in range(0, len(prompts), args.batch_size)]

    arms = ["shared", "each"]
    rollouts = {arm: sample_all(arm) for arm in arms}  # warm-up, and the rollouts compared
    same = all(torch.equal(a.completion_ids, b.completion_ids) for a, b in zip(rollouts["shared"], rollouts["each"]))
    lp_diff = max(float((a.logprobs - b.logprobs).abs().max()) for a, b in zip(rollouts["shared"], rollouts["each"]))
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    for _ in range(args.runs):
        for arm in arms:
            w, c = time.perf_counter(), time.process_time()
            sample_all(arm)
            wall[arm].append((time.perf_counter() - w) / len(prompts))
            cpu[arm].append((time.process_time() - c) / len(prompts))
    out = {"model": args.model, "prompts": args.num_prompts, "draws_per_prompt": args.repeat,
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
           "same_tokens": same, "max_logprob_diff": lp_diff}
    for arm in arms:
        out[f"{arm}_s_per_draw"] = {"median": statistics.median(wall[arm]), "runs": wall[arm],
                                    "cpu_median": statistics.median(cpu[arm])}
    out["speedup"] = statistics.median(wall["each"]) / statistics.median(wall["shared"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
