"""Stage 1, SFT: supervised fine-tuning with TRL's SFTTrainer on the shared policy wrapper (full or LoRA).

Data rows have `text`, `messages` (a conversation, rendered with the chat template into `text`), or `prompt` +
`completion` (texts or TRL's conversational lists of messages); prompts are rendered with the model's chat template
exactly as the RL stages and the evaluator render them, and the loss covers completion tokens only.
"""

from __future__ import annotations

import os
import time

import torch

from rlgen.config import SFTConfig, lora_kwargs, save_config
from rlgen.data import load_sft_rows
from rlgen.distributed import refuse_unsharded_launch
from rlgen.models import mixed_precision_flags, set_threads
from rlgen.policy import Policy
from rlgen.text import render_conversation, render_prompt_completion
from rlgen.tracking import (
    MetricsWriter,
    check_output_dir,
    leaves_output_dir_as_found,
    prepare_output_dir,
    quiet_progress,
    trainer_metrics_callback,
)

# TRL/transformers log keys -> rlgen's fixed metric names (others are not recorded).
SFT_METRIC_NAMES = {
    "loss": "loss/sft",
    "grad_norm": "policy/grad_norm",
    "learning_rate": "policy/learning_rate",
    "entropy": "objective/entropy",
    "mean_token_accuracy": "policy/token_accuracy",
    "num_tokens": "objective/num_tokens",
    "train_runtime": "time/train",
}


def _dataset(rows: list[dict], tokenizer, n: int, seed: int):
    """The first `n` rows of a seeded shuffle (only what `max_steps` consumes gets tokenised)."""
    import random

    from datasets import Dataset

    if n < len(rows):
        rows = random.Random(seed).sample(rows, n)

    if "text" in rows[0]:
        return Dataset.from_list([{"text": str(r["text"])} for r in rows])
    if "messages" in rows[0]:
        return Dataset.from_list([{"text": render_conversation(tokenizer, r["messages"])} for r in rows])
    return Dataset.from_list([render_prompt_completion(tokenizer, r["prompt"], r["completion"]) for r in rows])


@leaves_output_dir_as_found()
def train_sft(cfg: SFTConfig, policy: Policy | None = None) -> Policy:
    """Fine-tune `cfg.model` (or the given policy) on `cfg.dataset`; save the policy to `cfg.output_dir`."""
    import datasets
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    datasets.disable_progress_bars()

    set_threads(cfg.threads)
    refuse_unsharded_launch("sft")
    resuming = cfg.resume_from_checkpoint is not None
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)
    rows = load_sft_rows(cfg.dataset, "train")  # data errors before the model loads and before anything is written
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)
    save_config(cfg, out)
    if policy is None:
        policy = Policy.from_pretrained(cfg.model, **lora_kwargs(cfg), reference=False, seed=cfg.seed)
    # 1. data
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train = _dataset(rows, policy.tokenizer, cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * world,
                     cfg.seed)
    # 2. trainer (TRL); checkpoints go to output_dir/checkpoints
    args = TRLSFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(cfg.save_steps, 1),
        report_to=cfg.report_to or "none", use_cpu=not torch.cuda.is_available(), max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss if "prompt" in train.column_names else None,
        dataloader_num_workers=0, disable_tqdm=False, **mixed_precision_flags(cfg.dtype),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    writer = MetricsWriter(out)
    trainer = SFTTrainer(model=policy.model, args=args, train_dataset=train, processing_class=policy.tokenizer,
                         callbacks=[trainer_metrics_callback(writer, SFT_METRIC_NAMES)])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(quiet_progress())
    # 3. train
    start = time.perf_counter()
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    # 4. save the final policy (a plain Hugging Face folder)
    policy.model = trainer.model
    policy.model.eval()
    # TRL's SFTTrainer replaces the model's forward with a closure over the original bound method (its fused LM
    # head): a deepcopy of the model (SeqGAN's reference and rollout policy) would run this model's weights.
    vars(policy.model.get_base_model() if policy.is_peft else policy.model).pop("forward", None)
    if trainer.is_world_process_zero():
        policy.save(out, value_head=False)  # SFT trains no value head
    print(f"[rlgen] sft: {cfg.max_steps} steps in {time.perf_counter() - start:.0f}s; model saved to {out}")
    return policy
