"""Stage 3, SeqGAN (Yu et al. 2017, "SeqGAN: Sequence Generative Adversarial Nets with Policy Gradient").

The generator G is the shared `Policy`; the discriminator D (`rlgen.discriminator`) is the paper's CNN over
token ids or a Hugging Face sequence classifier over text (default for real text: all-MiniLM-L6-v2). The task
(`rlgen.seqgan_tasks`: the paper's synthetic oracle or real text) supplies the data, the models, the rollouts
and the evaluation; `train_seqgan` runs the same numbered phases for either:
1. data and models: the oracle task samples its training (and held-out test) sequences from an oracle LSTM;
   the text task reads real replies of `dataset`.
2. MLE pre-training of G (oracle: Adam over the oracle data; text: the SFT stage); then checkpoint-0.
3. D pre-training: `d_pretrain_rounds` x (fresh negatives, `d_pretrain_epochs` epochs over real + generated);
   then checkpoint-0 again.
4. adversarial epochs: `g_steps` policy-gradient steps, each on one batch with per-token rewards
   Q(t) = mean of D over `rollout_num` Monte-Carlo completions of the prefix (eq. 4; D of the whole sequence
   at t = T) by a rollout policy (a delayed copy, theta' <- r theta' + (1 - r) theta); then `d_steps` x
   (fresh negatives, `d_epochs` epochs); checkpoint-<epoch> every `save_steps` epochs and after the last.
   `reward_transform` picks the reward (`advantages`): seqgan (Q itself), maligan (D/(1-D) of the whole sequence
   normalised over the batch, minus its mean, on every token; no rollouts), dense (ScratchGAN: returns of
   2 Q(t) - 1 discounted by `dense_gamma`, minus a moving-average baseline). ScratchGAN's D scores every prefix
   itself; D here scores whole sequences, so the Monte-Carlo Q of each prefix stands in for its D_t.
5. evaluation and save: NLL-oracle / NLL-test / own-sample NLL (oracle, `rlgen.oracle`), or the shared
   evaluator (text).
The policy-gradient maths lives in `rlgen.core`.

Checkpoints use PPO's format and helpers (`rlgen.checkpoint`: atomic folders with a completion marker, the
newest `save_total_limit` kept). Besides the generator (a usable model folder), `optimizer.pt`,
`trainer_state.json` and `rng_state_0.pth`, a SeqGAN checkpoint holds `discriminator/` (a usable D folder),
`optimizer_d.pt`, the rollout policy (`rollout_model.safetensors`, when it is a delayed copy), the reference
this run made from the MLE generator (`reference_model.safetensors`), and in `trainer_state.json` the phase
and counters, the task's state, the states of the private generators and the metrics history.
`resume_from_checkpoint` restores all of it and skips the finished phases, so a resumed run equals one that
was never stopped; it also resumes on another device (optimiser states keep this run's device flags).
SIGINT/SIGTERM is acknowledged on stderr at once, finishes the current unit of work (the MLE phase, a D
pre-training round, an adversarial epoch), writes a checkpoint and raises TrainingInterrupted. Each phase shows
a tqdm progress bar.
Runs in one process: the Monte-Carlo rollouts and the D training are not distributed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rlgen import adversarial, core
from rlgen.checkpoint import (
    STATE_FILE,
    StopSignals,
    TrainingInterrupted,
    check_resume_config,
    find_checkpoint,
    load_optimizer_state,
    load_training_state,
    remove_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_training_state,
    write_atomically,
)
from rlgen.config import SeqGANConfig, apply_preset, save_config, to_dict
from rlgen.discriminator import discriminator, load_discriminator, real_logit, train_discriminator
from rlgen.errors import UserError
from rlgen.files import read_jsonl, write_json, write_jsonl
from rlgen.models import default_device, set_threads
from rlgen.policy import Policy
from rlgen.seqgan_tasks import TASKS
from rlgen.tracking import MetricsWriter, check_output_dir, leaves_output_dir_as_found, prepare_output_dir

__all__ = ["SeqGANResult", "discriminator", "ema_update", "train_seqgan"]  # discriminator: the reward spec's home

D_OPTIMIZER_FILE = "optimizer_d.pt"
ROLLOUT_FILE = "rollout_model.safetensors"
REFERENCE_FILE = "reference_model.safetensors"


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """theta' <- rate * theta' + (1 - rate) * theta (the paper's delayed rollout policy, rate 0.8)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(rate).add_(s.detach(), alpha=1.0 - rate)


def ema_baseline_advantages(returns: torch.Tensor, mask: torch.Tensor, baseline: float,
                            decay: float) -> tuple[torch.Tensor, float]:
    """ScratchGAN's REINFORCE baseline (deepmind-research `scratchgan/losses.py`, `reinforce_loss`): the moving
    average b' = decay * b + (1 - decay) * mean(returns over real tokens), updated first, then returns - b'.
    returns, mask [B, T] -> (advantages [B, T], 0 at masked positions; b')."""
    new = decay * baseline + (1.0 - decay) * float(core.masked_mean(returns, mask))
    return (returns - new) * mask, new


@dataclass
class SeqGANResult:
    """The trained generator and discriminator and a summary of the run (timings, before/after metrics)."""

    policy: Policy
    discriminator: nn.Module
    summary: dict


@dataclass
class _Parts:
    """What a checkpoint saves and restores besides the trainer state: models, optimisers, private generators."""

    policy: Policy
    reference: nn.Module | None  # the reference this run made (a copy of the MLE generator); None: it came with G
    rollout_model: nn.Module  # the rollout policy: a delayed copy, or the generator itself (policy.model)
    d: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generators: list[torch.Generator]  # g (data, shuffles), and g_sample when it is another device's


@dataclass
class _Progress:
    """Where the run stands: the phase finished last (2: MLE, 3: D pre-training, 4: once an adversarial epoch
    ended), the units of work done, and the seconds spent (summed over resumed runs)."""

    phase: int = 2
    d_pretrain_rounds: int = 0
    epoch: int = 0
    g_steps: int = 0
    d_steps: int = 0
    dense_baseline: float = 0.0  # reward_transform dense: the moving-average baseline (ScratchGAN starts at 0)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(
        ("d_pretrain", "adv", "rollout", "score", "update", "d_step", "eval"), 0.0))


