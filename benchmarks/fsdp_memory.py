"""Per-process memory of sharded PPO (`--fsdp full_shard`, torch FSDP2) against whole copies (DDP), measured
from the tensors, and the memory table computed from the model's parameter counts. Prints one JSON object.

    python benchmarks/fsdp_memory.py                      # tiny model, 2 CPU processes (gloo), started by torchrun
    python benchmarks/fsdp_memory.py --nproc 4 --model PATH

Each process builds the policy the way `rlgen ppo` does (value head on the trunk, or --separate_critic, plus the
frozen reference), takes one PPO-shaped optimiser step (log-probs and values of a rollout, AdamW) and counts
the bytes it holds of the trainable parameters, their gradients and the optimiser state:
- `whole`: unsharded, as every DDP process holds them (DDP's gradient buckets come on top; not counted);
- `sharded`: after `rlgen.distributed.shard_policy`, counted from each DTensor's local shard.
`ratio` = sharded / whole on the largest rank (target <= 0.55 at 2 processes). The frozen reference is counted
apart. `rollout`: the policy's parameter bytes while it generates (`Policy.sample` gathers the whole policy),
read by a forward hook during generation (held on top of the process's shards, which stay), and the rise of the
process's peak RSS over the rollout after a warm-up rollout (Linux; it includes activations and the KV cache).

`table`: bytes per process computed from the parameter counts (fp32 weights 4 B, gradients 4 B, Adam moments
8 B per trainable element; the reference 4 B, no gradients), divided by the world size, for 1, 2 and 8 processes;
`check` compares the computed figures at world size 1 and `nproc` with the measured ones.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _ppo_step(policy, adam, ids, mask, n):
    logprobs, values, _ = policy(ids, mask, n)
    (-logprobs.mean() + values.pow(2).mean()).backward()
    adam.step()


def _counts(policy) -> dict:
    """Trainable and frozen parameter elements (the whole model, whatever the sharding)."""
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in policy.parameters()) - trainable}


def _table(counts: dict, worlds) -> dict:
    per_element = {"params": 4, "grads": 4, "optimizer": 8}
    return {str(w): {**{k: counts["trainable"] * b // w for k, b in per_element.items()},
                     "reference": counts["frozen"] * 4 // w,
                     "total": (counts["trainable"] * 16 + counts["frozen"] * 4) // w} for w in worlds}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from rlgen import distributed
    from rlgen.config import SamplingConfig
    from rlgen.policy import Policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")

    def build():
        return Policy.from_pretrained(args.model, separate_critic=args.separate_critic, lora_r=args.lora_r,
                                      reference=True, seed=0).eval()

    torch.manual_seed(0)
    ids = torch.randint(5, 100, (args.batch, 24))
    mask = torch.ones_like(ids)

    whole = build()
    counts = _counts(whole)
    params = [p for p in whole.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=1e-5, eps=1e-5)
    _ppo_step(whole, adam, ids, mask, 8)
    whole_bytes = distributed.training_bytes(params, adam)
    whole_ref = distributed.local_bytes([p for p in whole.parameters() if not p.requires_grad])
    del whole, params, adam

    policy = build()
    distributed.shard_policy(policy, device, torch.float32)
    params = [p for p in policy.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=1e-5, eps=1e-5)
    _ppo_step(policy, adam, ids, mask, 8)
    sharded_bytes = distributed.training_bytes(params, adam)
    sharded_ref = distributed.local_bytes([p for p in policy.parameters() if not p.requires_grad])
    held = sum(distributed.local_tensor(p).numel() for p in policy.parameters())

    seen = []  # the policy's parameter bytes at each generation step
    hook = policy.base_model.register_forward_pre_hook(
        lambda module, inputs: seen.append(distributed.local_bytes(list(module.parameters()))))
    resting = distributed.local_bytes(list(policy.base_model.parameters()))
    rollout = SamplingConfig(max_new_tokens=16, min_new_tokens=16)
    policy.sample(["hello"], rollout, with_values=False)  # warm-up: first-call imports and allocations
    seen.clear()
    _peak_rss_reset()
    before = _peak_rss()
    policy.sample(["hello there"] * args.batch, rollout, with_values=False)
    rss_rise = _peak_rss() - before
    hook.remove()

    mine = {"rank": rank, "world_size": world, "held_elements": held, "whole": whole_bytes, "sharded": sharded_bytes,
            "reference_whole": whole_ref, "reference_sharded": sharded_ref,
            "rollout": {"policy_shards": resting, "policy_gathered_while_generating": max(seen),
                        "peak_rss_rise": rss_rise}}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        worst = max(everyone, key=lambda r: sum(r["sharded"].values()))
        whole_total, sharded_total = sum(worst["whole"].values()), sum(worst["sharded"].values())
        table = _table(counts, sorted({1, 2, 8, world}))
        check = {str(w): {"computed": table[str(w)]["params"] + table[str(w)]["grads"] + table[str(w)]["optimizer"],
                          "measured": measured}
                 for w, measured in ((1, whole_total), (world, sharded_total))}
        print(json.dumps({"model": args.model, "separate_critic": args.separate_critic, "lora_r": args.lora_r,
                          "world_size": world, "counts": counts, "ranks": everyone,
                          "whole_bytes_per_rank": whole_total, "sharded_bytes_per_rank": sharded_total,
                          "ratio": round(sharded_total / whole_total, 4), "table": table, "check": check}))
    # The sharded policy's device mesh holds the process group: dropped only at interpreter exit, the group died
    # when gloo's threads could no longer take the GIL ("terminate called without an active exception", SIGABRT
    # in about 1 run of 20 here; none in 60 since). Release it while the interpreter is whole, then destroy.
    del policy, params, adam, hook
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--separate_critic", action="store_true")
    parser.add_argument("--lora_r", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, *sys.argv[1:]]
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
