"""The least CPU time an RL update can take on transformers' model code at the GRPO peer's shape (issue 31).

It runs only the model passes that any GRPO/RLOO loop with a KL term must run, and nothing around them: no
tokenizer, reward, advantages, logging or checkpointing. Per update, on the peer's model (../shared/bench/
peer_common.py: the same config, seed and shape flags):
1. rollout: one prefill of the batch's distinct prompts (--batch / --num-generations, each cache row then repeated
   for its group) and --response-length - 1 single-token decode steps on a DynamicCache, each sampling one token
   from the softmax (the sampling that generate() does), no log-probs kept;
2. reference: one no-grad forward of the reference copy over [batch, prompt + response], logits only where
   completion tokens are predicted (logits_to_keep), and their log-probs of the sampled tokens;
3. update: --ppo-epochs times the same forward with grad, the summed log-probs of the sampled tokens as the loss,
   backward, gradient clipping and an AdamW step.
Beside them (not in the floor) transformers' `generate` samples the same rollout from the same shared prefill
(as rlgen's `Policy.sample` calls it), so that generate's own cost over its model passes is measured in the same
process.

`benchmarks/grpo_speed.py` runs it once a rep, between the peer and rlgen, and divides the peer's update cycle by
this floor: the speed-up no loop on these model passes could beat (a ceiling, not a target).

    python benchmarks/grpo_floor.py --model-size tiny --steps 8
"""

import inspect
import json
import statistics
import time

from ppo_throughput import peer_parser  # benchmarks/, this script's folder


def cpu_ms(fn, reps: int) -> float:
    """Median process CPU milliseconds of `fn()` over `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    pc, parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (divides --batch)")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("--device: the floor is measured in process CPU time, on the CPU only")
    threads = pc.set_threads(args.threads)

    import torch
    import transformers
    from transformers import DynamicCache, GenerationConfig

    config = pc.llama_config(args.model_size)
    policy, _, _ = pc.build_models(args.model_size, args.seed, with_heads=False)
    # the KV cache's keyword: `cache` from transformers 5.24 (past_key_values deprecated), as rlgen's Policy
    cache_arg = "cache" if "cache" in inspect.signature(policy.forward).parameters else "past_key_values"
    reference = pc.build_models(args.model_size, args.seed, with_heads=False)[0].eval()
    adam = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=True)  # the least work
    B, P, T, G = args.batch, args.prompt_length, args.response_length, args.num_generations
    generator = torch.Generator().manual_seed(args.seed)
    distinct = torch.randint(len(pc.SPECIALS), config.vocab_size, (B // G, P), generator=generator)
    prompts = distinct.repeat_interleave(G, dim=0)  # [B, P]
    tokens = torch.cat([prompts, torch.randint(len(pc.SPECIALS), config.vocab_size, (B, T), generator=generator)], 1)

    @torch.no_grad()
    def rollout() -> None:
        policy.eval()
        cache = DynamicCache(config=config)
        logits = policy(input_ids=distinct, **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, dim=0)  # [B, 1, V]
        for _ in range(T - 1):
            token = torch.multinomial(torch.softmax(logits[:, -1].float() / args.temperature, -1), 1)  # [B, 1]
            logits = policy(input_ids=token, **{cache_arg: cache}, use_cache=True).logits
        torch.multinomial(torch.softmax(logits[:, -1].float() / args.temperature, -1), 1)

    sampling = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature,
                                max_new_tokens=T, min_new_tokens=T, eos_token_id=pc.EOS_ID, pad_token_id=pc.PAD_ID)

    @torch.no_grad()
    def generate() -> None:
        """As rlgen's Policy.sample calls it: the distinct prompts but their last token prefilled, then repeated."""
        policy.eval()
        cache = DynamicCache(config=config)
        policy(input_ids=distinct[:, :-1], **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(G)
        policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **{cache_arg: cache},
                        generation_config=sampling)

    @torch.no_grad()
    def reference_forward() -> None:
        logits = reference(input_ids=tokens, logits_to_keep=T + 1).logits[:, :-1].float()  # [B, T, V]
        torch.log_softmax(logits, -1).gather(-1, tokens[:, P:, None])

    def update() -> None:
        policy.train()
        for _ in range(args.ppo_epochs):
            logits = policy(input_ids=tokens, logits_to_keep=T + 1).logits[:, :-1].float()  # [B, T, V]
            loss = -torch.log_softmax(logits, -1).gather(-1, tokens[:, P:, None]).sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            adam.step()
            adam.zero_grad(set_to_none=True)

    parts = {"rollout_model_passes": cpu_ms(rollout, args.steps),
             "reference_forward": cpu_ms(reference_forward, args.steps),
             "update": cpu_ms(update, args.steps)}
    floor_ms = sum(parts.values())
    hf_generate = cpu_ms(generate, args.steps)
    print(json.dumps({"impl": "floor", "model_size": args.model_size, "batch": B, "prompt_length": P,
                      "response_length": T, "ppo_epochs": args.ppo_epochs, "steps": args.steps, "threads": threads,
                      "transformers_version": transformers.__version__, "torch_version": torch.__version__,
                      "ms": {**parts, "floor": round(floor_ms, 3), "hf_generate": hf_generate},
                      "cpu_s_per_update_cycle": round(floor_ms / 1000, 4),
                      "generate_over_its_passes_ms": round(hf_generate - parts["rollout_model_passes"], 3),
                      "peak_rss_mb": pc.peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
