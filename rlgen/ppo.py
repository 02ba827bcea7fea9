"""Stage 2, PPO: RL fine-tuning of the policy on reward functions, with a KL penalty to the reference model.

One readable loop in the style of CleanRL's ppo.py. Each update runs six numbered phases:
1. rollout (sample completions; log-probs and values come from the generation pass), 2. score (reward
functions), 3. shape (EOS penalty, KL penalty per token), 4. advantages (GAE), 5. update (PPO epochs over
mini-batches), 6. log. The maths lives in `rlgen.core`; this file only wires it together.

Defaults follow Huang et al. 2022, "The N Implementation Details of RLHF with PPO" (lm-human-preferences
and TRL's PPOTrainer where they agree):
- log-probs at the sampling temperature, taken from the generation pass itself, and dropout off (the policy
  stays in eval mode), so the first PPO ratio of every update is 1;
- a completion that ends without EOS has its score lowered by `missing_eos_penalty` (their "EOS trick");
- the KL penalty is paid on every token and the score on the last one (Ziegler et al. 2019), gamma 1, lambda 0.95;
- reward whitening off, advantage whitening on, value clipping at 0.2 with vf_coef 0.1;
- Adam eps 1e-5 and a learning rate annealed linearly to 0 over the run.

Runs in one process or in several under `accelerate launch` (DDP; gloo on CPU): each process samples its own
prompts with its own seed (seed + rank), gradients are averaged, metrics are reduced over processes, and only
the main process writes files. The frozen reference is never wrapped in DDP; sampling uses the unwrapped policy.
Several CPU processes: `accelerate launch --multi_gpu --num_processes 2` with no GPU visible (accelerate 1.15's
`--cpu --num_processes 2` starts a single process unless it is given an mpirun hostfile).

Outputs in output_dir: config.yaml, metrics.jsonl (one row per update), the policy (`Policy.save`),
ppo_curves.png (score and KL against update) and samples.md (completions before the first update and after
the last). Metrics per update, reduced over processes:
- objective/scores: mean weighted reward (before the EOS penalty); rewards/<fn>/mean: each reward function
- objective/kl: mean over samples of the summed per-token KL estimate (`kl_estimator`) to the reference
- objective/kl_coef: beta used in this update; objective/rlhf_reward: mean of sum_t shaped reward
  (penalised score - beta * KL); objective/entropy: mean of -sum_t log pi(y_t), from the rollout (as TRL)
- policy/approxkl, policy/clipfrac, val/ratio: from the PPO loss, averaged over mini-batches;
  loss/policy, loss/value: likewise; val/explained_variance: of the rollout values for the GAE returns
- completions/mean_length (tokens, EOS included), completions/eos_fraction; policy/learning_rate
- time/rollout (generation), time/score (rewards, reference log-probs, shaping, advantages), time/update
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlgen import core
from rlgen.config import (
    CommonConfig,
    LoraConfigMixin,
    RewardConfigMixin,
    SamplingConfig,
    opt,
    save_config,
    to_dict,
)
from rlgen.data import load_rows
from rlgen.errors import UserError
from rlgen.models import set_threads
from rlgen.policy import Policy, Rollout, SamplingSettings, completion_mask_from_ids
from rlgen.rewards import load_reward, reward_mean_metrics, score_rewards
from rlgen.tracking import MetricsWriter, prepare_output_dir

HUANG = "Huang et al. 2022, The N Implementation Details of RLHF with PPO"
SAMPLES_SHOWN = 4


@dataclass(frozen=True)
class PPOConfig(SamplingConfig, RewardConfigMixin, LoraConfigMixin, CommonConfig):
    """`rlgen ppo`: PPO on reward functions with a KL penalty to the starting model (full or LoRA)."""

    max_steps: int = opt(20, "number of PPO updates (each: one rollout batch, then ppo_epochs of optimisation)")
    min_new_tokens: int = opt(0, "generate at least this many tokens (EOS is blocked before)")
    batch_size: int = opt(16, "rollouts (prompts) per update and process")
    mini_batch_size: int = opt(8, "rollouts per optimiser step; batch_size must be a multiple")
    gradient_accumulation_steps: int = opt(1, "split each mini-batch into this many forward/backward passes")
    ppo_epochs: int = opt(4, "optimisation passes over each rollout batch (lm-human-preferences: 4)")
    learning_rate: float = opt(1e-5, "peak learning rate (Adam, eps 1e-5 as lm-human-preferences and CleanRL)")
    lr_scheduler_type: str = opt("linear", f"transformers schedule over the updates; linear anneals to 0 ({HUANG})")
    warmup_ratio: float = opt(0.0, "share of updates with linear warm-up")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    cliprange: float = opt(0.2, "PPO ratio clipping epsilon")
    cliprange_value: float = opt(0.2, f"value clipping around the rollout values (0: off; {HUANG}: 0.2)")
    vf_coef: float = opt(0.1, "weight of the value loss (lm-human-preferences: 0.1)")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (the initial one with adaptive_kl)")
    adaptive_kl: bool = opt(False, "adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL: target KL per completion (nats)")
    kl_horizon: float = opt(10000.0, "adaptive KL: horizon in samples")
    kl_estimator: str = opt("k1", "per-token KL estimate: k1 (log ratio, unbiased) or k3 (low variance, >= 0)")
    whiten_rewards: bool = opt(False, f"scale the shaped rewards to unit variance per batch ({HUANG}: off)")
    whiten_advantages: bool = opt(True, f"normalise advantages per batch ({HUANG}: on)")
    missing_eos_penalty: float = opt(1.0, f"subtracted from the score of completions without EOS (0: off; {HUANG})")
    stop_token: str = opt("", "truncate completions after the first occurrence of this one token, e.g. '.' "
                              "(lm-human-preferences' truncate_token; it counts as an ending); '' for off")
    target_kl: float = opt(0.0, "stop an update's epochs early once an epoch's mean approx KL exceeds this (0: off)")
    separate_critic: bool = opt(False, "a separate critic trunk instead of a value head on the policy's trunk")


def _check(cfg: PPOConfig) -> None:
    """UserError naming the first bad option."""
    from transformers import SchedulerType

    if cfg.max_steps < 1:
        raise UserError(f"max_steps must be at least 1, got {cfg.max_steps}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise UserError(f"batch_size {cfg.batch_size} is not a multiple of mini_batch_size {cfg.mini_batch_size}")
    if cfg.mini_batch_size % cfg.gradient_accumulation_steps:
        raise UserError(f"mini_batch_size {cfg.mini_batch_size} is not a multiple of gradient_accumulation_steps "
                        f"{cfg.gradient_accumulation_steps}")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise UserError(f"kl_estimator must be k1 or k3, got {cfg.kl_estimator!r}")
    if cfg.lr_scheduler_type not in [t.value for t in SchedulerType]:
        raise UserError(f"lr_scheduler_type {cfg.lr_scheduler_type!r} is not a transformers schedule "
                        f"({', '.join(t.value for t in SchedulerType)})")
    if not cfg.temperature > 0:
        raise UserError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward):
        raise UserError(f"reward_weights has {len(cfg.reward_weights)} values for {len(cfg.reward)} rewards")
    if cfg.resume_from_checkpoint is not None:
        raise UserError("ppo cannot resume its optimiser state; start a new run with --model <checkpoint folder>")


def _stop_token_id(tokenizer, stop_token: str) -> int | None:
    if not stop_token:
        return None
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"stop_token {stop_token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


def _truncate(ro: Rollout, stop_id: int | None, tokenizer) -> Rollout:
    """Cut each completion after its first `stop_id` (masks, log-probs, values and texts); no-op for None."""
    if stop_id is None:
        return ro
    cut, hit = completion_mask_from_ids(ro.completion_ids, [stop_id])
    mask = ro.completion_mask * cut  # [B, T]
    ids = ro.completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return dataclasses.replace(ro, completion_ids=ids, completion_mask=mask, logprobs=ro.logprobs * mask,
                               values=None if ro.values is None else ro.values * mask,
                               ended_with_eos=ro.ended_with_eos | hit, completions=[t.strip() for t in texts])


def _row_stream(rows: list[dict], seed: int):
    """Rows forever: each pass over the data is a fresh seeded shuffle (the same on every process)."""
    for epoch in itertools.count():
        yield from random.Random(seed + epoch).sample(rows, len(rows))


def _plot_curves(history: list[dict], path: Path) -> None:
    """ppo_curves.png: score and rlhf reward, and KL, against the update (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_reward, ax_kl = fig.subplots(1, 2)
    ax_reward.plot(steps, [row["objective/scores"] for row in history], label="objective/scores")
    ax_reward.plot(steps, [row["objective/rlhf_reward"] for row in history], label="objective/rlhf_reward")
    ax_reward.set(xlabel="update", ylabel="reward", title="reward")
    ax_reward.legend()
    ax_kl.plot(steps, [row["objective/kl"] for row in history], color="tab:red")
    ax_kl.set(xlabel="update", ylabel="nats per completion", title="KL to the reference")
    fig.savefig(path, dpi=100)


def _write_samples(path: Path, prompts: list[str], before: list[str], after: list[str], steps: int) -> None:
    lines = ["# PPO samples", "", f"The same prompts before the first update and after update {steps}.", ""]
    for i, (prompt, old, new) in enumerate(zip(prompts, before, after), 1):
        lines += [f"## {i}", "", f"**prompt:** {prompt}", "", f"**before:** {old}", "", f"**after:** {new}", ""]
    path.write_text("\n".join(lines))


def train_ppo(cfg: PPOConfig, policy: Policy | None = None) -> Policy:
    """Train `cfg.model` (or the given policy) with PPO on `cfg.reward`; save it to `cfg.output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # 0. setup: processes, seeds, output folder, rewards (fail fast), policy, optimiser, prompts
    set_threads(cfg.threads)
    _check(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(cfg.seed + rank)
    reward_fns = [load_reward(spec) for spec in cfg.reward]
    weights = cfg.reward_weights or None
    out = Path(cfg.output_dir)
    writer = None
    if is_main:
        out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        save_config(cfg, out)
        writer = MetricsWriter(out)
    with accelerator.main_process_first():  # the first process fills the demo-data and model caches alone
        rows = load_rows(cfg.dataset, "train")
        if policy is None:
            policy = Policy.from_pretrained(cfg.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
                                            separate_critic=cfg.separate_critic, reference=True, seed=cfg.seed)
    if policy.ref_model is None and not policy.is_peft:
        raise UserError("train_ppo needs a policy with a reference model (Policy(..., reference=True))")
    policy.eval()  # dropout off for sampling and training alike, so old and new log-probs agree (HUANG)
    tokenizer = policy.tokenizer
    stop_id = _stop_token_id(tokenizer, cfg.stop_token)
    sampling = SamplingSettings(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                max_prompt_length=cfg.max_prompt_length)
    params = [p for p in policy.parameters() if p.requires_grad]  # the reference's are frozen
    adam = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0, fused=True)
    # Stepped once per update; not handed to accelerate, which would step it once per process.
    scheduler = get_scheduler(cfg.lr_scheduler_type, adam, num_training_steps=cfg.max_steps,
                              num_warmup_steps=round(cfg.warmup_ratio * cfg.max_steps))
    # DDP wraps only what trains: the frozen reference is detached during prepare and put back unwrapped.
    ref_model, policy.ref_model = policy.ref_model, None
    model, optimizer = accelerator.prepare(policy, adam)
    policy.ref_model = ref_model.to(accelerator.device) if ref_model is not None else None
    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else core.FixedKLController(cfg.kl_coef))
    stream = _row_stream(rows, cfg.seed)
    micro_size = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    if cfg.report_to:
        accelerator.init_trackers("rlgen-ppo", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                       for k, v in to_dict(cfg).items()})
    history: list[dict] = []
    shown: tuple[list[str], list[str]] = ([], [])
    start = time.perf_counter()
    progress = tqdm(range(1, cfg.max_steps + 1), desc="ppo", disable=not accelerator.is_local_main_process)
    for update in progress:
        # 1. rollout: this process's share of the next batch of prompts; log-probs/values from generation
        t0 = time.perf_counter()
        batch = list(itertools.islice(stream, cfg.batch_size * world))[rank * cfg.batch_size:][:cfg.batch_size]
        ro = policy.sample([str(r["prompt"]) for r in batch], sampling)
        ro = _truncate(ro, stop_id, tokenizer)  # the reward sees the cut text
        mask = ro.completion_mask  # [B, T]
        input_ids, attention_mask, T = ro.input_ids, ro.attention_mask, mask.shape[1]  # [B, P + T]
        if update == 1:
            shown = (ro.prompts[:SAMPLES_SHOWN], ro.completions[:SAMPLES_SHOWN])
        t_rollout = time.perf_counter() - t0

        # 2. score: reward functions get the dataset's other columns as keyword lists (TRL's convention);
        #    one that raises or returns anything but one finite number per completion raises RewardError
        t0 = time.perf_counter()
        columns = {k: [r.get(k) for r in batch] for k in batch[0] if k not in ("prompt", "completion")}
        totals, per_fn = score_rewards(reward_fns, ro.prompts, ro.completions, weights, **columns)
        raw_scores = torch.tensor(totals, dtype=torch.float32, device=mask.device)  # [B]

        # 3. shape: EOS penalty (HUANG), then per-token rewards = score at the last token - beta * KL
        scores = raw_scores - cfg.missing_eos_penalty * (~ro.ended_with_eos).float()
        ref_logprobs = policy.ref_logprobs(input_ids, attention_mask, T, cfg.temperature)  # [B, T]
        rewards, kl = core.shape_rewards(scores, ro.logprobs, ref_logprobs, mask, kl_ctl.value, cfg.kl_estimator)
        rlhf_reward = rewards.sum(1)  # [B], before any whitening
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)  # scale only, keeps the sign (TRL)

        # 4. advantages: GAE over real tokens (gamma 1, lambda 0.95), whitened per batch (HUANG)
        advantages, returns = core.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)  # [B, T] each
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        t_score = time.perf_counter() - t0

        # 5. update: ppo_epochs passes over shuffled mini-batches, each split into accumulation micro-batches
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        stats: dict[str, list[torch.Tensor]] = {"approxkl": [], "clipfrac": [], "ratio": [], "pg": [], "vf": []}
        for _epoch in range(cfg.ppo_epochs):
            epoch_kl = []
            for mini in torch.randperm(cfg.batch_size).split(cfg.mini_batch_size):
                for idx in mini.split(micro_size):
                    with accelerator.accumulate(model):
                        logprobs, values, _ = model(input_ids[idx], attention_mask[idx], T, cfg.temperature)
                        pg_loss, pg_stats = core.ppo_policy_loss(logprobs, ro.logprobs[idx], advantages[idx],
                                                                 mask[idx], cfg.cliprange)
                        vf_loss, _ = core.ppo_value_loss(values, ro.values[idx], returns[idx], mask[idx],
                                                         cfg.cliprange_value or None)
                        accelerator.backward(pg_loss + cfg.vf_coef * vf_loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                    for key, value in (("approxkl", pg_stats["approxkl"]), ("clipfrac", pg_stats["clipfrac"]),
                                       ("ratio", pg_stats["ratio_mean"]), ("pg", pg_loss.detach()),
                                       ("vf", vf_loss.detach())):
                        stats[key].append(value)
                    epoch_kl.append(pg_stats["approxkl"])
            # Early stop (CleanRL's target_kl), decided on the KL averaged over processes so all stop together.
            if cfg.target_kl > 0 and accelerator.reduce(torch.stack(epoch_kl).mean(), "mean") > cfg.target_kl:
                break
        scheduler.step()
        t_update = time.perf_counter() - t0

        # 6. log: per-process means reduced over processes; reward values gathered exactly
        local = {
            "objective/scores": raw_scores.mean(),
            "objective/kl": kl.sum(1).mean(),
            "objective/rlhf_reward": rlhf_reward.mean(),
            "objective/entropy": -(ro.logprobs * mask).sum(1).mean(),
            "policy/approxkl": torch.stack(stats["approxkl"]).mean(),
            "policy/clipfrac": torch.stack(stats["clipfrac"]).mean(),
            "loss/policy": torch.stack(stats["pg"]).mean(),
            "loss/value": torch.stack(stats["vf"]).mean(),
            "val/ratio": torch.stack(stats["ratio"]).mean(),
            "val/explained_variance": core.explained_variance(ro.values, returns, mask),
            "completions/mean_length": mask.sum(1).float().mean(),
            "completions/eos_fraction": ro.ended_with_eos.float().mean(),
            "time/rollout": torch.tensor(t_rollout),
            "time/score": torch.tensor(t_score),
            "time/update": torch.tensor(t_update),
        }
        reduced = accelerator.reduce(torch.stack([v.float().to(accelerator.device) for v in local.values()]), "mean")
        row = dict(zip(local, reduced.tolist()))
        row["objective/kl_coef"] = kl_ctl.value
        row["policy/learning_rate"] = lr
        all_values: dict[str, list] = {}
        for part in gather_object([per_fn]):
            for name, values in part.items():
                all_values.setdefault(name, []).extend(values)
        row.update(reward_mean_metrics(all_values))
        kl_ctl.update(row["objective/kl"], cfg.batch_size * world)
        if is_main:
            writer.log(row, step=update)
            history.append({"step": update, **row})
        accelerator.log(row, step=update)
        progress.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
        if cfg.save_steps and update % cfg.save_steps == 0 and update < cfg.max_steps and is_main:
            policy.save(out / f"checkpoint-{update}")

    # Save the policy, the curves and before/after samples (main process only). The Adam moments (twice the
    # trainable weights) are freed first, so this end-of-run work does not raise the peak memory.
    adam.state.clear()
    accelerator.wait_for_everyone()
    if is_main:
        policy.save(out)
        _plot_curves(history, out / "ppo_curves.png")
        after = _truncate(policy.sample(shown[0], sampling, with_values=False), stop_id, tokenizer).completions
        _write_samples(out / "samples.md", shown[0], shown[1], after, cfg.max_steps)
        print(f"[rlgen] ppo: {cfg.max_steps} updates in {time.perf_counter() - start:.0f}s; model saved to {out}")
    accelerator.end_training()
    return policy
