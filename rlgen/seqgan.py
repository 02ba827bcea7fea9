"""Stage 3, SeqGAN (Yu et al. 2017, "SeqGAN: Sequence Generative Adversarial Nets with Policy Gradient").

The generator G is the shared `Policy`; the discriminator D (`rlgen.discriminator`) is the paper's CNN over
token ids or a Hugging Face sequence classifier over text (default for real text: all-MiniLM-L6-v2). The task
(`rlgen.seqgan_tasks`: the paper's synthetic oracle or real text) supplies the data, the models, the rollouts
and the evaluation; `train_seqgan` runs the same numbered phases for either:
1. data and models: the oracle task samples its training (and held-out test) sequences from an oracle LSTM;
   the text task reads real replies of `dataset`.
2. MLE pre-training of G (oracle: Adam over the oracle data; text: the SFT stage).
3. D pre-training: `d_pretrain_rounds` x (fresh negatives, `d_pretrain_epochs` epochs over real + generated).
4. adversarial epochs: `g_steps` policy-gradient steps, each on one batch with per-token rewards
   Q(t) = mean of D over `rollout_num` Monte-Carlo completions of the prefix (eq. 4; D of the whole sequence
   at t = T) by a rollout policy (a delayed copy, theta' <- r theta' + (1 - r) theta); then `d_steps` x
   (fresh negatives, `d_epochs` epochs).
5. evaluation and save: NLL-oracle / NLL-test / own-sample NLL (oracle, `rlgen.oracle`), or the shared
   evaluator (text).
The policy-gradient maths lives in `rlgen.core`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from rlgen import core
from rlgen.config import SeqGANConfig, apply_preset, save_config
from rlgen.discriminator import discriminator, train_discriminator
from rlgen.models import default_device, set_threads
from rlgen.policy import Policy
from rlgen.seqgan_tasks import TASKS
from rlgen.tracking import MetricsWriter, prepare_output_dir

__all__ = ["SeqGANResult", "discriminator", "ema_update", "train_seqgan"]  # discriminator: the reward spec's home


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """theta' <- rate * theta' + (1 - rate) * theta (the paper's delayed rollout policy, rate 0.8)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(rate).add_(s.detach(), alpha=1.0 - rate)


@dataclass
class SeqGANResult:
    """The trained generator and discriminator and a summary of the run (timings, before/after metrics)."""

    policy: Policy
    discriminator: nn.Module
    summary: dict


def _timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def train_seqgan(cfg: SeqGANConfig, policy: Policy | None = None) -> SeqGANResult:
    """Run SeqGAN on `cfg.task`; save the generator to `cfg.output_dir` and D to `<output_dir>/discriminator`."""
    # 0. setup: preset, threads, seeds, output folder
    cfg = apply_preset(cfg)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # data, shuffles; sampling uses g_sample (g itself on the CPU)
    device = default_device()
    g_sample = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out)
    writer = MetricsWriter(out)
    total = _timer()
    summary: dict = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("report_to",)}}

    # 1. data and models (the text task leaves an unset generator to the SFT stage of phase 2)
    task = TASKS[cfg.task](cfg, out, writer, device, g, g_sample)
    policy = task.generator(policy)
    d = task.discriminator()

    # 2. MLE pre-training of the generator; the reference of the KL penalty is the MLE generator
    policy = task.pretrain(policy)
    if policy.ref_model is None and not policy.is_peft and cfg.kl_coef > 0:
        policy.ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)

    # 3. D pre-training on real vs fresh generated sequences
    opt_d = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=cfg.d_learning_rate)
    clock = _timer()
    for rnd in range(cfg.d_pretrain_rounds):
        stats = train_discriminator(d, opt_d, task.positives(cfg.d_negatives), task.negatives(policy, cfg.d_negatives),
                                    cfg.d_pretrain_epochs, cfg.batch_size, cfg.d_l2, g)
        writer.log({f"d_pretrain/{k}": v for k, v in stats.items()}, step=rnd + 1)
    summary["s_per_d_pretrain_round"] = clock() / max(cfg.d_pretrain_rounds, 1)
    print(f"[seqgan] D pre-training {cfg.d_pretrain_rounds} rounds "
          f"({summary['s_per_d_pretrain_round']:.1f} s/round)", flush=True)

    # 4. adversarial epochs: g-steps (Monte-Carlo rollout rewards, policy gradient), then d-steps
    rollout_model = policy.model  # the rollout policy G_beta: the generator itself, or a delayed copy
    if cfg.rollout_update_rate > 0:
        rollout_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params, lr=cfg.learning_rate)
    times = {"rollout": 0.0, "score": 0.0, "update": 0.0, "d_step": 0.0, "eval": 0.0}
    n_g = n_d = 0
    adv_clock = _timer()
    for epoch in range(1, cfg.max_steps + 1):
        row: dict[str, float] = {}
        for _ in range(cfg.g_steps):
            # 4a. a batch of B sequences, and N rollouts of each proper prefix by the rollout policy
            clock = _timer()
            batch = task.sample(policy, rollout_model)
            mask = batch.completion_mask  # [B, T]
            times["rollout"] += clock()
            # 4b. Q(t) = mean over the N rollouts of D, and D of the whole sequence at t = T (eq. 4)
            clock = _timer()
            scores, final = task.score(d, batch)  # [T-1, N, B], [B]
            q = core.monte_carlo_q_values(scores, final)  # [B, T]
            advantages = q - core.masked_mean(q, mask, dim=0) if cfg.baseline == "mean" else q
            if cfg.kl_coef > 0:  # per-token KL to the reference, as a penalty on the return (not in the paper)
                ref_lp = policy.ref_logprobs(batch.input_ids, batch.attention_mask, mask.shape[1], cfg.temperature,
                                             cfg.min_new_tokens)
                kl = core.kl_estimate(batch.logprobs, ref_lp, "k1")
                advantages = advantages - cfg.kl_coef * core.discounted_returns(kl, mask)
                row["objective/kl"] = float(core.masked_sum(kl, mask) / len(mask))
            times["score"] += clock()
            # 4c. the policy gradient of eq. 6 on these per-token rewards (eval mode, as PPO: no dropout noise)
            clock = _timer()
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN's LSTM backward refuses eval mode
                logprobs, _, _ = policy(batch.input_ids, batch.attention_mask, mask.shape[1],
                                        temperature=cfg.temperature, with_values=False,
                                        min_new_tokens=cfg.min_new_tokens)
            loss, stats = core.policy_gradient_loss(logprobs, advantages, mask)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt_g.step()
            if cfg.rollout_update_rate > 0:
                ema_update(rollout_model, policy.model, cfg.rollout_update_rate)
            times["update"] += clock()
            n_g += 1
            row.update({"loss/policy": float(loss.detach()), "objective/q_mean": float(core.masked_mean(q, mask)),
                        "objective/q_last": float(final.mean()), "policy/grad_norm": float(grad_norm),
                        "policy/logprob_mean": float(stats["logprob_mean"])})
        # 4d. D steps, each on fresh negatives (Algorithm 1)
        clock = _timer()
        for _ in range(cfg.d_steps):
            row.update(train_discriminator(d, opt_d, task.positives(cfg.d_negatives),
                                           task.negatives(policy, cfg.d_negatives), cfg.d_epochs, cfg.batch_size,
                                           cfg.d_l2, g))
            n_d += 1
        times["d_step"] += clock()
        # 4e. the task's evaluation of this epoch (oracle: every eval_every epochs)
        clock = _timer()
        row.update(task.evaluate(policy, d, epoch))
        times["eval"] += clock()
        row["time/adv_epoch"] = adv_clock() / epoch
        writer.log(row, step=epoch)
        print(f"[seqgan] adv epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)

    # 5. final evaluation and save
    summary["s_adv_total"] = adv_clock()
    summary["s_per_adv_epoch"] = adv_clock() / max(cfg.max_steps, 1)
    summary["s_per_g_step"] = (times["rollout"] + times["score"] + times["update"]) / max(n_g, 1)
    summary["s_per_d_step"] = times["d_step"] / max(n_d, 1)
    summary["g_step_split"] = {k: times[k] / max(n_g, 1) for k in ("rollout", "score", "update")}
    summary["s_eval_total"] = times["eval"]
    task.finish(policy, d)
    summary.update(task.summary)
    policy.save(out)
    d.save(out / "discriminator")
    summary["s_total"] = total()
    (out / "seqgan_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[seqgan] done in {summary['s_total'] / 60:.1f} min; summary in {out / 'seqgan_summary.json'}", flush=True)
    return SeqGANResult(policy, d, summary)