# What the oracle task never reads besides the options marked for the other task: it makes its own data and trains
# the paper's LSTM in full with fixed-length sequences.
ORACLE_UNUSED = ("dataset", "max_new_tokens", "min_new_tokens", "max_prompt_length", "lora_r", "lora_alpha",
                 "lora_dropout", "lora_target_modules")


def applicable_settings(cfg: SeqGANConfig) -> dict:
    """The run's options its task reads (as config.yaml records them): the other task's options (their help says
    "oracle task:", or "text task:"/"text D:"/"cnn:") and, for the oracle, ORACLE_UNUSED are left out."""
    other = ("text task:", "text D:", *ORACLE_UNUSED) if cfg.task == "oracle" else ("oracle task:", "cnn:")
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)}
    return {k: v for k, v in to_dict(cfg).items()
            if k != "report_to" and k not in other and not helps[k].startswith(other)}


def result_line(summary: dict) -> str:
    """The run's result in words: the oracle's NLL-oracle after MLE and after SeqGAN, and the change (lower is
    better); the text task's discriminator accuracy on held-out replies; "" when neither was measured."""
    mle, adv = summary.get("mle", {}).get("eval/nll_oracle"), summary.get("adv", {}).get("eval/nll_oracle")
    if mle is not None and adv is not None:
        return (f"NLL-oracle after MLE {mle:.3f} -> after SeqGAN {adv:.3f} (change {adv - mle:+.3f}; lower is "
                "better)")
    accuracy = summary.get("adv", {}).get("eval/d_accuracy")
    return f"discriminator accuracy on held-out replies {accuracy:.3f}" if accuracy is not None else ""


