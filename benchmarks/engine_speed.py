"""PPO rollouts sampled by transformers' generate (`--rollout_engine hf`) and by colocated vLLM (`vllm`), side by
side in one process, plus the weight-sync time.

Two shapes on the default model (SmolLM2-135M-Instruct, float32): the README main job's PPO rollout (LoRA r 16,
alpha 32, 8 prompts of its prompt stream, 32 new tokens, values from the value head) and 64 prompts x exactly 128
new tokens (`min_new_tokens` = `max_new_tokens`, so both engines generate the same number of tokens). For a GPU
(benchmarks/gpu_check.sh), `--shape base|0.5b` takes a random Llama of the peer benchmark's base shape (~88M
parameters) or of ~0.5B parameters over the tiny tokenizer instead, `--dtype bfloat16`, `--lora-r 0`. A rollout is
`Policy.sample` as PPO calls it: for vllm that includes the trainer's forward pass that re-reads log-probs and
values. Runs alternate between the engines, so a busy machine slows both alike; the engine's first batch (its
warm-up) is timed apart. Weight sync: `VLLMEngine.sync` after an optimiser step's worth of change, LoRA merged.

Prints one JSON line: seconds per rollout (median and each run), tokens per second, the vllm/hf speed-up per
shape, the engine's own share of a vllm rollout (`_vllm_generate_s`; the rest is the trainer's forward that
re-reads log-probs and values), the start-up and first-batch seconds, the sync seconds (median of 5) and the largest engine/trainer
log-prob gap.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Llama trunks over the tiny tokenizer (head size 64: vLLM's kernels take 32 and up)
SHAPES = {"base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12),
          "0.5b": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20,
                       num_key_value_heads=20)}


class TimedEngine:
    """The engine, its `generate` calls timed (`seconds`): the engine's share of a vllm rollout."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.engine.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per engine and shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--large", default="64x128", help="the second shape, prompts x new tokens ('' to skip)")
    parser.add_argument("--shape", default="", choices=["", *SHAPES], help="a random Llama of this shape instead")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lora-r", type=int, default=16)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from rlgen import engines
    from rlgen.config import EvalConfig, SamplingConfig
    from rlgen.data import load_rows
    from rlgen.models import build_tiny_model, build_tiny_tokenizer, default_device, set_threads
    from rlgen.policy import Policy, peft_lora_config
    from rlgen.ppo import _row_stream

    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.shape:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=0, **SHAPES[args.shape]).to(dtype)
        if args.lora_r:
            from peft import get_peft_model

            model = get_peft_model(model, peft_lora_config(args.lora_r, 2 * args.lora_r, 0.0, "all-linear"))
        policy = Policy(model, tokenizer, reference=False)
    else:
        policy = Policy.from_pretrained(args.model, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, reference=False,
                                        dtype=dtype)
    policy = policy.to(default_device()).eval()
    stream = _row_stream(load_rows("chitchat", "train"), 0)
    prompts = [str(next(stream)["prompt"]) for _ in range(64)]
    shapes = {"main_job": (prompts[:8], SamplingConfig(max_new_tokens=32))}
    if args.large:
        n, tokens = map(int, args.large.split("x"))
        shapes[args.large] = ([prompts[i % 64] for i in range(n)],
                              SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens))
    longest = max(s.max_new_tokens for _, s in shapes.values())
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        engines.start(policy, EvalConfig(model="tiny", rollout_engine="vllm", max_new_tokens=longest))
    engine = policy.engine
    result = {"benchmark": "engine_speed", "model": args.shape or args.model, "dtype": args.dtype,
              "params": sum(p.numel() for p in policy.base_model.parameters()), "lora_r": args.lora_r,
              "device": str(policy.device), "threads": args.threads, "torch_threads": torch.get_num_threads(),
              "vllm_startup_s": round(engine.startup_s, 1)}
    for shape, (batch, settings) in shapes.items():
        policy.engine = engine
        start = time.perf_counter()
        policy.sample(batch, settings)
        result[f"{shape}_vllm_first_batch_s"] = round(time.perf_counter() - start, 2)
        runs = {"hf": [], "vllm": []}
        gap, tokens, generate = 0.0, {}, []
        for _ in range(args.repeats):
            for name in runs:
                policy.engine = TimedEngine(engine) if name == "vllm" else None
                torch.manual_seed(0)
                start = time.perf_counter()
                ro = policy.sample(batch, settings)
                runs[name].append(round(time.perf_counter() - start, 3))
                if policy.engine is not None:
                    generate.append(round(policy.engine.seconds, 3))
                tokens[name] = int(ro.completion_mask.sum())
                if ro.engine_logprobs is not None:
                    gap = max(gap, float((ro.logprobs - ro.engine_logprobs).abs().max()))
        for name, times in runs.items():
            result[f"{shape}_{name}_s"] = statistics.median(times)
            result[f"{shape}_{name}_runs"] = times
            result[f"{shape}_{name}_tokens_per_s"] = round(tokens[name] / statistics.median(times), 1)
            result[f"{shape}_{name}_completion_tokens"] = tokens[name]
        result[f"{shape}_shape"] = f"{len(batch)} prompts x {settings.max_new_tokens} new tokens"
        result[f"{shape}_speedup_vllm"] = round(result[f"{shape}_hf_s"] / result[f"{shape}_vllm_s"], 2)
        # the engine alone; the rest of a vllm rollout is the trainer's forward that re-reads log-probs and values
        result[f"{shape}_vllm_generate_s"] = statistics.median(generate)
        result[f"{shape}_max_logprob_gap"] = gap
    policy.engine = engine
    syncs = []
    for _ in range(5):
        with torch.no_grad():  # an update's worth of change in what trains (the adapter, else every weight)
            for name, p in policy.model.named_parameters():
                if "lora_B" in name or not args.lora_r:
                    p.add_(torch.randn_like(p) * 1e-4)
        syncs.append(round(engine.sync(policy), 3))
    result["weight_sync_s"] = statistics.median(syncs)
    result["weight_sync_runs"] = syncs
    result["weight_sync_mb"] = round(sum(t.numel() * t.element_size() for _, t in engines.checkpoint_weights(policy))
                                     / 2**20, 1)
    engines.stop(policy)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
