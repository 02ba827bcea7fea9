"""gpu_check.sh part 6: every estimator preset of the RL loop (issue 31) end to end on the first GPU, one process.

    python benchmarks/gpu_check/estimators.py --work /tmp/gpu_check/estimators [--peer-dir .devcarry/bench]

The model: a random Llama with the peer's "base" trunk (peer_common.SIZES["base"], ~88M parameters when --peer-dir
is given, else the tiny shape) over rlgen's tiny tokenizer, saved once as a folder. Each preset (`rlgen ppo
--preset NAME`, the paper's settings) trains it for 3 updates at the base shape: 64 completions of 128 tokens (EOS
blocked, no missing-EOS penalty) per update, prompts of up to 32 tokens, mini-batches of 16, bfloat16 compute, a
reward that varies within a group (the completion's length in characters against 100). One JSON
line per preset as it finishes (so a timeout keeps what ran): s_per_update_steady (the median update without the
first, which compiles the static-cache decoding step), first_update_s, peak CUDA memory (reset before each
preset), whether a value head was trained (gae only), whether every logged number was finite, and the last update's
metrics (objective/*, policy/*, loss/*). Then one summary line {"estimators": ...}. GPU_CHECK_QUICK=1: on the CPU,
float32, the tiny shape, 8 completions of 8 tokens, 2 updates (a dry run of the same code path).
"""

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from fsdp_ppo import QUICK, build_model  # the same model: the peer's base shape (tiny in quick mode)


def run_preset(name: str, args) -> dict:
    from rlgen.config import PPOConfig
    from rlgen.files import read_jsonl
    from rlgen.ppo import train_ppo

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = args.work / name
    tokens = 8 if QUICK else 128
    cfg = PPOConfig(model=str(args.work / "model"), output_dir=str(out), overwrite_output_dir=True, preset=name,
                    dtype="float32" if QUICK else "bfloat16", max_steps=args.steps, batch_size=8 if QUICK else 64,
                    mini_batch_size=4 if QUICK else 16, max_new_tokens=tokens, min_new_tokens=tokens,
                    max_prompt_length=32, reward=["target_length(target=100, unit='chars')"], missing_eos_penalty=0.0,
                    threads=1 if QUICK else 4)
    t0 = time.perf_counter()
    policy = train_ppo(cfg)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    per_update = [r["time/rollout"] + r["time/score"] + r["time/update"] for r in rows]
    numbers = [v for r in rows for v in r.values() if isinstance(v, (int, float))]
    last = {k: round(v, 5) for k, v in rows[-1].items()
            if k.split("/")[0] in ("objective", "policy", "loss") and isinstance(v, (int, float))}
    shutil.rmtree(out, ignore_errors=True)  # the saved model: ~350 MB at the base shape
    return {"preset": name, "advantage": cfg.advantage, "policy_loss": cfg.policy_loss, "loss_agg": cfg.loss_agg,
            "kl_in": cfg.kl_in, "num_generations": cfg.num_generations, "updates": len(rows),
            "first_update_s": round(per_update[0], 3),
            "s_per_update_steady": round(statistics.median(per_update[1:]), 3) if len(rows) > 1 else None,
            "train_ppo_s": round(wall, 1), "value_head": policy.value_head is not None,
            "all_finite": all(math.isfinite(v) for v in numbers),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "device": "cuda" if cuda else "cpu", "last": last}


def main() -> None:
    from rlgen.config.stages import RL_PRESETS

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check/estimators"))
    parser.add_argument("--peer-dir", default=None)
    parser.add_argument("--presets", nargs="+", default=list(RL_PRESETS))
    parser.add_argument("--steps", type=int, default=2 if QUICK else 3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    build_model(args.work / "model", args.peer_dir)
    results = {}
    for name in args.presets:
        try:
            results[name] = run_preset(name, args)
        except Exception as err:  # noqa: BLE001  (one preset's failure is reported; the others still run)
            results[name] = {"preset": name, "error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps(results[name]), flush=True)
    ok = all("error" not in r and r["all_finite"] and r["value_head"] == (r["advantage"] == "gae")
             for r in results.values())
    print(json.dumps({"estimators": {k: {f: r.get(f) for f in ("s_per_update_steady", "peak_cuda_mb", "error")}
                                     for k, r in results.items()}, "ok": ok}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
