"""gpu_check.sh part 4: sharded PPO (`--fsdp full_shard`, torch FSDP2) on every GPU of the machine, then
`rlgen sft` under accelerate's FSDP2 config; prints one JSON line {"fsdp_ppo": ...}.

    python benchmarks/gpu_check/fsdp_ppo.py --work /tmp/gpu_check/fsdp [--peer-dir .devcarry/bench]

The model: a random Llama with the peer's "base" trunk (peer_common.SIZES["base"], ~88M parameters per model when
--peer-dir is given, else the tiny shape) over rlgen's tiny tokenizer, saved as a folder. PPO runs full
fine-tuning with a separate critic under `torchrun --nproc_per_node <GPUs>`, bfloat16 compute with float32 master
weights (MixedPrecisionPolicy), 64 prompts per GPU and update, 128 generated tokens (EOS blocked), 5 updates.
Reported: generated tokens per second over all GPUs (from metrics.jsonl: tokens / the updates' time, the first
update left out as it includes warm-up), each rank's peak CUDA memory (torch.cuda.max_memory_allocated), and the
sft run's return code. GPU_CHECK_QUICK=1: 2 CPU processes, float32, the tiny shape and a few tokens (a dry run of
the same code path; the sft part then checks the one-line refusal on CPU instead).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

QUICK = os.environ.get("GPU_CHECK_QUICK") == "1"


def build_model(folder: Path, peer_dir: str | None) -> None:
    from rlgen.models import TINY_SHAPE, build_tiny_model, build_tiny_tokenizer

    shape = dict(TINY_SHAPE)
    if peer_dir and not QUICK:
        sys.path.insert(0, str(Path(peer_dir).resolve()))
        import peer_common

        shape.update({k: v for k, v in peer_common.SIZES["base"].items() if k != "vocab"})
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=0, **shape).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def worker(args) -> None:
    """One rank under torchrun: train_ppo in this process, then this rank's peak memory to a file."""
    from rlgen.config import PPOConfig
    from rlgen.ppo import train_ppo

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    cfg = PPOConfig(model=str(args.work / "model"), output_dir=str(args.work / "ppo"), overwrite_output_dir=True,
                    fsdp="full_shard", separate_critic=True, dtype="float32" if QUICK else "bfloat16",
                    max_steps=3 if QUICK else 5, batch_size=4 if QUICK else 64, mini_batch_size=4 if QUICK else 16,
                    ppo_epochs=2, max_new_tokens=8 if QUICK else 128, min_new_tokens=8 if QUICK else 128,
                    max_prompt_length=32, reward=["keyword(include=['a'])"], threads=1 if QUICK else 4)
    train_ppo(cfg)
    rank = int(os.environ["RANK"])
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    (args.work / f"peak_{rank}.json").write_text(json.dumps({"rank": rank, "peak_bytes": peak,
                                                             "kind": "cuda allocated" if cuda else "RSS"}))


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check/fsdp"))
    parser.add_argument("--peer-dir", default=None)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for old in args.work.glob("peak_*.json"):
        old.unlink()
    build_model(args.work / "model", args.peer_dir)
    gpus = torch.cuda.device_count()
    nproc = 2 if QUICK or gpus == 0 else gpus
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if QUICK else {}), "OMP_NUM_THREADS": "1" if QUICK else "4"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__,
           "--work", str(args.work)]
    rc = subprocess.run(cmd, env=env).returncode
    result = {"processes": nproc, "gpus": gpus, "rc": rc}
    if rc == 0:
        rows = [json.loads(line) for line in (args.work / "ppo" / "metrics.jsonl").read_text().splitlines()]
        steady = rows[1:]
        per_rank_batch = 4 if QUICK else 64
        tokens = sum(r["completions/mean_length"] * per_rank_batch * nproc for r in steady)
        seconds = sum(r["time/rollout"] + r["time/score"] + r["time/update"] for r in steady)
        result.update(tokens_per_s=round(tokens / seconds, 1), updates_timed=len(steady),
                      s_per_update=round(seconds / len(steady), 3),
                      rollout_share=round(sum(r["time/rollout"] for r in steady) / seconds, 3),
                      peak_memory=[json.loads((args.work / f"peak_{r}.json").read_text()) for r in range(nproc)])
    # rlgen sft under accelerate's FSDP2 config: sharded on GPUs; on CPU processes the one-line refusal
    sft = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "experiments/accelerate/fsdp.yaml",
           "--num_processes", str(nproc), "-m", "rlgen", "sft", "--model", str(args.work / "model"),
           "--output_dir", str(args.work / "sft"), "--overwrite_output_dir", "true", "--max_steps", "3"]
    done = subprocess.run(sft, env=env, capture_output=True, text=True)
    result["sft_fsdp_rc"] = done.returncode
    result["sft_fsdp_refusals"] = sum("does not shard on CPU processes" in line for line in done.stderr.splitlines())
    print(json.dumps({"fsdp_ppo": result}))


if __name__ == "__main__":
    main()
