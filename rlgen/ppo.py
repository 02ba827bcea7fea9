"""Stage 2, the RL loop: PPO (the default) or any estimator of `rlgen.estimators` on reward functions, with a KL
penalty to the reference model.

One readable loop in the style of CleanRL's ppo.py. Each update runs seven numbered phases:
1. rollout (sample `num_generations` completions per prompt; log-probs and values come from the generation pass),
2. score (reward functions; DAPO's dynamic sampling samples more rounds), 3. shape (EOS penalty, overlong
punishment, KL penalty per token when the KL is in the reward), 4. advantages (`advantage`: GAE, GRPO, Dr.GRPO,
RLOO, REINFORCE++), 5. update (`policy_loss` epochs over mini-batches, aggregated over the global mini-batch, plus
the KL when it is in the loss), 6. log, 7. checkpoint. `preset` names a paper's settings (README, "Estimators").
Only `gae` trains a value head (or critic); the others build none. The maths lives in `rlgen.core` and
`rlgen.estimators`, the checkpoint format in `rlgen.checkpoint`; this file only wires them together.

Defaults follow Huang et al. 2022, "The N Implementation Details of RLHF with PPO" (lm-human-preferences
and TRL's PPOTrainer where they agree):
- log-probs at the sampling temperature, taken from the generation pass itself, and dropout off (the policy
  stays in eval mode), so the first PPO ratio of every update is 1;
- a completion that ends without EOS has its score lowered by `missing_eos_penalty` (their "EOS trick");
- the KL penalty is paid on every token and the score on the last one (Ziegler et al. 2019), gamma 1, lambda 0.95;
- reward whitening off, advantage whitening on, value clipping at 0.2 with vf_coef 0.1;
- Adam eps 1e-5 and a learning rate annealed linearly to 0 over the run.

`rollout_engine vllm` samples with vLLM colocated in each process (`rlgen.engines`): the trainer's forward then
gives the log-probs and values, the engine's log-probs weight each token by a truncated importance ratio
(`vllm_importance_sampling_cap`), and the updated weights go into the engine after every update but the last
(the final samples come from `generate`).

Runs in one process or in several under `accelerate launch` (DDP; gloo on CPU): each process samples its own
prompts with its own seed (seed + rank), gradients are averaged, metrics are reduced over processes, and only
the main process writes files. The frozen reference is never wrapped in DDP; sampling uses the unwrapped policy.
Several CPU processes: `accelerate launch --multi_gpu --num_processes 2` with no GPU visible (accelerate 1.15's
`--cpu --num_processes 2` starts a single process unless it is given an mpirun hostfile).
With `fsdp full_shard` (any launcher, e.g. `torchrun`) the policy, critic and reference are sharded with torch
FSDP2 instead of wrapped in DDP (`rlgen.distributed`): the optimiser holds each process's shards, gradients are
reduce-scattered and clipped by their global norm, sampling gathers the whole policy for the rollout, checkpoints
hold DCP shards (resumable at another world size), and rank 0 gathers the final model into an ordinary folder.

Outputs in output_dir: config.yaml, metrics.jsonl (one row per update, and one per evaluation along training:
`eval_steps`), the policy (`Policy.save`),
ppo_curves.png (score and KL against update) and samples.md (completions before the first update and after
the last), and `checkpoint-<update>/` folders (every `save_steps` updates and after the last; the newest
`save_total_limit` are kept) from which `--resume_from_checkpoint PATH|latest` continues the run exactly:
same weights, optimiser and scheduler state, KL coefficient, RNG states, next prompts and metrics history.

Surviving trouble: SIGINT/SIGTERM finishes the current update, writes a checkpoint and raises
TrainingInterrupted (the CLI exits 130/143 with the resume command). A non-finite reward, loss or gradient
norm raises NonFiniteError naming the update and quantity, leaving the last good checkpoint as it was (none is
written of the bad state), or with `skip_nonfinite` skips the batch (counted in `policy/skipped_batches`).
A reward function that fails raises RewardError in phase 2, before anything of that update is written.
Every option, reward, data and model check runs before the output folder is touched.

Metrics per update, reduced over processes:
- objective/scores: mean weighted reward (before the EOS penalty); rewards/<fn>/mean: each reward function
  (with dynamic sampling: of the completions trained on)
- objective/kl: mean over samples of the summed per-token KL estimate (`kl_estimator`) to the reference
- objective/kl_coef: beta used in this update; objective/rlhf_reward: mean of sum_t shaped reward
  (penalised score - beta * KL); objective/entropy: mean of -sum_t log pi(y_t), from the rollout (as TRL)
- policy/approxkl, policy/clipfrac, val/ratio: from the PPO loss, averaged over mini-batches;
  loss/policy, loss/value: likewise; val/explained_variance: of the rollout values for the GAE returns
- completions/mean_length (tokens, EOS included), completions/eos_fraction; policy/learning_rate
- time/rollout (generation), time/score (rewards, reference log-probs, shaping, advantages), time/update
- policy/skipped_batches (only with skip_nonfinite): mini-batches of this update whose optimiser step was
  skipped (all of them when the reward was non-finite)
- with `rollout_engine vllm` (`rlgen.engines`): rollout/logprob_diff_mean, rollout/logprob_diff_max (|trainer
  - engine| log-prob of the sampled tokens; the max per process, averaged over processes),
  rollout/truncated_fraction (share of tokens whose importance ratio exceeded `vllm_importance_sampling_cap`),
  time/weight_sync (pushing the updated weights into the engine)
Without a critic (every advantage but gae) loss/value and val/explained_variance are not logged. With
num_generations > 1: policy/zero_std_groups (groups sampled whose scores were all equal) and policy/dropped_groups
(those left out by dynamic sampling), counts over processes; loss/kl with the KL in the loss; completions/sampled
(rows sampled in all rounds and processes) with dynamic sampling.
- with an adversarial reward (`adversarial(...)`, `rlgen.adversarial`): its discriminator trains after the policy's
  update every `d_every` updates, on that batch's (real, policy) replies; those rows add loss/discriminator,
  val/d_accuracy (on the fresh pairs, before training on them), val/d_accuracy_train, val/d_real_score,
  val/d_fake_score, val/d_reward_std and time/d_update. `d_warmup` D updates on the starting policy's replies come
  before the first update (a row at step 0: the last one's D metrics and completions/mean_length); D's state is in
  every checkpoint (discriminator.pt) and D is saved in output_dir/discriminator/
Every `eval_steps` updates, after the update's row, a row of the shared evaluator's eval/* metrics on the current
policy (`rlgen.evaluation.Evaluator.along_training`, the random streams untouched) and completions/generated.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch

from rlgen import adversarial, core, distributed, engines, estimators
from rlgen.checkpoint import (
    SHARDED_DIR,
    NonFiniteError,
    StopSignals,
    TrainingInterrupted,
    check_resume_config,
    find_checkpoint,
    load_sharded_training_state,
    load_training_state,
    preserved_rng,
    remove_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_sharded_training_state,
    save_training_state,
    stage_sharded,
    write_atomically,
)
from rlgen.config import PPOConfig, SamplingConfig, lora_kwargs, save_config, to_dict
from rlgen.data import load_rows
from rlgen.errors import UserError
from rlgen.evaluation import Evaluator
from rlgen.files import write_jsonl
from rlgen.models import resolve_dtype, set_threads
from rlgen.policy import Policy, Rollout, completion_mask_from_ids
from rlgen.rewards import load_reward, reward_columns, reward_mean_metrics, score_rewards
from rlgen.text import prompt_of
from rlgen.tracking import (
    MetricsWriter,
    check_output_dir,
    jsonable_row,
    leaves_output_dir_as_found,
    prepare_output_dir,
)

SAMPLES_SHOWN = 4


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

    history = [row for row in history if "objective/scores" in row]  # the update rows, not the evaluations
    steps = [row["step"] for row in history]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_reward, ax_kl = fig.subplots(1, 2)
    ax_reward.plot(steps, [float(row["objective/scores"]) for row in history], label="objective/scores")
    ax_reward.plot(steps, [float(row["objective/rlhf_reward"]) for row in history], label="objective/rlhf_reward")
    ax_reward.set(xlabel="update", ylabel="reward", title="reward")
    ax_reward.legend()
    ax_kl.plot(steps, [float(row["objective/kl"]) for row in history], color="tab:red")
    ax_kl.set(xlabel="update", ylabel="nats per completion", title="KL to the reference")
    fig.savefig(path, dpi=100)


def _write_samples(path: Path, prompts: list, before: list[str], after: list[str], steps: int) -> None:
    lines = ["# PPO samples", "", f"The same prompts before the first update and after update {steps}.", ""]
    for i, (prompt, old, new) in enumerate(zip(prompts, before, after), 1):
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt)  # messages as JSON, as the report shows them
        lines += [f"## {i}", "", f"**prompt:** {shown}", "", f"**before:** {old}", "", f"**after:** {new}", ""]
    path.write_text("\n".join(lines))


def _shaped_scores(cfg: PPOConfig, ro: Rollout, raw: torch.Tensor) -> torch.Tensor:
    """[B] scores the advantages see: minus `missing_eos_penalty` for a completion without EOS (HUANG), plus DAPO's
    soft overlong punishment (Yu et al. 2025, eq. 13; TRL's `get_soft_overlong_punishment`) times
    `overlong_penalty` when `overlong_buffer` is set."""
    scores = raw - cfg.missing_eos_penalty * (~ro.ended_with_eos).float()
    if cfg.overlong_buffer:
        from trl.rewards import get_soft_overlong_punishment

        punish = get_soft_overlong_punishment(cfg.max_new_tokens, cfg.overlong_buffer)(ro.completion_id_lists)
        scores = scores + cfg.overlong_penalty * torch.tensor(punish, dtype=scores.dtype, device=scores.device)
    return scores


def _equal_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] scores -> [B / group_size] bool: the groups (consecutive rows) whose scores are all equal, which a group
    baseline gives no signal (DAPO's dynamic sampling drops them); none for groups of one."""
    groups = scores.view(-1, group_size)
    if group_size == 1:
        return torch.zeros(groups.shape[0], dtype=torch.bool, device=scores.device)
    return groups.max(1).values == groups.min(1).values


def _all_have(accelerator, count: int, needed: int) -> bool:
    """Whether every process has at least `needed` (so that all sample another round, or none does)."""
    short = torch.tensor(float(count < needed), device=accelerator.device)
    if accelerator.num_processes > 1:
        short = accelerator.reduce(short, "sum")
    return not short.item()


def _rows(ro: Rollout, idx: list[int]) -> Rollout:
    """The rollout's rows `idx`, in that order."""
    take = torch.tensor(idx, dtype=torch.long, device=ro.completion_ids.device)

    def pick(x):
        return None if x is None else x[take]

    return Rollout(pick(ro.prompt_ids), pick(ro.prompt_mask), pick(ro.completion_ids), pick(ro.completion_mask),
                   pick(ro.logprobs), pick(ro.values), pick(ro.ended_with_eos), [ro.prompts[i] for i in idx],
                   [ro.completions[i] for i in idx], pick(ro.engine_logprobs))


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of several rounds as one: prompts left-padded and completions right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def cat(name: str, width: int, left: bool, value):
        xs = [getattr(p, name) for p in parts]
        if xs[0] is None:
            return None
        pad = [(width - x.shape[1], 0) if left else (0, width - x.shape[1]) for x in xs]
        return torch.cat([torch.nn.functional.pad(x, w, value=value) for x, w in zip(xs, pad)])

    return Rollout(cat("prompt_ids", P, True, pad_id), cat("prompt_mask", P, True, 0),
                   cat("completion_ids", T, False, pad_id), cat("completion_mask", T, False, 0),
                   cat("logprobs", T, False, 0.0), cat("values", T, False, 0.0),
                   torch.cat([p.ended_with_eos for p in parts]), [x for p in parts for x in p.prompts],
                   [x for p in parts for x in p.completions], cat("engine_logprobs", T, False, 0.0))


def _select_groups(rounds: list, cfg: PPOConfig, needed: int, pad_id: int, world: int):
    """The batch to train on from the rounds of (rollout, raw scores, scores, per-reward values): with dynamic
    sampling the first `needed` groups whose scores differ, filled up with equal ones if the rounds ran out (DAPO,
    Yu et al. 2025, sec. 3.2); else the one round as it is. Returns (rollout, raw scores, scores, per-reward values,
    group metrics: policy/zero_std_groups over the sampled groups, policy/dropped_groups left out, as counts over
    processes once the loop's mean over processes has reduced them)."""
    n = cfg.num_generations
    equal = [_equal_groups(scores, n) for _, _, scores, _ in rounds]
    zero_std = sum(int(e.sum()) for e in equal)
    if cfg.dynamic_sampling:
        varied = [(r, g) for r, e in enumerate(equal) for g in range(len(e)) if not e[g]]
        flat = [(r, g) for r, e in enumerate(equal) for g in range(len(e)) if e[g]]
        chosen = (varied + flat)[:needed]
        dropped = sum(1 for pick in flat if pick not in chosen)
    else:
        chosen, dropped = [(0, g) for g in range(needed)], 0
    stats = {"policy/zero_std_groups": torch.tensor(float(zero_std * world)),
             "policy/dropped_groups": torch.tensor(float(dropped * world))}
    if len(rounds) == 1 and chosen == [(0, g) for g in range(needed)]:
        ro, raw, scores, per_fn = rounds[0]
        return ro, raw, scores, per_fn, stats
    parts, raws, scored, per_fn = [], [], [], {}
    for r, (ro, raw, scores, values) in enumerate(rounds):
        idx = [g * n + i for rr, g in chosen if rr == r for i in range(n)]
        if not idx:
            continue
        parts.append(_rows(ro, idx))
        raws.append(raw[idx])
        scored.append(scores[idx])
        for name, vals in values.items():
            per_fn.setdefault(name, []).extend(vals[i] for i in idx)
    return _concat(parts, pad_id), torch.cat(raws), torch.cat(scored), per_fn, stats


def _check_context(cfg: PPOConfig, policy: Policy) -> None:
    """Prompts are cut from the left to max_prompt_length; prompt + completion must fit the model's context."""
    context = getattr(policy.base_config, "max_position_embeddings", None)
    if context and cfg.max_prompt_length + cfg.max_new_tokens > context:
        raise UserError(f"max_prompt_length {cfg.max_prompt_length} + max_new_tokens {cfg.max_new_tokens} exceeds "
                        f"the model's context of {context} tokens; lower one of them")


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Mean of scalar tensors; NaN when every mini-batch was skipped."""
    return torch.stack(values).mean() if values else torch.tensor(float("nan"))


def _fault(accelerator, flags: dict[str, bool]) -> str | None:
    """The first quantity flagged non-finite on any process (all processes agree, so they stop or skip together)."""
    state = torch.tensor([float(bad) for bad in flags.values()], device=accelerator.device)
    if accelerator.num_processes > 1:
        state = accelerator.reduce(state, "sum")
    return next((name for name, bad in zip(flags, state.tolist()) if bad), None)


def _nonfinite_error(update: int, quantity: str, last_checkpoint: Path | None) -> NonFiniteError:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return NonFiniteError(f"update {update}: non-finite {quantity}; stopped without saving this update ({kept}); "
                          "pass --skip_nonfinite true to skip such batches instead")


def _stop_signal(accelerator, stop: StopSignals) -> int | None:
    """The stop signal any process received (so every process stops after the same update)."""
    signum = torch.tensor(float(stop.signum or 0), device=accelerator.device)
    if accelerator.num_processes > 1:
        signum = accelerator.reduce(signum, "max")
    return int(signum.item()) or None


def _short(x: float) -> str:
    """`x` to 3 decimals for the progress bar, without the sign of a value that rounds to 0 (`-0.000`)."""
    return f"{x if round(x, 3) else 0.0:.3f}"


def _save_checkpoint(accelerator, cfg: PPOConfig, out: Path, update: int, policy: Policy, optimizer, scheduler,
                     state: dict, adv: adversarial.AdversarialReward | None = None) -> Path:
    """`out/checkpoint-<update>`, written atomically by the main process with every process's RNG state (sharded:
    every process first writes its shards to a staging folder, which the main process moves in)."""
    from accelerate.utils import gather_object

    rng_states = gather_object([rng_state()])  # rank order
    staged = stage_sharded(out, update, policy, optimizer) if cfg.fsdp else None

    def write(tmp: Path) -> None:
        if staged:
            save_sharded_training_state(tmp, staged, scheduler, state, rng_states)
        else:
            save_training_state(tmp, policy, optimizer, scheduler, state, rng_states)
        if adv is not None:
            adv.save_state(tmp)
        save_config(cfg, tmp)

    path = out / f"checkpoint-{update}"
    if accelerator.is_main_process:
        write_atomically(out, update, write, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return path


@leaves_output_dir_as_found()
def train_ppo(cfg: PPOConfig, policy: Policy | None = None) -> Policy:
    """Train `cfg.model` (or the given policy) with PPO on `cfg.reward` (specs or callables, weighted by
    `cfg.reward_weights`); save it to `cfg.output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # 0. setup: checks first (nothing is written until the options, rewards, data and model are known to be
    #    good), then processes, seeds, rewards, prompts, policy, output folder, optimiser, and resume
    set_threads(cfg.threads)
    distributed.refuse_unsharded_launch("ppo")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"ppo does not run under accelerate's {accelerator.distributed_type.value} plugin: shard with "
                        "--fsdp full_shard (torch FSDP2) under torchrun or `accelerate launch` with a DDP config")
    if cfg.fsdp and policy is not None:
        raise UserError("fsdp: give the model by name (cfg.model): the final folder is rebuilt from it on rank 0")
    own_group = bool(cfg.fsdp) and distributed.ensure_process_group(accelerator.device)
    resume = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir) if cfg.resume_from_checkpoint else None
    if resume is not None:
        check_resume_config(resume, cfg)
    # Resuming may write into the checkpoint's own run folder; any other non-empty folder needs overwriting.
    in_place = resume is not None and resume.resolve().parent == Path(cfg.output_dir).resolve()
    out = check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming=in_place)
    set_seed(cfg.seed + rank)
    has_critic = estimators.needs_critic(cfg.advantage)  # gae: a value head (or critic) trains beside the policy
    prompts_per_process = cfg.batch_size // cfg.num_generations  # groups of num_generations rows, never split
    reward_fns = [load_reward(spec) for spec in cfg.reward]
    adv = adversarial.find_adversarial(reward_fns)  # a discriminator that trains alongside (rlgen.adversarial)
    weights = cfg.reward_weights or None  # one per reward: PPOConfig checked that
    with accelerator.main_process_first():  # the first process fills the demo-data and model caches alone
        rows = load_rows(cfg.dataset, "train")
        with preserved_rng():  # loading the evaluation's rewards (a reward model) must not move training's streams
            evaluator = Evaluator(cfg.eval_config()) if cfg.eval_steps else None
        if evaluator is not None:  # it scores with the training discriminator as it is, not a fresh one
            evaluator.reward_fns = adversarial.share_live(evaluator.reward_fns, adv)
        if policy is None:
            policy = Policy.from_pretrained(cfg.model, **lora_kwargs(cfg), separate_critic=cfg.separate_critic,
                                            dtype=torch.float32 if cfg.fsdp else resolve_dtype(cfg.dtype),
                                            reference=True, seed=cfg.seed, value_head=has_critic)
    if not has_critic:  # no value head to train, store or shard (memory, time)
        policy.value_head = None
    if policy.ref_model is None and not policy.is_peft:
        raise UserError("train_ppo needs a policy with a reference model (Policy(..., reference=True))")
    _check_context(cfg, policy)
    tokenizer = policy.tokenizer
    stop_id = _stop_token_id(tokenizer, cfg.stop_token)
    writer = None
    if is_main:
        out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming=in_place)
        remove_stale_temporaries(out)
        if not in_place:  # a fresh folder (over an old run only with --overwrite_output_dir)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            remove_checkpoints(out)
        save_config(cfg, out)
        writer = MetricsWriter(out)
    accelerator.wait_for_everyone()
    policy.eval()  # dropout off for sampling and training alike, so old and new log-probs agree (HUANG)
    sampling = SamplingConfig.of(cfg)
    if cfg.fsdp:  # before the optimiser, which must hold the shards; float32 master weights (module docstring)
        distributed.shard_policy(policy, accelerator.device, resolve_dtype(cfg.dtype))
        print(f"[rlgen] ppo: FSDP2 full_shard, {distributed.shard_summary(policy)}", flush=True)
    params = [p for p in policy.parameters() if p.requires_grad]  # the reference's are frozen
    adam = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0, fused=True)
    # Stepped once per update; not handed to accelerate, which would step it once per process.
    scheduler = get_scheduler(cfg.lr_scheduler_type, adam, num_training_steps=cfg.max_steps,
                              num_warmup_steps=round(cfg.warmup_ratio * cfg.max_steps))
    if cfg.fsdp:  # FSDP2 reduces the gradients itself; accelerate only counts the accumulation steps
        model, optimizer = policy, adam
    else:  # DDP wraps only what trains: the frozen reference is detached during prepare and put back unwrapped.
        ref_model, policy.ref_model = policy.ref_model, None
        model, optimizer = accelerator.prepare(policy, adam)
        policy.ref_model = ref_model.to(accelerator.device) if ref_model is not None else None
    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else core.FixedKLController(cfg.kl_coef))
    micro_size = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    # Statistics over the global batch (whitening, loss denominators): summed over processes (None in one).
    all_sum = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None
    # accelerate divides each micro-batch's loss by the accumulation steps, DDP and FSDP average gradients over
    # processes: scaled back, the gradient is the sum of the global mini-batch's loss terms
    grad_scale = world * cfg.gradient_accumulation_steps
    if cfg.report_to:
        accelerator.init_trackers("rlgen-ppo", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                       for k, v in to_dict(cfg).items()})
    history: list[dict] = []
    shown: tuple[list[str], list[str]] = ([], [])
    done, consumed = 0, 0  # updates finished; prompts taken from the stream (all processes)
    last_checkpoint = resume
    if resume is not None:  # last, so that nothing draws random numbers after the RNG states are restored
        written_sharded = (resume / SHARDED_DIR).is_dir()
        if written_sharded != bool(cfg.fsdp):
            how = "with" if written_sharded else "without"
            raise UserError(f"checkpoint {resume} was written {how} --fsdp full_shard; resume it {how} it")
        if cfg.fsdp:  # any world size: DCP reshards on load
            state = load_sharded_training_state(resume, policy, adam, scheduler, rank, world)
        else:
            state = load_training_state(resume, policy, adam, scheduler, rank)
            if state["world_size"] != world:
                raise UserError(f"checkpoint {resume} was written by {state['world_size']} processes; "
                                f"resume it with the same number (this run has {world})")
        kl_ctl.load_state_dict(state["kl_ctl"])
        if adv is not None:
            adv.load_state(resume)
        done, consumed, history = state["update"], state["rows_consumed"], state["history"]
        shown = (state["shown"][0], state["shown"][1])
        if is_main:  # one row per update: drop rows a killed run logged after this checkpoint
            write_jsonl(out / "metrics.jsonl", history)
            print(f"[rlgen] ppo: resumed from {resume} (update {done} of {cfg.max_steps})", flush=True)
    engines.start(policy, cfg)  # after resuming: the engine starts from the restored weights
    is_cap = cfg.vllm_importance_sampling_cap
    if is_cap == -1:  # auto: engine and trainer agree to ~5e-5 in float32 (README, "Rollout engines")
        is_cap = 0.0 if engines.engine_dtype(policy) == torch.float32 else 2.0
    stream = _row_stream(rows, cfg.seed)
    collections.deque(itertools.islice(stream, consumed), maxlen=0)  # the data position: skip used prompts
    if adv is not None and done == 0 and adv.d_warmup:  # GAD's warm-up: D first learns the starting policy's replies
        lengths = []
        for _ in range(adv.d_warmup):
            batch = list(itertools.islice(stream, cfg.batch_size * world))[rank * cfg.batch_size:][:cfg.batch_size]
            consumed += cfg.batch_size * world
            ro = _truncate(policy.sample([prompt_of(r) for r in batch], sampling, with_values=False), stop_id, tokenizer)
            d_row = adv.update(ro.prompts, ro.completions, reward_columns(batch))
            lengths.append(ro.completion_mask.sum(1).float().mean().cpu())
        # a row at step 0: the last warm-up update's D metrics and the warm-up replies' mean length
        warm = {**d_row, "completions/mean_length": float(torch.stack(lengths).mean())}
        reduced = accelerator.reduce(torch.tensor(list(warm.values()), device=accelerator.device), "mean")
        row = dict(zip(warm, reduced.tolist()))
        if is_main:
            writer.log(row, step=0)
            print(f"[rlgen] ppo: discriminator warm-up, {adv.d_warmup} updates; accuracy on the last fresh pairs "
                  f"{row['val/d_accuracy']:.3f}", flush=True)
        history.append(jsonable_row({"step": 0, **row}))
    start = time.perf_counter()
    progress = tqdm(range(done + 1, cfg.max_steps + 1), initial=done, total=cfg.max_steps, desc=cfg.preset or "ppo",
                    disable=not accelerator.is_local_main_process)
    with StopSignals() as stop:
        for update in progress:
            # 1. rollout and 2. score: this process's batch_size / num_generations prompts of the next batch, each
            #    sampled num_generations times (a group: consecutive rows); log-probs/values from generation. Reward
            #    functions get completion_ids and the dataset's other columns as keyword lists (TRL's convention); one
            #    that raises or returns anything but one finite number per completion raises RewardError. Dynamic
            #    sampling (DAPO) drops groups whose scores are all equal and samples more prompts, in rounds that
            #    every process takes together, until every process has batch_size rows.
            rounds, t_rollout, t_score = [], 0.0, 0.0
            for _round in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
                t0 = time.perf_counter()
                batch = list(itertools.islice(stream, prompts_per_process * world))[
                    rank * prompts_per_process:][:prompts_per_process]
                consumed += prompts_per_process * world
                batch = [row for row in batch for _ in range(cfg.num_generations)]
                part = policy.sample([prompt_of(r) for r in batch], sampling, with_values=has_critic,
                                     group_size=cfg.num_generations)
                part = _truncate(part, stop_id, tokenizer)  # the reward sees the cut text
                t_rollout += time.perf_counter() - t0
                t0 = time.perf_counter()
                columns = {**reward_columns(batch), "completion_ids": part.completion_id_lists}
                totals, per_fn = score_rewards(reward_fns, part.prompts, part.completions, weights, columns)
                raw = torch.tensor(totals, dtype=torch.float32, device=part.completion_mask.device)  # [B]
                rounds.append((part, raw, _shaped_scores(cfg, part, raw), per_fn))
                t_score += time.perf_counter() - t0
                if not cfg.dynamic_sampling or _all_have(accelerator, sum(
                        int((~_equal_groups(r[2], cfg.num_generations)).sum()) for r in rounds), prompts_per_process):
                    break
            ro, raw_scores, scores, per_fn, group_stats = _select_groups(rounds, cfg, prompts_per_process,
                                                                         tokenizer.pad_token_id, world)
            mask = ro.completion_mask  # [B, T]
            input_ids, attention_mask, T = ro.input_ids, ro.attention_mask, mask.shape[1]  # [B, P + T]
            if update == 1:
                shown = (ro.prompts[:SAMPLES_SHOWN], ro.completions[:SAMPLES_SHOWN])

            # 3. shape: EOS penalty (HUANG) and overlong punishment (DAPO, in _shaped_scores), then per-token rewards
            #    = score at the last token - beta * KL (kl_in reward; kl_in loss: the KL goes into the loss, phase 5).
            #    A non-finite score (e.g. beyond float32) or shaped reward stops the run, or skips this batch.
            t0 = time.perf_counter()
            ref_logprobs = policy.ref_logprobs(input_ids, attention_mask, T, cfg.temperature, cfg.min_new_tokens)
            reward_beta = kl_ctl.value if cfg.kl_in == "reward" else 0.0
            rewards, kl = core.shape_rewards(scores, ro.logprobs, ref_logprobs, mask, reward_beta, cfg.kl_estimator)
            rlhf_reward = rewards.sum(1)  # [B], before any whitening
            if cfg.whiten_rewards:  # scale only, keeps the sign (TRL); over all processes
                rewards = core.masked_whiten(rewards, mask, shift_mean=False, reduce=all_sum)
            fault = _fault(accelerator, {"reward": not torch.isfinite(scores).all(),
                                         "KL-shaped reward": not torch.isfinite(rewards).all()})
            if fault and not cfg.skip_nonfinite:
                raise _nonfinite_error(update, fault, last_checkpoint)

            # 4. advantages: `advantage` (rlgen.estimators; gae: gamma 1, lambda 0.95, whitened over the global
            #    batch, HUANG); an engine's samples are weighted by truncated importance ratios trainer/engine
            #    (Yao et al. 2025)
            advantages, returns, _ = estimators.ADVANTAGES[cfg.advantage](
                rewards, rewards.sum(1), ro.values, mask, group_size=cfg.num_generations, gamma=cfg.gamma,
                lam=cfg.lam, reduce=all_sum)  # [B, T] each (returns None without a critic)
            if cfg.advantage == "gae" and cfg.whiten_advantages:
                advantages = core.masked_whiten(advantages, mask, reduce=all_sum)
            is_weights, is_stats = (core.truncated_importance_weights(ro.logprobs, ro.engine_logprobs, mask, is_cap)
                                    if ro.engine_logprobs is not None else (None, {}))
            t_score += time.perf_counter() - t0

            # 5. update: ppo_epochs passes over shuffled mini-batches, each split into accumulation micro-batches.
            #    Losses are aggregated over the global mini-batch (`loss_agg`: its tokens or sequences on every
            #    process, `estimators.loss_denominator`), scaled so that accelerate's division by the accumulation
            #    steps and DDP's or FSDP's average over processes leave the sum over all of them: 2 processes x
            #    batch 4 train as 1 x batch 8. A mini-batch with a non-finite loss or gradient norm stops the run,
            #    or is skipped.
            t0 = time.perf_counter()
            if cfg.gradient_checkpointing:
                policy.checkpoint_in_eval()
            lr = scheduler.get_last_lr()[0]
            stats: dict[str, list[torch.Tensor]] = {key: [] for key in ("approxkl", "clipfrac", "ratio", "pg", "vf",
                                                                        "kl_loss")}
            skipped = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size) if fault else 0
            for _epoch in range(0 if fault else cfg.ppo_epochs):
                epoch_kl = []
                for mini in torch.randperm(cfg.batch_size).split(cfg.mini_batch_size):
                    loss_finite = True
                    # the global mini-batch's tokens or sequences (Dr.GRPO's constant: max_new_tokens per sequence)
                    denominator = estimators.loss_denominator(mask[mini], cfg.loss_agg, cfg.max_new_tokens)
                    denominator = all_sum(denominator) if all_sum else denominator
                    tokens = mask[mini].sum().to(torch.float32)
                    tokens = all_sum(tokens) if all_sum else tokens
                    mini_stats: dict[str, torch.Tensor] = {}
                    for idx in mini.split(micro_size):
                        with accelerator.accumulate(model):
                            logprobs, values, _ = model(input_ids[idx], attention_mask[idx], T, cfg.temperature,
                                                         with_values=has_critic, min_new_tokens=cfg.min_new_tokens)
                            pg_loss, pg_stats = estimators.POLICY_LOSSES[cfg.policy_loss](
                                logprobs, ro.logprobs[idx], advantages[idx], mask[idx], clip_low=cfg.clip_low,
                                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, loss_agg=cfg.loss_agg,
                                denominator=denominator,
                                weights=is_weights[idx] if is_weights is not None else None)
                            # this micro-batch's share of the global mini-batch's tokens: weights its token means
                            share = mask[idx].sum().to(torch.float32) / tokens
                            loss, parts = pg_loss, {"pg": pg_loss.detach()}
                            if has_critic:
                                vf_loss, _ = core.ppo_value_loss(values, ro.values[idx], returns[idx], mask[idx],
                                                                 cfg.cliprange_value or None)
                                loss = loss + cfg.vf_coef * vf_loss * share
                                parts["vf"] = vf_loss.detach() * share
                            if cfg.kl_in == "loss" and cfg.kl_coef > 0:
                                kl_loss, _ = estimators.kl_loss(logprobs, ref_logprobs[idx], mask[idx],
                                                                cfg.kl_estimator, cfg.loss_agg, denominator)
                                loss = loss + cfg.kl_coef * kl_loss
                                parts["kl_loss"] = kl_loss.detach()
                            if grad_scale != 1:
                                loss = loss * grad_scale
                            loss_finite = loss_finite and bool(torch.isfinite(loss))
                            accelerator.backward(loss)
                            # step and zero only on the accumulation's last micro-batch (accelerate's optimiser
                            # wrapper does so itself; the sharded run's plain AdamW does not)
                            step = accelerator.sync_gradients
                            if accelerator.sync_gradients:
                                grad_norm = (distributed.clip_grad_norm(params, cfg.max_grad_norm) if cfg.fsdp
                                             else accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                                bad = _fault(accelerator, {"loss": not loss_finite,
                                                           "gradient norm": not torch.isfinite(grad_norm)})
                                if bad and not cfg.skip_nonfinite:
                                    raise _nonfinite_error(update, bad, last_checkpoint)
                                step, skipped = not bad, skipped + bool(bad)
                            if step:
                                optimizer.step()
                            if accelerator.sync_gradients:
                                optimizer.zero_grad()
                        if torch.isfinite(loss):
                            parts.update(approxkl=pg_stats["approxkl"] * share, clipfrac=pg_stats["clipfrac"] * share,
                                         ratio=pg_stats["ratio_mean"] * share)
                            for key, value in parts.items():  # summed over the micro-batches of this process
                                mini_stats[key] = mini_stats[key] + value if key in mini_stats else value
                    for key, value in mini_stats.items():  # x world: the mean over processes is then their sum
                        stats[key].append(value * world if world > 1 else value)
                    if "approxkl" in mini_stats:
                        epoch_kl.append(mini_stats["approxkl"] * world if world > 1 else mini_stats["approxkl"])
                # Early stop (CleanRL's target_kl), decided on the KL averaged over processes so all stop together.
                if cfg.target_kl > 0 and accelerator.reduce(_mean(epoch_kl).to(accelerator.device), "mean") > cfg.target_kl:
                    break
            scheduler.step()
            t_update = time.perf_counter() - t0
            # 5b. discriminator (an adversarial reward): trained on this batch's (real, policy) replies
            d_row = (adv.update(ro.prompts, ro.completions)
                     if adv is not None and update % adv.d_every == 0 else {})
            # the next rollout's weights; none follows the last update (the final samples come from generate)
            t_sync = policy.engine.sync(policy) if policy.engine is not None and update < cfg.max_steps else None

            # 6. log: per-process means reduced over processes; reward values gathered exactly
            local = {
                "objective/scores": raw_scores.mean(),
                "objective/kl": kl.sum(1).mean(),
                "objective/rlhf_reward": rlhf_reward.mean(),
                "objective/entropy": -(ro.logprobs * mask).sum(1).mean(),
                "policy/approxkl": _mean(stats["approxkl"]),
                "policy/clipfrac": _mean(stats["clipfrac"]),
                "loss/policy": _mean(stats["pg"]),
                "val/ratio": _mean(stats["ratio"]),
                "completions/mean_length": mask.sum(1).float().mean(),
                "completions/eos_fraction": ro.ended_with_eos.float().mean(),
                "time/rollout": torch.tensor(t_rollout),
                "time/score": torch.tensor(t_score),
                "time/update": torch.tensor(t_update),
            }
            if has_critic:
                local["loss/value"] = _mean(stats["vf"])
                local["val/explained_variance"] = core.explained_variance(ro.values, returns, mask)
            if cfg.kl_in == "loss" and cfg.kl_coef > 0:
                local["loss/kl"] = _mean(stats["kl_loss"])
            if cfg.num_generations > 1:
                local.update(group_stats)
            if cfg.dynamic_sampling:  # completions generated this update, all processes and rounds
                local["completions/sampled"] = torch.tensor(float(len(rounds) * cfg.batch_size * world))
            if cfg.skip_nonfinite:
                local["policy/skipped_batches"] = torch.tensor(float(skipped))
            local.update({k: torch.tensor(v) for k, v in d_row.items()})
            if is_stats:
                local.update({f"rollout/{k}": v for k, v in is_stats.items()})
                if t_sync is not None:
                    local["time/weight_sync"] = torch.tensor(t_sync)
            reduced = accelerator.reduce(torch.stack([v.float().to(accelerator.device) for v in local.values()]),
                                         "mean")
            row = dict(zip(local, reduced.tolist()))
            row["objective/kl_coef"] = kl_ctl.value
            row["policy/learning_rate"] = lr
            all_values: dict[str, list] = {}
            for part in gather_object([per_fn]):
                for name, values in part.items():
                    all_values.setdefault(name, []).extend(values)
            row.update(reward_mean_metrics(all_values))
            if math.isfinite(row["objective/kl"]):
                kl_ctl.update(row["objective/kl"], cfg.batch_size * world)
            if is_main:
                writer.log(row, step=update)
            history.append(jsonable_row({"step": update, **row}))
            accelerator.log(row, step=update)
            progress.set_postfix(score=_short(row["objective/scores"]), kl=_short(row["objective/kl"]))
            if is_main and evaluator and update % cfg.eval_steps == 0:  # before the checkpoint, which keeps its row
                row = evaluator.along_training(policy, update, update * cfg.batch_size * world)
                writer.log(row, step=update)
                history.append(jsonable_row({"step": update, **row}))
                accelerator.log(row, step=update)

            # 7. checkpoint: every save_steps updates, after the last, and when SIGINT/SIGTERM arrived
            signum = _stop_signal(accelerator, stop)
            if (cfg.save_steps and update % cfg.save_steps == 0) or update == cfg.max_steps or signum:
                state = {"update": update, "rows_consumed": consumed, "world_size": world,
                         "kl_ctl": kl_ctl.state_dict(), "history": history, "shown": list(shown)}
                last_checkpoint = _save_checkpoint(accelerator, cfg, out, update, policy, adam, scheduler, state, adv)
            if signum and update < cfg.max_steps:
                # this update is done: the bar counts it, as the message does. Set, not incremented: iterating, tqdm
                # writes its count only at redraws (mininterval), so the bar's own count may lag by one
                progress.n = update
                progress.refresh()
                progress.close()
                raise TrainingInterrupted(signum, update, last_checkpoint.resolve())

    train_s = time.perf_counter() - start  # what the progress bar spans: this run's updates and evaluations
    # Save the policy, the curves and before/after samples (main process only). The Adam moments (twice the
    # trainable weights) are freed first, so this end-of-run work does not raise the peak memory.
    adam.state.clear()
    accelerator.wait_for_everyone()
    # The final samples come from generate: the engine was not synced after the last update. It is closed only
    # after the sharded gather below (closing vLLM unregisters the process group that FSDP2's gather needs).
    with_engine, engine = policy, policy.engine
    policy.engine = None
    if is_main or cfg.fsdp:  # sharded, every process takes part (generation gathers the weights)
        after = _truncate(policy.sample(shown[0], sampling, with_values=False), stop_id, tokenizer).completions
    if cfg.fsdp:  # rank 0 gathers the weights into an ordinary policy for the final folder
        policy = distributed.unsharded_copy(policy, lambda: Policy.from_pretrained(
            cfg.model, **lora_kwargs(cfg), separate_critic=cfg.separate_critic, reference=False, seed=cfg.seed,
            value_head=has_critic)) or policy
    if is_main:
        policy.save(out)
        if adv is not None:
            adv.save(out / "discriminator")
        _plot_curves(history, out / "ppo_curves.png")
        _write_samples(out / "samples.md", shown[0], shown[1], after, cfg.max_steps)
        print(f"[rlgen] ppo: {cfg.max_steps - done} updates in {train_s:.0f}s, then {time.perf_counter() - start - train_s:.0f}s "
              f"saving and sampling; model saved to {out}")
    with_engine.engine = engine
    engines.stop(with_engine)
    # Drop the DDP wrapper while the process group is still registered, and give gloo's worker thread a moment
    # to release its last work (it needs the GIL): destroying the group as the last reference to it goes
    # away can otherwise deadlock a process at exit (seen with 2 CPU processes, torch 2.13).
    accelerator.free_memory()
    del model, optimizer
    if world > 1:
        time.sleep(0.2)
    accelerator.end_training()
    if own_group and torch.distributed.is_initialized():  # accelerate's end_training may have destroyed it
        torch.distributed.destroy_process_group()
    return policy
