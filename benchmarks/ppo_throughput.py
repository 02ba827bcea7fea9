"""rlgen's PPO on exactly the work of ../shared/bench/peer_trl_ppo.py (TRL 1.12 PPOTrainer), for a side-by-side ratio.

The work comes from the peer's own `peer_common.py` (imported from --peer-dir): the same word-level tokenizer,
Llama shapes and seeds (policy seed, value seed + 1, reward seed + 2), the same equal-length prompts and the
same reward model (a randomly initialised LlamaForSequenceClassification, one logit), and the same flags.
Like the peer: full fine-tuning, fixed-length responses (min_new_tokens = max_new_tokens, so no EOS), one
mini-batch per epoch, `--ppo-epochs` passes, a fixed KL coefficient `--beta`, `--threads` threads. Precision:
`--dtype` (default float32, as the peer; bfloat16 loads the policy, reference and reward model in bf16 while the
peer stays fp32). Device: the first GPU when there is one (as `train_ppo`), with the peer's reward model moved there.

Differences, by design of rlgen's PPO: values come from a value head on the policy's trunk, read off the
generation pass (the peer trains a separate value model and runs it again after generation), and the rollout
log-probs also come from generation (the peer runs a second policy forward). The reward model is called through
rlgen's reward protocol: it scores `prompt + " " + completion` re-tokenised with the peer's word-level tokenizer
(the peer scores the token ids directly; the texts round-trip except for special tokens the random policy
may sample, which decoding drops).

Other estimators (`--preset grpo`, `rloo`, ...; issue 31): the preset's estimator settings (advantage, policy loss,
loss aggregation, where the KL goes) with the peer's shape flags winning (`--ppo-epochs`, `--beta`,
`--num-generations`), so that it runs the work of ../shared/bench/peer_trl_grpo.py; `--reward rule` scores with
the peer's rule reward (`peer_common.target_fraction` of the completion ids, as peer_trl_grpo.py) instead of its
reward model, and the rule's default with a preset. benchmarks/grpo_speed.py times both side by side.

Prints one JSON line like the peer's, with peak CUDA memory (`peak_cuda_mb`) beside peak RSS on a GPU.
`s_per_update` is the whole `train_ppo` call (set-up, the updates, and at the end sampling the "after"
completions, plotting the curves and saving the model, none of which the peer does) divided by the updates;
`s_per_update_loop` counts only the update phases (the span of the peer's train()) and `s_per_update_steady` is
their median without the first update; `s_per_update_cycle` and `cpu_s_per_update_cycle` time whole update cycles
from one reward call to the next (as the peer's callback times its updates, step end to step end: logging and
all), in wall and process CPU seconds; `peak_rss_mb_training` is the peak RSS at the last reward call (the
training's, without what the call does after its last update). `split_s` sums the phases.
Library imports happen before the timer, as the peer's happen before trainer.train(), except matplotlib's.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peer_parser(description: str):
    """The peer's work definition, imported from --peer-dir (it also sets the offline environment variables), and
    a parser with its shape flags (`common_args`) and --peer-dir. -> (peer_common, parser)"""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--peer-dir", default=str(REPO.parent / "shared" / "bench"))
    peer_dir = pre.parse_known_args()[0].peer_dir
    sys.path.insert(0, str(Path(peer_dir).resolve()))
    import peer_common

    parser = peer_common.common_args(description)
    parser.add_argument("--peer-dir", default=peer_dir, help="folder with peer_common.py (default ../shared/bench)")
    return peer_common, parser


class PeerRewardModel:
    """The peer's reward model behind rlgen's reward protocol: one logit for `prompt + " " + completion`."""

    __name__ = "peer_reward_model"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.seconds = model.eval(), tokenizer, 0.0
        self.calls: list[tuple[float, float, float]] = []  # stamp() at each call: one a rollout

    def __call__(self, prompts, completions, **kwargs):
        import torch

        start = time.perf_counter()
        self.calls.append(stamp(start))
        texts = [f"{p} {c}" for p, c in zip(prompts, completions)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        with torch.inference_mode():
            scores = self.model(**enc).logits[:, 0].float().tolist()
        self.seconds += time.perf_counter() - start
        return scores


class PeerRuleReward:
    """peer_trl_grpo.py's reward: the peer's rule (share of target word ids) of each completion's token ids."""

    __name__ = "peer_rule_reward"

    def __init__(self, rule):
        self.rule, self.seconds = rule, 0.0
        self.calls: list[tuple[float, float, float]] = []  # stamp() at each call: one a rollout

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        start = time.perf_counter()
        self.calls.append(stamp(start))
        scores = [self.rule(ids) for ids in completion_ids]
        self.seconds += time.perf_counter() - start
        return scores