def _timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def _check_one_process() -> None:
    """UserError under a multi-process launch (accelerate/torchrun set WORLD_SIZE, as `rlgen sft` reads it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError(f"seqgan runs in one process (its Monte-Carlo rollouts and discriminator training are not "
                        f"distributed), but was launched with {world} (WORLD_SIZE={world}): run it without "
                        "accelerate launch, or with --num_processes 1")


def _required(folder: Path, name: str) -> Path:
    """folder / name, a file that only runs with some options write; UserError when it is missing."""
    path = folder / name
    if not path.exists():
        raise UserError(f"resume_from_checkpoint: {folder} has no {name}; it was written by a run with other "
                        "options (kl_coef, rollout_update_rate): resume with the options of that run")
    return path


def _save_checkpoint(cfg: SeqGANConfig, out: Path, epoch: int, parts: _Parts, progress: _Progress, task) -> Path:
    """`out/checkpoint-<epoch>`, written atomically (PPO's layout plus D, its optimiser, rollout and reference)."""
    from safetensors.torch import save_model

    state = {"progress": dataclasses.asdict(progress), "task": task.state_dict(),
             "generators": [gen.get_state().tolist() for gen in parts.generators],
             "history": read_jsonl(out / "metrics.jsonl", missing_ok=True)}

    def write(tmp: Path) -> None:
        save_training_state(tmp, parts.policy, parts.opt_g, None, state, [rng_state()])
        parts.d.save(tmp / "discriminator")
        torch.save(parts.opt_d.state_dict(), tmp / D_OPTIMIZER_FILE)
        if parts.rollout_model is not parts.policy.model:
            save_model(parts.rollout_model, str(tmp / ROLLOUT_FILE))  # save_model: tied weights are fine
        if parts.reference is not None:
            save_model(parts.reference, str(tmp / REFERENCE_FILE))
        save_config(cfg, tmp)

    return write_atomically(out, epoch, write, cfg.save_total_limit).resolve()


def _load_checkpoint(folder: Path, parts: _Parts, task, out: Path) -> _Progress:
    """Restore `parts`, the task's state and `out/metrics.jsonl` (rows a killed run logged after the checkpoint
    go); the generator, its optimiser and the RNG states last, so nothing draws random numbers after them."""
    from safetensors.torch import load_model

    state = json.loads((folder / STATE_FILE).read_text())
    if "progress" not in state:
        raise UserError(f"resume_from_checkpoint: {folder} is not a seqgan checkpoint")
    try:
        parts.d.load_state_dict(load_discriminator(folder / "discriminator").state_dict())
        load_optimizer_state(parts.opt_d, folder / D_OPTIMIZER_FILE)  # capturable as this run's device wants
        if parts.rollout_model is not parts.policy.model:
            load_model(parts.rollout_model, str(_required(folder, ROLLOUT_FILE)))
        if parts.reference is not None:
            load_model(parts.reference, str(_required(folder, REFERENCE_FILE)))
        task.load_state_dict(state["task"])
        write_jsonl(out / "metrics.jsonl", state["history"])
        load_training_state(folder, parts.policy, parts.opt_g, None, rank=0)
    except (RuntimeError, ValueError) as e:  # shapes or parameter groups that differ: other model options
        raise UserError(f"resume_from_checkpoint: {folder} does not fit this run's models "
                        f"({str(e).strip().splitlines()[0]}); resume with the options of the run that wrote it") from e
    for gen, saved in zip(parts.generators, state["generators"]):
        gen.set_state(torch.tensor(saved, dtype=torch.uint8))
    return _Progress(**state["progress"])


@leaves_output_dir_as_found()
def train_seqgan(cfg: SeqGANConfig, policy: Policy | None = None) -> SeqGANResult:
    """Run SeqGAN on `cfg.task`; save the generator to `cfg.output_dir` and D to `<output_dir>/discriminator`."""
    # 0. setup: checks first (nothing is written before they pass), then preset, threads, seeds, output folder
    cfg = apply_preset(cfg)
    _check_one_process()
    resume = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir) if cfg.resume_from_checkpoint else None
    if resume is not None:
        check_resume_config(resume, cfg)
    # Resuming may write into the checkpoint's own run folder; any other non-empty folder needs overwriting.
    in_place = resume is not None and resume.resolve().parent == Path(cfg.output_dir).resolve()
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming=in_place)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # data, shuffles; sampling uses g_sample (g itself on the CPU)
    device = default_device()
    g_sample = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming=in_place)
    remove_stale_temporaries(out)
    if not in_place:  # a fresh folder (over an old run only with --overwrite_output_dir)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        remove_checkpoints(out)
    save_config(cfg, out)
    writer = MetricsWriter(out)
    total = _timer()
    summary: dict = {"settings": applicable_settings(cfg)}

    # 1. data and models (the text task leaves an unset generator to the SFT stage of phase 2, unless resuming)
    task = TASKS[cfg.task](cfg, out, writer, device, g, g_sample)
    policy = task.generator(policy, resuming=resume is not None)
    d = task.discriminator()

    # the first signal is acknowledged at once (a unit of work can take minutes), then acted on after that unit
    with StopSignals(notice="finishing the MLE phase, D pre-training round or adversarial epoch under way, then "
                            "saving a checkpoint") as stop:
        # 2. MLE pre-training of the generator (a resumed run has it in its checkpoint). The reference of the KL
        #    penalty is the MLE generator, and so is the rollout policy G_beta at first (or G itself, rate 0).
        #    Under LoRA the model with its adapter disabled is that generator only while MLE has not trained the
        #    adapter (mle_steps 0); else the reference is a frozen copy with the MLE adapter merged.
        if resume is None:
            policy = task.pretrain(policy)
        policy.model.eval()  # dropout off for sampling and the policy gradient alike (as PPO)
        reference = None
        if policy.ref_model is None and cfg.kl_coef > 0 and (not policy.is_peft or cfg.mle_steps > 0):
            reference = copy.deepcopy(policy.model)
            if policy.is_peft:
                reference = reference.merge_and_unload()
            policy.ref_model = reference = reference.eval().requires_grad_(False)
        rollout_model = policy.model
        if cfg.rollout_update_rate > 0:
            rollout_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
        params = [p for p in policy.model.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=cfg.learning_rate)
        # capturable: Adam's step counter lives on the GPU, so D's train step can run as one CUDA graph
        opt_d = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=cfg.d_learning_rate,
                                 capturable=device.type == "cuda")
        parts = _Parts(policy, reference, rollout_model, d, opt_g, opt_d, [g] if g_sample is g else [g, g_sample])
        if resume is None:
            progress = _Progress()
            signum = stop.signum
            checkpoint = _save_checkpoint(cfg, out, 0, parts, progress, task)
            if signum:
                raise TrainingInterrupted(signum, 0, checkpoint, "MLE pre-training")
        else:
            progress = _load_checkpoint(resume, parts, task, out)
            print(f"[seqgan] resumed from {resume} (phase {progress.phase} done, {progress.d_pretrain_rounds} D "
                  f"pre-training rounds, {progress.epoch} adversarial epochs)", flush=True)

        # 3. D pre-training on real vs fresh generated sequences (the rounds a resumed run has not done), then
        #    checkpoint-0 again; a signal stops it after the round under way
        if progress.phase == 2:
            signum = None
            bar = tqdm(total=cfg.d_pretrain_rounds, initial=progress.d_pretrain_rounds, desc="seqgan D pre-training",
                       unit="round")
            for rnd in range(progress.d_pretrain_rounds + 1, cfg.d_pretrain_rounds + 1):
                clock = _timer()
                stats = train_discriminator(d, opt_d, task.positives(cfg.d_negatives),
                                            task.negatives(policy, cfg.d_negatives), cfg.d_pretrain_epochs,
                                            cfg.batch_size, cfg.d_l2, g)
                writer.log({f"d_pretrain/{k}": v for k, v in stats.items()}, step=rnd)
                progress.d_pretrain_rounds = rnd
                progress.seconds["d_pretrain"] += clock()
                bar.set_postfix(loss=f"{stats['loss/d']:.3f}", accuracy=f"{stats['val/d_accuracy_train']:.3f}",
                                refresh=False)
                bar.update()
                signum = stop.signum  # read once: a signal arriving after this is handled after the next unit
                if signum:
                    break
            bar.close()
            if progress.d_pretrain_rounds == cfg.d_pretrain_rounds:
                progress.phase = 3
                print(f"[seqgan] D pre-training {cfg.d_pretrain_rounds} rounds "
                      f"({progress.seconds['d_pretrain'] / max(cfg.d_pretrain_rounds, 1):.1f} s/round)", flush=True)
            checkpoint = _save_checkpoint(cfg, out, 0, parts, progress, task)
            if signum:
                raise TrainingInterrupted(signum, 0, checkpoint, f"D pre-training round {progress.d_pretrain_rounds}")

        # 4. adversarial epochs: g-steps (Monte-Carlo rollout rewards, policy gradient), then d-steps
        times = progress.seconds
        bar = tqdm(total=cfg.max_steps, initial=progress.epoch, desc="seqgan adversarial", unit="epoch")
        for epoch in range(progress.epoch + 1, cfg.max_steps + 1):
            epoch_clock = _timer()
            row: dict[str, float] = {}
            for _ in range(cfg.g_steps):
                # 4a. a batch of B sequences, and N rollouts of each proper prefix by the rollout policy
                clock = _timer()
                batch = task.sample(policy, rollout_model, rollouts=cfg.reward_transform != "maligan")
                mask = batch.completion_mask  # [B, T]
                times["rollout"] += clock()
                # 4b. the rewards: Q(t) = mean over the N rollouts of D, and D of the whole sequence at t = T
                #     (eq. 4), then the reward transform; maligan reads D of the whole sequences only
                clock = _timer()
                if cfg.reward_transform == "maligan":
                    logit = real_logit(d, batch.sequences, cfg.score_batch_size).to(mask.device)  # [B]
                    advantages = adversarial.maligan_reward(logit)[:, None] * mask
                    row["objective/q_last"] = float(torch.sigmoid(logit).mean())
                else:
                    scores, final = task.score(d, batch)  # [T-1, N, B], [B]
                    q = core.monte_carlo_q_values(scores, final)  # [B, T]
                    row["objective/q_mean"], row["objective/q_last"] = float(core.masked_mean(q, mask)), float(final.mean())
                    if cfg.reward_transform == "dense":
                        returns = adversarial.dense_reward(torch.logit(q), mask, cfg.dense_gamma)  # sigmoid(logit q) = q
                        advantages, progress.dense_baseline = ema_baseline_advantages(
                            returns, mask, progress.dense_baseline, cfg.dense_baseline_decay)
                        row["objective/dense_baseline"] = progress.dense_baseline
                    else:
                        advantages = q - core.masked_mean(q, mask, dim=0) if cfg.baseline == "mean" else q
                if cfg.kl_coef > 0:  # per-token KL to the reference, as a penalty on the return (not in the paper)
                    ref_lp = policy.ref_logprobs(batch.input_ids, batch.attention_mask, mask.shape[1],
                                                 cfg.temperature, cfg.min_new_tokens)
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
                progress.g_steps += 1
                row.update({"loss/policy": float(loss.detach()), "policy/grad_norm": float(grad_norm),
                            "policy/logprob_mean": float(stats["logprob_mean"])})
            # 4d. D steps, each on fresh negatives (Algorithm 1)
            clock = _timer()
            for _ in range(cfg.d_steps):
                row.update(train_discriminator(d, opt_d, task.positives(cfg.d_negatives),
                                               task.negatives(policy, cfg.d_negatives), cfg.d_epochs, cfg.batch_size,
                                               cfg.d_l2, g))
                progress.d_steps += 1
            times["d_step"] += clock()
            # 4e. the task's evaluation of this epoch (oracle: every eval_every epochs)
            clock = _timer()
            row.update(task.evaluate(policy, d, epoch))
            times["eval"] += clock()
            times["adv"] += epoch_clock()
            row["time/adv_epoch"] = times["adv"] / epoch
            writer.log(row, step=epoch)
            with tqdm.external_write_mode():  # the line above the progress bar, not through it
                print(f"[seqgan] adv epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            bar.update()
            # 4f. checkpoint: every save_steps epochs, after the last, and when SIGINT/SIGTERM arrived
            progress.phase, progress.epoch = 4, epoch
            signum = stop.signum
            if (cfg.save_steps and epoch % cfg.save_steps == 0) or epoch == cfg.max_steps or signum:
                checkpoint = _save_checkpoint(cfg, out, epoch, parts, progress, task)
            if signum and epoch < cfg.max_steps:
                bar.close()
                raise TrainingInterrupted(signum, epoch, checkpoint, f"adversarial epoch {epoch}")
        bar.close()

    # 5. final evaluation and save
    n_g, n_d = max(progress.g_steps, 1), max(progress.d_steps, 1)
    summary["s_per_d_pretrain_round"] = times["d_pretrain"] / max(cfg.d_pretrain_rounds, 1)
    summary["s_adv_total"] = times["adv"]
    summary["s_per_adv_epoch"] = times["adv"] / max(cfg.max_steps, 1)
    summary["s_per_g_step"] = (times["rollout"] + times["score"] + times["update"]) / n_g
    summary["s_per_d_step"] = times["d_step"] / n_d
    summary["g_step_split"] = {k: times[k] / n_g for k in ("rollout", "score", "update")}
    summary["s_eval_total"] = times["eval"]
    task.finish(policy, d)
    summary.update(task.summary)
    policy.save(out, value_head=False)  # the policy gradient trains no value head
    d.save(out / "discriminator")
    summary["s_total"] = total()
    write_json(out / "seqgan_summary.json", summary)
    result = result_line(summary)
    print(f"[seqgan] {result + '; ' if result else ''}done in {summary['s_total'] / 60:.1f} min; summary in "
          f"{out / 'seqgan_summary.json'}", flush=True)
    return SeqGANResult(policy, d, summary)
