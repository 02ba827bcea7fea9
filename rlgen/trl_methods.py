"""TRL baselines: train a policy with TRL's GRPOTrainer, RLOOTrainer or DPOTrainer on the same budget as rlgen's PPO.

- grpo / rloo: `max_steps` optimiser steps; each step samples `batch_size` completions (`batch_size //
  num_generations` prompts x `num_generations`) with the current policy, scores them and takes one update (TRL's
  defaults otherwise: group-normalised advantages for GRPO, leave-one-out baselines for RLOO). `beta` is the KL
  coefficient to the start model (the adapter disabled under LoRA).
- dpo: the start policy samples 2 completions for each of `max_steps * batch_size // 2` prompts (rlgen's
  `Policy.sample`); each pair is ranked by the weighted reward (`preference_pairs`) and DPOTrainer takes one pass,
  `batch_size // 2` pairs a step. `beta` is DPO's beta.

Budget rule: every method generates exactly `max_steps * batch_size` completions, sampled the same way (the
`SamplingConfig`: new tokens, temperature, pure sampling otherwise; the model folder's generation_config hidden while
TRL trains, as `Policy.sample` hides it) from prompts rendered and tokenised as rlgen's Policy does (from the same
prompts and random state, TRL's generation and `Policy.sample` draw the same tokens). Rewards are called as rlgen's PPO calls
them: raw prompt (text or messages), stripped completion, `completion_ids` and the dataset's other columns.

Outputs in `output_dir`: the trained policy (`Policy.save`, LoRA merged, no value head), `metrics.jsonl` (one row per step, rlgen's
metric names plus `completions/generated`) and, for DPO, `preference_pairs.jsonl` (the ranked pairs it trained on).
With `eval_steps`, every that many optimiser steps the shared evaluator (`eval_config`: prompts, rewards, gold
rewards, sampling) scores the live policy against the starting model, with the random streams left untouched (so
the trained weights are those of a run without it): a metrics.jsonl row of its eval/* metrics and
`completions/generated`, its samples in `<eval_config.output_dir>/step<n>/`.

Gold rule: a reward with weight 0 is a gold reward, monitored (`rewards/<name>/mean` every step) and never optimised.
Gold rewards are not handed to TRL as weight-0 reward functions: TRL drops a completion from the advantage baseline
when *every* reward function returned None for it (grpo_trainer.py:2759, rloo_trainer.py:1653), so a weight-0 gold
value would still change training whenever the optimised rewards all return None. They are scored alongside the first
optimised reward instead and reported through TRL's `log_metric` hook.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from rlgen.checkpoint import preserved_rng
from rlgen.config import EvalConfig, SamplingConfig
from rlgen.errors import UserError
from rlgen.files import write_jsonl
from rlgen.policy import NEUTRAL_SAMPLING, Policy, peft_lora_config
from rlgen.rewards import reward_mean_metrics, score_rewards, scored_names
from rlgen.text import render_prompt
from rlgen.tracking import MetricsWriter, quiet_progress

METHODS = ("grpo", "rloo", "dpo")
# TRL log keys -> rlgen's fixed metric names; rewards/<name>/mean are kept as they are and `loss` is per method.
# TRL's `kl` and `entropy` are per-token means (rlgen's PPO logs per-sequence sums under the same names).
METRIC_NAMES = {
    "reward": "objective/scores", "kl": "objective/kl", "entropy": "objective/entropy",
    "completions/mean_length": "completions/mean_length", "learning_rate": "policy/learning_rate",
    "grad_norm": "policy/grad_norm", "clip_ratio/region_mean": "policy/clipfrac",
    "rewards/margins": "objective/dpo_margin", "rewards/accuracies": "objective/dpo_accuracy",
}


def preference_pairs(prompts, completions_a, completions_b, scores_a, scores_b) -> list[dict]:
    """One row {prompt, chosen, rejected, chosen_score, rejected_score} per prompt: the higher-scored completion is
    chosen; on a tie the pair is still made, with `a` chosen."""
    rows = []
    for prompt, a, b, score_a, score_b in zip(prompts, completions_a, completions_b, scores_a, scores_b, strict=True):
        if score_b > score_a:
            a, b, score_a, score_b = b, a, score_b, score_a
        rows.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_score": score_a, "rejected_score": score_b})
    return rows


def check_options(method: str, options: dict):
    """UserError for an unknown method or an option that is not a field of its TRL config class; returns the class."""
    if method not in METHODS:
        raise UserError(f"unknown TRL method '{method}' (choose from {', '.join(METHODS)})")
    import trl

    cls = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig, "dpo": trl.DPOConfig}[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            raise UserError(f"{method}: unknown option '{key}' (not a field of trl.{cls.__name__})")
    return cls


def _check_input(method: str, options: dict, batch_size: int, num_generations: int, reward_fns, weights,
                 eval_steps: int, eval_config: EvalConfig | None):
    """Reject bad input before anything loads or trains; return the TRL config class."""
    cls = check_options(method, options)
    if eval_steps < 0:
        raise UserError(f"{method}: eval_steps must be at least 0, got {eval_steps}")
    if eval_steps and eval_config is None:
        raise UserError(f"{method}: eval_steps {eval_steps} needs an eval_config (the evaluation to run)")
    if len(weights) != len(reward_fns):
        raise UserError(f"{method}: {len(weights)} weights for {len(reward_fns)} reward functions")
    if not any(weights):
        raise UserError(f"{method}: every reward has weight 0, so there is nothing to optimise")
    if method == "dpo" and (batch_size < 2 or batch_size % 2):
        raise UserError(f"dpo: batch_size {batch_size} must be even (two completions per prompt)")
    if method != "dpo" and (num_generations < 2 or batch_size % num_generations):
        raise UserError(f"{method}: num_generations {num_generations} must be >= 2 and divide batch_size {batch_size}")
    return cls


def _trainer_class(method: str, max_prompt_length: int):
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

    if method == "dpo":
        class SampledDPO(DPOTrainer):
            """DPO on the sampled token ids: TRL would re-tokenise prompt + decoded text (dpo_trainer.py:1098; tokens
            re-merge and a BOS may be added) and append an EOS even to truncated samples (dpo_trainer.py:1062)."""

            def _prepare_dataset(self, dataset, *args):
                return dataset

        return SampledDPO

    class PolicyPrompts(GRPOTrainer if method == "grpo" else RLOOTrainer):
        """Prompts tokenised as Policy.tokenize_prompts does: no special tokens added (TRL's plain tokenizer call,
        grpo_trainer.py:1758 / rloo_trainer.py:1289, adds a BOS with tokenizers that add one, on top of the chat
        template's own), and keep the last max_prompt_length tokens (TRL 1.16 has no prompt truncation)."""

        def _tokenize_prompts(self, prompts):
            ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
            return [x[-max_prompt_length:] for x in ids], None, {}

    return PolicyPrompts


def _trl_rewards(reward_fns, weights, raw_prompt: dict, column_names, seen: dict):
    """TRL reward functions for the optimised rewards (weight != 0), called as rlgen's PPO calls them (raw prompt,
    stripped completion, completion_ids, the dataset columns `column_names`, which TRL passes on); the first also
    counts what TRL generated and scores the gold rewards. An ensemble returns its combined values to TRL and reports
    its members' means (`rewards/<name>/<member>/mean`) through `log_metric`."""
    golds = [fn for fn, w in zip(reward_fns, weights) if w == 0]

    def wrap(name, fn, first):
        def reward(prompts, completions, completion_ids, log_metric, **kwargs):
            prompts, completions = [raw_prompt[p] for p in prompts], [c.strip() for c in completions]
            extra = {"completion_ids": completion_ids, **{k: kwargs[k] for k in column_names}}
            if first:
                seen["completions"] += len(completions)
                seen["tokens"] += sum(len(ids) for ids in completion_ids)  # up to and including EOS
                for key, value in reward_mean_metrics(score_rewards(golds, prompts, completions, columns=extra)[1]).items():
                    log_metric(key, value)
            per_fn = score_rewards([(name, fn)], prompts, completions, columns=extra)[1]
            for key, value in reward_mean_metrics({k: v for k, v in per_fn.items() if k != name}).items():
                log_metric(key, value)
            return per_fn[name]

        reward.__name__ = name  # TRL names reward functions (rewards/<name>/mean) by __name__
        return reward

    optimised = [(fn, w) for fn, w in zip(reward_fns, weights) if w != 0]
    return [wrap(*fn, i == 0) for i, (fn, _) in enumerate(optimised)], [w for _, w in optimised]


def _sample_pairs(policy, prompts, columns, reward_fns, weights, n_pairs, batch_size, sampling, seed, seen):
    """Sample two completions per prompt (batch_size completions per generate call) and rank each pair."""
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    picked = [order[i % len(order)] for i in range(n_pairs)]
    chosen = [prompts[i] for i in picked]
    texts, ids, prompt_ids = ([], []), ([], []), []
    for i in range(0, n_pairs, batch_size // 2):
        chunk = chosen[i:i + batch_size // 2]
        k = len(chunk)
        ro = policy.sample(chunk + chunk, sampling, with_values=False)  # rows [:k] are side a, [k:] side b
        sampled = [c[m.bool()].tolist() for c, m in zip(ro.completion_ids, ro.completion_mask)]
        for side in (0, 1):
            texts[side].extend(ro.completions[side * k:(side + 1) * k])
            ids[side].extend(sampled[side * k:(side + 1) * k])
        prompt_ids += [p[m.bool()].tolist() for p, m in zip(ro.prompt_ids[:k], ro.prompt_mask[:k])]
        seen["completions"] += 2 * k
        seen["tokens"] += int(ro.completion_mask.sum())
    extra = {k: [v[i] for i in picked] * 2 for k, v in columns.items()}
    extra["completion_ids"] = ids[0] + ids[1]
    totals, per_fn = score_rewards(reward_fns, chosen * 2, texts[0] + texts[1], weights, extra)
    score_a, score_b = totals[:n_pairs], totals[n_pairs:]
    rendered = [render_prompt(policy.tokenizer, p) for p in chosen]
    pairs = preference_pairs(rendered, *texts, score_a, score_b)
    id_pairs = preference_pairs(prompt_ids, *ids, score_a, score_b)
    rows = [{**p, **{f"{k}_ids": q[k] for k in ("prompt", "chosen", "rejected")}} for p, q in zip(pairs, id_pairs)]
    return pairs, rows, reward_mean_metrics(per_fn)


def _recorder(writer: MetricsWriter, names: dict, seen: dict, rows: list):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {names[k]: v for k, v in (logs or {}).items() if k in names}
            if state.is_world_process_zero and row:
                row["completions/generated"] = seen["completions"]
                writer.log(row, step=state.global_step)
                rows.append({"step": state.global_step, **row})

    return Record()


def _evaluation(evaluator, live: Policy, eval_steps: int, writer: MetricsWriter, seen: dict, rows: list):
    """A TrainerCallback running `evaluator` on `live` (a Policy around the model TRL trains, its hooks off) every
    `eval_steps` optimiser steps, its forward hooks on only meanwhile: training's forward passes run none."""
    from transformers import TrainerCallback

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and state.global_step % eval_steps == 0:
                live.add_hooks()
                try:
                    row = evaluator.along_training(live, state.global_step, seen["completions"])
                finally:
                    live.remove_hooks()
                writer.log(row, step=state.global_step)
                rows.append({"step": state.global_step, **row})

    return Evaluate()


def train_trl(method: str, *, model: str, output_dir: str | Path, prompts: list,
              reward_fns: list[tuple[str, Callable]], weights: list[float], max_steps: int, batch_size: int,
              num_generations: int, learning_rate: float, beta: float, sampling: SamplingConfig,
              lora: dict, seed: int, threads: int, options: dict, columns: dict[str, list] | None = None,
              dtype: str = "float32", eval_steps: int = 0, eval_config: EvalConfig | None = None) -> dict:
    """Train the model folder `model` with TRL's `method` on `prompts` (raw user texts or lists of messages), whose
    dataset `columns` (one value per prompt) the rewards get; save the policy and `metrics.jsonl` to `output_dir`.
    Returns {"completions", "tokens", "curve", "train_s", "evals"} (see the module docstring; evals: the rows of the
    evaluations along training, as in metrics.jsonl)."""
    import datasets
    import transformers
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback

    from rlgen.evaluation import Evaluator
    from rlgen.models import default_device, load_model, mixed_precision_flags, set_threads

    config_cls = _check_input(method, options, batch_size, num_generations, reward_fns, weights, eval_steps, eval_config)
    columns = columns or {}
    if method != "dpo" and len(prompts) < batch_size // num_generations:
        raise UserError(f"{method}: {len(prompts)} prompts, fewer than the {batch_size // num_generations} a step needs")
    evaluator = Evaluator(eval_config) if eval_steps else None  # its data and rewards checked before anything runs
    datasets.disable_progress_bars()
    set_threads(threads)
    transformers.set_seed(seed)  # LoRA init and DPO sampling happen before TRL seeds anything
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    policy = Policy.from_pretrained(model, reference=False, seed=seed).to(default_device())  # DPO samples with it
    tok = policy.tokenizer
    seen, rows, evals = {"completions": 0, "tokens": 0}, [], []
    names = {**METRIC_NAMES, "loss": "loss/dpo" if method == "dpo" else "loss/policy",
             **{f"rewards/{name}/mean": f"rewards/{name}/mean" for name in scored_names(reward_fns)}}
    args = dict(output_dir=str(out), max_steps=max_steps, learning_rate=learning_rate, beta=beta, seed=seed,
                logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", push_to_hub=False,
                use_cpu=not torch.cuda.is_available(), **mixed_precision_flags(dtype), gradient_checkpointing=False,
                dataloader_num_workers=0, disable_tqdm=False)
    peft_config = peft_lora_config(**lora) if lora.get("lora_r", 0) > 0 else None

    sample_s = 0.0  # DPO's sampling happens before training; GRPO/RLOO generate inside trainer.train()
    if method == "dpo":
        start = time.perf_counter()
        pairs, train_rows, sampled_means = _sample_pairs(policy, prompts, columns, reward_fns, weights,
                                                         max_steps * batch_size // 2, batch_size, sampling, seed, seen)
        sample_s = time.perf_counter() - start
        write_jsonl(out / "preference_pairs.jsonl", pairs)
        args.update(per_device_train_batch_size=batch_size // 2, max_length=None)  # train on whole samples
        trainer_kwargs = dict(train_dataset=Dataset.from_list(train_rows))
    else:
        rendered = [render_prompt(tok, p) for p in prompts]
        funcs, trl_weights = _trl_rewards(reward_fns, weights, dict(zip(rendered, prompts)), list(columns), seen)
        args.update(per_device_train_batch_size=batch_size, num_generations=num_generations, reward_weights=trl_weights,
                    max_completion_length=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_k=0, top_p=1.0,  # as Policy.sample: pure sampling, EOS blocked before min_new_tokens (0: none)
                    generation_kwargs={**NEUTRAL_SAMPLING, "min_new_tokens": sampling.min_new_tokens})
        train_rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(rendered)]
        trainer_kwargs = dict(reward_funcs=funcs, train_dataset=Dataset.from_list(train_rows))
    policy.remove_hooks()  # its model is the one TRL trains: no sampling hooks on its forward passes
    trainer = _trainer_class(method, sampling.max_prompt_length)(
        model=policy.model, args=config_cls(**{**args, **options}), processing_class=tok, peft_config=peft_config,
        callbacks=[_recorder(MetricsWriter(out), names, seen, rows)], **trainer_kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(quiet_progress())
    if evaluator:
        # trainer.model is the model TRL trains (under LoRA its PEFT wrapper, whose disabled adapter is the
        # reference); building the Policy and loading the reference draw random numbers that training must not see
        with preserved_rng():
            reference = None if peft_config else load_model(model, seed=seed)[0].to(default_device())
            live = Policy(trainer.model, tok, reference=False, ref_model=reference)
        live.remove_hooks()
        trainer.add_callback(_evaluation(evaluator, live, eval_steps, MetricsWriter(out), seen, evals))
    start = time.perf_counter()
    # TRL's log-probs ignore the logits processors a model folder's generation_config would add (min_p,
    # suppress_tokens, ...; transformers fills the fields TRL leaves None from it): sample as Policy.sample does
    hidden = policy.model_generation_defaults_hidden(trainer.model) if method != "dpo" else nullcontext()
    with hidden:
        trainer.train()
    train_s = sample_s + time.perf_counter() - start

    Policy(trainer.model.eval(), tok, reference=False).save(out, value_head=False)  # TRL trains none
    if method == "dpo":
        curve = [{"step": 0, "completions": seen["completions"], **sampled_means}]
    else:
        reward_keys = [f"rewards/{name}/mean" for name in scored_names(reward_fns)]
        curve = [{"step": r["step"], "completions": r["completions/generated"], **{k: r[k] for k in reward_keys if k in r}}
                 for r in rows]
    return {"completions": seen["completions"], "tokens": seen["tokens"], "curve": curve, "train_s": train_s,
            "evals": evals}