def stamp(wall: float) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, peak RSS in MB so far) at a reward call."""
    return wall, time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cycles(calls: list[tuple[float, float, float]]) -> dict:
    """Whole update cycles, timed as the peer's callback times its updates (end to end, logging and all): the
    median wall and process CPU seconds between consecutive reward calls (one per rollout; DAPO's dynamic sampling
    may call more often); and the peak RSS at the last call, i.e. while training, before anything the training
    call does after its last update."""
    if len(calls) < 2:
        return {"s_per_update_cycle": None, "cpu_s_per_update_cycle": None, "peak_rss_mb_training": None}
    wall = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
    cpu = [b[1] - a[1] for a, b in zip(calls, calls[1:])]
    return {"s_per_update_cycle": round(statistics.median(wall), 4),
            "cpu_s_per_update_cycle": round(statistics.median(cpu), 4),
            "peak_rss_mb_training": round(calls[-1][2], 1)}


def main() -> None:
    pc, parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float16", "float32"],
                        help="rlgen's precision (the peer runs fp32)")
    parser.add_argument("--rollout-engine", default="hf", choices=["hf", "vllm"],
                        help="what samples the rollouts (vllm: colocated, weights synced after every update)")
    parser.add_argument("--preset", default="ppo", help="rlgen's estimator preset (rlgen.config.RL_PRESETS)")
    parser.add_argument("--num-generations", type=int, default=None,
                        help="completions per prompt (default: the preset's; must divide --batch)")
    parser.add_argument("--reward", default=None, choices=["model", "rule"],
                        help="the peer's reward model (peer_trl_ppo.py's work; default for ppo) or its rule reward "
                             "(peer_trl_grpo.py's work; default for the other presets)")
    args = parser.parse_args()
    args.reward = args.reward or ("model" if args.preset == "ppo" else "rule")
    threads = pc.set_threads(args.threads)

    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from rlgen.config import PPOConfig
    from rlgen.config.stages import RL_PRESETS
    from rlgen.files import read_jsonl
    from rlgen.models import default_device, resolve_dtype
    from rlgen.policy import Policy
    from rlgen.ppo import train_ppo

    t0 = time.perf_counter()
    device, dtype = default_device(), resolve_dtype(args.dtype)
    tokenizer = pc.build_tokenizer(pc.SIZES[args.model_size]["vocab"], seed=args.seed)
    # The peer's build_models less its value model: the same config and seeds give the same weights.
    config = pc.llama_config(args.model_size)
    transformers.set_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).float().to(dtype)
    if args.preset not in RL_PRESETS:
        parser.error(f"--preset {args.preset!r} is not one of {', '.join(RL_PRESETS)}")
    reward_model = None
    if args.reward == "model":
        transformers.set_seed(args.seed + 2)
        reward_model = transformers.LlamaForSequenceClassification(config).float().to(device, dtype)
    os.makedirs(args.workdir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlgen-ppo-", dir=args.workdir))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n"
                               for t in pc.prompt_texts(tokenizer, args.num_prompts, args.prompt_length, args.seed)))
    policy = Policy(model, tokenizer)  # the reference is a frozen copy, as the peer's ref_model=None
    # train_ppo loads rewards from specs (module:attribute), so the reward object is put on this module.
    reward = sys.modules[__name__].peer_reward = (PeerRewardModel(reward_model, tokenizer) if reward_model is not None
                                                  else PeerRuleReward(pc.target_fraction))
    # The preset's estimator settings, the peer's flags over them (a preset fills only defaults, and --beta 0.05
    # is kl_coef's default, so they are passed as explicit fields with no preset).
    estimator = {**RL_PRESETS[args.preset], "ppo_epochs": args.ppo_epochs, "kl_coef": args.beta}
    if args.num_generations is not None:
        estimator["num_generations"] = args.num_generations
    cfg = PPOConfig(model="peer", output_dir=str(work / "out"), dataset=str(prompts), max_steps=args.steps,
                    reward=[f"{__name__}:peer_reward"], **estimator,
                    seed=args.seed, threads=args.threads, batch_size=args.batch, mini_batch_size=args.batch,
                    learning_rate=args.lr, adaptive_kl=False,
                    temperature=args.temperature, max_new_tokens=args.response_length,
                    min_new_tokens=args.response_length, missing_eos_penalty=0.0,
                    max_prompt_length=args.prompt_length, dtype=args.dtype, rollout_engine=args.rollout_engine)

    # Imports are paid before the timer, as the peer pays them before trainer.train(). Only matplotlib, for
    # ppo_curves.png at the end, is left to train_ppo (~0.5 s timed; importing it here would add ~30 MB to
    # the peak RSS during training).
    import tqdm.auto  # noqa: F401
    from transformers import get_scheduler  # noqa: F401

    init_s = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line, as the peer's
        train_ppo(cfg, policy)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1

    rows = read_jsonl(work / "out" / "metrics.jsonl")
    per_update = [r["time/rollout"] + r["time/score"] + r["time/update"] + r.get("time/weight_sync", 0.0) for r in rows]
    gen_tokens = args.steps * args.batch * args.response_length
    split = {"generation": sum(r["time/rollout"] for r in rows),
             "reward_forward": reward.seconds,
             "reference_forward_and_shaping": sum(r["time/score"] for r in rows) - reward.seconds,
             "value_forward": 0.0,
             "update": sum(r["time/update"] for r in rows),
             "weight_sync": sum(r.get("time/weight_sync", 0.0) for r in rows)}
    print(json.dumps({
        "impl": f"rlgen-{args.preset}",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model_size": args.model_size,
        "params_policy": pc.n_params(model),
        "batch": args.batch,
        "response_length": args.response_length,
        "prompt_length": args.prompt_length,
        "ppo_epochs": args.ppo_epochs,
        "num_generations": cfg.num_generations,
        "beta": cfg.kl_coef,
        "steps": len(rows),
        "threads": threads,
        "init_s": round(init_s, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "s_per_update": round(wall / len(rows), 4),
        "s_per_update_loop": round(sum(per_update) / len(rows), 4),
        "s_per_update_steady": round(statistics.median(per_update[1:]), 4) if len(rows) > 1 else None,
        **cycles(reward.calls),
        "gen_tokens": gen_tokens,
        "tokens_per_s": round(gen_tokens / wall, 2),
        "peak_rss_mb": pc.peak_rss_mb(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rollout_engine": args.rollout_engine,
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "settings": {"beta": args.beta, "lr": args.lr, "temperature": args.temperature, "seed": args.seed,
                     "num_prompts": args.num_prompts,
                     "value": "shared-trunk head, from generation" if cfg.advantage == "gae" else "none",
                     "advantage": cfg.advantage, "policy_loss": cfg.policy_loss, "loss_agg": cfg.loss_agg,
                     "kl_in": cfg.kl_in, "kl_estimator": cfg.kl_estimator,
                     "reward": ("peer reward model via the reward protocol (re-tokenised text)" if reward_model
                                is not None else "peer rule reward (target_fraction of completion_ids)")},
        "split_s": {k: round(v, 3) for k, v in split.items()},
    }), flush=True)


if __name__ == "__main__":
    main()
