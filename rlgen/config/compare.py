"""The configs that combine stages: `rlgen compare` (methods x seeds) and `rlgen run` (the pipeline).

Both derive every stage config they will run from their own fields (`method_config`, `stage_config`), and
build them all in `check()`, so a bad option in any section is refused before anything trains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from rlgen.config.fields import is_rows, near_miss, opt
from rlgen.config.loader import build_config, load_yaml
from rlgen.config.stages import (
    DATASET_HELP,
    DTYPE_HELP,
    RL_PRESETS,
    CommonConfig,
    EvalConfig,
    LoraConfigMixin,
    PPOConfig,
    RewardConfigMixin,
    RewardModelConfig,
    RolloutEngineMixin,
    SamplingConfig,
    SeqGANConfig,
    SFTConfig,
    at_least,
    check_dataset,
    check_dtype,
    check_no_reference,
    check_rewards,
    engine_kwargs,
    lora_kwargs,
    positive,
)
from rlgen.errors import UserError

COMPARE_HELP = "train several methods from one model on equal terms and report them side by side"
SWEEP_HELP = ("reward over-optimisation against proxy quality (Gao et al. 2022): train proxies on more or fewer "
              "preference pairs (and ensembles of them), optimise each, report the gold's peak and fits")
RUN_HELP = "the pipeline: evaluate the starting model, run each training stage, evaluate after each, report"
# the methods that train, each with an options section of its own; bon trains nothing (see rlgen/bon.py)
# the estimators on rlgen's RL loop (rlgen.ppo), each its preset (RL_PRESETS); TRL's trainers as references
LOOP_METHODS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "gspo", "cispo", "dapo")
TRL_METHODS = ("trl_grpo", "trl_rloo", "dpo")
SECTION_METHODS = ("sft", *LOOP_METHODS, "seqgan", "gad", *TRL_METHODS)
METHODS = (*SECTION_METHODS, "bon")
# methods that sample num_generations completions per prompt
GROUP_METHODS = (tuple(m for m in LOOP_METHODS if RL_PRESETS[m].get("num_generations", 1) > 1)
                 + ("gad", "trl_grpo", "trl_rloo"))
TRAINING_STAGES = ("sft", "ppo", "seqgan")
STAGE_CONFIGS = {"sft": SFTConfig, "seqgan": SeqGANConfig, "gad": PPOConfig, **{m: PPOConfig for m in LOOP_METHODS}}
# Until rlgen 0.x grpo and rloo named TRL's trainers; a comparison naming them says so once.
RENAMED_NOTE = ("methods grpo and rloo now train on rlgen's own RL loop (presets grpo, rloo: the same sampler, "
                "sharding and engine as ppo); TRL's trainers are the methods trl_grpo and trl_rloo (sections of the "
                "same names take TRL's options)")
# Default learning rates (full fine-tuning, LoRA), overridable per method; LoRA adapters take ~10-30x larger steps.
DEFAULT_LR = {"sft": (2e-5, 2e-4), "seqgan": (1e-5, 1e-4), "trl_grpo": (1e-5, 3e-4), "trl_rloo": (1e-5, 3e-4),
              "dpo": (5e-6, 1e-4), "gad": (1e-5, 3e-4), **{m: (1e-5, 3e-4) for m in LOOP_METHODS}}
# Keys of a method's own section that would change how many completions it generates (sft: how many replies it
# trains on; dpo and sft: how many it takes per step), which the comparison sets from max_steps, batch_size and
# num_generations for every method alike: refused in a section. How a method uses its completions stays its own
# (e.g. ppo_epochs, mini_batch_size).
BUDGET_KEYS = {
    "sft": ("max_steps", "batch_size", "gradient_accumulation_steps"),
    **{m: ("max_steps", "batch_size", "num_generations", "max_sampling_rounds") for m in LOOP_METHODS},
    "seqgan": ("max_steps", "batch_size", "g_steps", "d_steps", "d_pretrain_rounds", "d_negatives", "mle_steps"),
    "trl_grpo": ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                 "generation_batch_size", "steps_per_generation", "num_iterations"),
    "dpo": ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"),
    "gad": ("max_steps", "batch_size", "num_generations", "max_sampling_rounds"),
}
BUDGET_KEYS["trl_rloo"] = BUDGET_KEYS["trl_grpo"]
# Settings that may change between invocations on the same output folder (they do not change any result).
MAY_CHANGE = ("methods", "seeds", "output_dir", "overwrite_output_dir", "threads", "quality_diversity",
              "qd_temperatures")


@dataclass(frozen=True)
class CompareConfig(SamplingConfig, RolloutEngineMixin, RewardConfigMixin, LoraConfigMixin):
    """`rlgen compare`: methods x seeds from one starting model, evaluated on equal terms."""

    model: str = opt("default", "starting model of every method: default (embedded SmolLM2-135M-Instruct), tiny, "
                                "a folder or a Hub id in the local cache")
    teacher_model: str = opt("", "distillation: a teacher with the starting model's tokenizer (default, "
                                 "tiny, a folder or a Hub id); its replies to the first teacher_prompts "
                                 "training prompts and to the evaluation prompts replace the dataset's replies for "
                                 "every method (sft trains on them; gad's warm-up and discriminator, and seqgan's "
                                 "discriminator, take them as the real replies; eval/reference_nll scores them) and "
                                 "it scores the quality-diversity samples; empty: the dataset's replies")
    teacher_prompts: int = opt(256, "teacher_model: the training prompts it answers (every method trains on these)")
    output_dir: str = opt("runs/compare", "folder for every run, the tables, the plots and report.html")
    dataset: str = opt("chitchat", "prompts for training (train split) and evaluation (see evaluate.split): "
                                   + DATASET_HELP, python=is_rows)
    methods: list[str] = opt(["sft", "ppo", "grpo"], f"methods to compare, from: {', '.join(METHODS)}")
    seeds: list[int] = opt([0, 1, 2], "one run per method and seed")
    max_steps: int = opt(8, "budget: each run generates at most max_steps x batch_size completions (see "
                            "rlgen/compare.py); a method's section cannot change its budget")
    batch_size: int = opt(8, "completions generated per policy update")
    num_generations: int = opt(4, f"{', '.join(GROUP_METHODS)}: completions per prompt (must divide batch_size)")
    kl_coef: float = opt(0.05, "KL coefficient to the starting model for ppo, trl_grpo, trl_rloo and seqgan (the "
                               "other loop methods take their preset's, e.g. grpo 0.04, dapo 0)")
    dpo_beta: float = opt(0.1, "dpo: beta (strength of the implicit KL constraint)")
    bon_n: int = opt(16, "bon: samples per evaluation prompt; best-of-n' is reported at n' = 1, 2, 4, ..., "
                         "bon_n (bon_n x num_prompts completions)")
    learning_rate: float | None = opt(None, "learning rate of every method (default: each method's own, see "
                                            "DEFAULT_LR in rlgen/config/compare.py)")
    max_new_tokens: int = opt(32, "tokens to generate per completion, in training and evaluation")
    gold_reward: list[str] = opt([], "gold reward(s): scored by the evaluator, never optimised", python=callable)
    samples_shown: int = opt(3, "prompts whose completions the report shows for every method")
    eval_steps: int = opt(0, "ppo, grpo, rloo, dpo: also run the evaluation (the same as the final one) every N "
                             "optimiser steps, kept in each run's result.json under evals (0: off; sft and seqgan "
                             "are evaluated at the end only)")
    quality_diversity: str = opt("auto", "also sweep every model's sampling temperature over qd_temperatures and "
                                         "plot quality (the samples' NLL under teacher_model, else the starting "
                                         "model) against diversity (entropy, self-BLEU): "
                                         "quality_diversity.png/.json/.md (Caccia et al. 2020); "
                                         "true, false, or auto: true when an adversarial method (gad, seqgan) is "
                                         "compared, whose gain counts only beyond MLE's temperature curve")
    qd_temperatures: list[float] = opt([0.5, 0.75, 1.0, 1.25, 1.5], "quality_diversity: the temperatures swept "
                                                                    "(the comparison's temperature is added)")
    threads: int = opt(1, "torch intra-op threads (1 is fastest on busy 2-core machines)")
    dtype: str = opt("auto", DTYPE_HELP)
    overwrite_output_dir: bool = opt(False, "discard a previous comparison in output_dir instead of continuing it")
    evaluate: dict = opt({}, "options of the evaluation (see rlgen evaluate --help), e.g. num_prompts")
    sft: dict = opt({}, "options of the sft runs (rlgen sft --help)")
    ppo: dict = opt({}, "options of the ppo runs (rlgen ppo --help)")
    grpo: dict = opt({}, "options of the grpo runs on rlgen's loop (rlgen ppo --help; preset grpo)")
    dr_grpo: dict = opt({}, "options of the dr_grpo runs (rlgen ppo --help; preset dr_grpo)")
    rloo: dict = opt({}, "options of the rloo runs on rlgen's loop (rlgen ppo --help; preset rloo)")
    reinforce_pp: dict = opt({}, "options of the reinforce_pp runs (rlgen ppo --help; preset reinforce_pp)")
    gspo: dict = opt({}, "options of the gspo runs (rlgen ppo --help; preset gspo)")
    cispo: dict = opt({}, "options of the cispo runs (rlgen ppo --help; preset cispo)")
    dapo: dict = opt({}, "options of the dapo runs (rlgen ppo --help; preset dapo)")
    seqgan: dict = opt({}, "options of the seqgan runs (rlgen seqgan --help)")
    trl_grpo: dict = opt({}, "options passed to TRL's GRPOConfig")
    trl_rloo: dict = opt({}, "options passed to TRL's RLOOConfig")
    dpo: dict = opt({}, "options passed to TRL's DPOConfig")
    gad: dict = opt({}, "options of the gad runs (rlgen ppo --help; preset gad), and 'discriminator': arguments of "
                        "its adversarial reward (rlgen.adversarial.AdversarialReward, e.g. teacher_model, "
                        "learning_rate, d_warmup)")

    def check(self) -> None:
        """Every setting and every rlgen method's derived config; TRL's own options are checked by
        `rlgen.compare.check_compare_config`, which needs TRL."""
        SamplingConfig.check(self)
        check_rewards(self)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"methods: unknown method '{unknown[0]}' (known: {', '.join(METHODS)})")
        if not self.methods or not self.seeds:
            raise UserError("methods and seeds must each name at least one")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise UserError("methods and seeds must not repeat")
        at_least(self, 1, "max_steps", "batch_size", "bon_n", "teacher_prompts")
        at_least(self, 0, "threads", "samples_shown", "eval_steps")
        if str(self.quality_diversity).lower() not in ("auto", "true", "false"):
            raise UserError(f"quality_diversity must be true, false or auto, got {self.quality_diversity!r}")
        if any(not t > 0 for t in self.qd_temperatures):
            raise UserError(f"qd_temperatures must be > 0, got {self.qd_temperatures}")
        positive(self, "learning_rate")
        check_dataset(self)
        check_dtype(self)
        for method in SECTION_METHODS:
            budget = next((k for k in BUDGET_KEYS[method] if k in getattr(self, method)), None)
            if budget:
                raise UserError(f"compare section '{method}': key '{budget}' would change this method's budget, which "
                                "every method shares (at most max_steps x batch_size completions, see "
                                "rlgen/compare.py): set max_steps, batch_size or num_generations at the top level")
        group = [m for m in self.methods if m in GROUP_METHODS]
        if group and (self.num_generations < 2 or self.batch_size % self.num_generations):
            raise UserError(f"num_generations {self.num_generations} must be at least 2 and divide batch_size "
                            f"{self.batch_size} ({', '.join(group)})")
        if "dpo" in self.methods and self.batch_size % 2:
            raise UserError(f"dpo pairs two samples per prompt: batch_size {self.batch_size} must be even")
        self.eval_config(self.model, Path(self.output_dir), 0)
        for method in self.methods:
            if method in STAGE_CONFIGS:
                self.method_config(method, self.model, Path(self.output_dir), 0)

    def learning_rate_of(self, method: str) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[method][self.lora_r > 0]

    def method_config(self, method: str, model: str, output_dir: Path, seed: int):
        """The rlgen stage config of one run: the comparison's shared settings, then the method's own section."""
        common = {"model": model, "output_dir": str(output_dir), "dataset": self.dataset, "seed": seed,
                  "threads": self.threads, "dtype": self.dtype, "overwrite_output_dir": True, **lora_kwargs(self)}
        sampling = dataclasses.asdict(SamplingConfig.of(self))
        if method == "sft":
            values = {"max_steps": self.max_steps, "batch_size": self.batch_size,
                      "learning_rate": self.learning_rate_of("sft")}
        elif method in LOOP_METHODS:
            own = next((k for k in ("eval_steps", "evaluate", "preset") if k in getattr(self, method)), None)
            if own:
                raise UserError(f"compare section '{method}': key '{own}' is the comparison's own (set it at the top "
                                "level, so that every method is evaluated alike; the preset is the method's name)")
            preset = RL_PRESETS[method]
            values = {  # the preset fills the rest (its kl_coef, clips, aggregation, ...): left at their defaults
                **sampling, **engine_kwargs(self), "preset": method, "max_steps": self.max_steps,
                "batch_size": self.batch_size, "mini_batch_size": self.batch_size, "ppo_epochs": 1,
                "num_generations": self.num_generations if preset.get("num_generations", 1) > 1 else 1,
                "learning_rate": self.learning_rate_of(method), "missing_eos_penalty": 0.0,
                **({"kl_coef": self.kl_coef} if "kl_coef" not in preset else {}),
                # the gold rewards ride along at weight 0: logged per update, never optimised
                "reward": self.reward + self.gold_reward,
                "reward_weights": (self.reward_weights or [1.0] * len(self.reward)) + [0.0] * len(self.gold_reward),
                "eval_steps": self.eval_steps,
                "evaluate": self.eval_config(model, output_dir / "eval_steps", seed).own_options()}
        elif method == "seqgan":
            # batch_size x (1 D pre-training round + 2 per adversarial epoch: a generator and a D step)
            if self.max_steps < 3:
                raise UserError(f"seqgan needs max_steps >= 3: one D pre-training round and one adversarial epoch "
                                f"generate 3 x batch_size completions (got max_steps {self.max_steps})")
            values = {  # preset none: these values as they are (the text task's defaults fill only default values)
                **sampling, "task": "text", "preset": "none", "max_steps": (self.max_steps - 1) // 2,
                "batch_size": self.batch_size, "learning_rate": self.learning_rate_of("seqgan"),
                "kl_coef": self.kl_coef, "g_steps": 1, "rollout_num": 2, "rollout_update_rate": 0.0,
                "baseline": "mean" if self.seqgan.get("reward_transform", "seqgan") == "seqgan" else "none",
                "d_pretrain_rounds": 1, "d_pretrain_epochs": 1, "d_steps": 1, "d_epochs": 1,
                "d_negatives": self.batch_size, "d_learning_rate": 2e-5, "d_max_length": 48, "d_dropout": 0.1,
                "score_batch_size": 64, "max_grad_norm": 1.0, "eval_num_prompts": 0}
        elif method == "gad":
            return self.gad_config(model, output_dir, seed, common, sampling)
        else:
            raise ValueError(f"{method} is trained by TRL (rlgen.trl_methods), not by an rlgen stage config")
        try:
            return build_config(STAGE_CONFIGS[method], {**common, **values, **getattr(self, method)},
                                f"compare section '{method}'")
        except UserError as e:
            if method in ("grpo", "rloo") and "unknown key" in str(e):
                raise UserError(f"{e}; TRL's {method.upper()}Config options go in section trl_{method} "
                                f"(method trl_{method})") from None
            raise

    def gad_config(self, model: str, output_dir: Path, seed: int, common: dict, sampling: dict) -> PPOConfig:
        """GAD's RL stage (after its SFT warm-up, `rlgen.compare`): preset gad from `model`, its discriminator
        initialised from `model` too; the proxy and gold rewards ride along at weight 0. Budget: `d_warmup` rounds of
        batch_size replies train D before the first update, so the RL stage has max_steps - d_warmup updates."""
        section = dict(self.gad)
        own = next((k for k in ("eval_steps", "evaluate", "preset") if k in section), None)
        if own:
            raise UserError(f"compare section 'gad': key '{own}' is the comparison's own (set it at the top level, "
                            "so that every method is evaluated alike; the preset is gad)")
        d_args = {"model": model, "teacher": "reference_completion", "loss": "bt", "transform": "bt_score",
                  "d_every": 1, "d_warmup": 1, "seed": seed, **section.pop("discriminator", {})}
        if not isinstance(d_args["d_warmup"], int) or not 0 <= d_args["d_warmup"] < self.max_steps:
            raise UserError(f"compare section 'gad': discriminator d_warmup {d_args['d_warmup']!r} must be an integer "
                            f"in [0, max_steps) (max_steps {self.max_steps}): its rounds count in the budget")
        spec = "adversarial(" + ", ".join(f"{k}={v!r}" for k, v in d_args.items()) + ")"
        values = {
            **sampling, **engine_kwargs(self), "preset": "gad", "max_steps": self.max_steps - d_args["d_warmup"],
            "batch_size": self.batch_size, "mini_batch_size": self.batch_size, "num_generations": self.num_generations,
            "learning_rate": self.learning_rate_of("gad"), "missing_eos_penalty": 0.0,  # the preset's kl_coef
            "reward": self.reward + self.gold_reward + [spec],
            "reward_weights": [0.0] * (len(self.reward) + len(self.gold_reward)) + [1.0],
            "eval_steps": self.eval_steps,
            "evaluate": self.eval_config(model, output_dir / "eval_steps", seed).own_options()}
        return build_config(PPOConfig, {**common, **values, **section}, "compare section 'gad'")

    def eval_config(self, model: str, output_dir: Path, seed: int) -> EvalConfig:
        """The shared evaluator's config for one run (same prompts, rewards and sampling for every method)."""
        check_no_reference(self.evaluate, "compare section 'evaluate'")
        values = {"model": model, "output_dir": str(output_dir), "dataset": self.dataset, "seed": seed,
                  "threads": self.threads, "dtype": self.dtype, "overwrite_output_dir": True, "reward": self.reward,
                  "reward_weights": self.reward_weights, "gold_reward": self.gold_reward, "num_prompts": 32,
                  **dataclasses.asdict(SamplingConfig.of(self)),
                  **engine_kwargs(self), **self.evaluate}
        return build_config(EvalConfig, values, "compare section 'evaluate'")


@dataclass(frozen=True)
class RunConfig(CommonConfig):
    """`rlgen run`: top-level keys apply to every stage; each stage's section overrides them."""

    output_dir: str = opt("runs/default", "folder for every stage's output and report.md")
    stages: list[str] = opt(["sft"], f"training stages in order, from: {', '.join(TRAINING_STAGES)}")
    sft: dict = opt({}, "options of the sft stage (see rlgen sft --help)")
    ppo: dict = opt({}, "options of the ppo stage (see rlgen ppo --help)")
    seqgan: dict = opt({}, "options of the seqgan stage (see rlgen seqgan --help)")
    evaluate: dict = opt({}, "options of every evaluation (see rlgen evaluate --help)")
    compare: dict = opt({}, "a comparison of methods from the starting model to end the run with (see rlgen "
                            "compare --help); empty: none")

    def check(self) -> None:
        """The run's keys and every section it will use, each built as its stage would build it."""
        CommonConfig.check(self)
        bad = [s for s in self.stages if s not in TRAINING_STAGES]
        if bad:
            raise UserError(f"stages: unknown stage '{bad[0]}'{near_miss(bad[0], TRAINING_STAGES)} (known: "
                            f"{', '.join(TRAINING_STAGES)})")
        unused = next((s for s in TRAINING_STAGES if getattr(self, s) and s not in self.stages), None)
        if unused:  # its options would be ignored, and the default stage trained instead
            raise UserError(f"section '{unused}' is set but stages {self.stages} does not list it: add it to stages "
                            f"(e.g. `stages: [{unused}]`) or remove the section")
        self.stage_config("evaluate", Path(self.output_dir), self.model)
        for stage in self.stages:
            self.stage_config(stage, Path(self.output_dir), self.model)
        if self.compare:
            self.compare_config()

    def stage_config(self, section: str, output_dir: Path, model: str):
        """A stage's config: the run's common keys, then the stage's section, then the pipeline's wiring."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(CommonConfig)}
        common.pop("output_dir")
        values = {**common, **getattr(self, section), "output_dir": str(output_dir), "model": model}
        cls = EvalConfig if section == "evaluate" else STAGE_CONFIGS[section]
        if section == "evaluate":
            check_no_reference(self.evaluate, "run config, section 'evaluate'")
        return build_config(cls, values, f"run config, section '{section}'")

    def compare_config(self) -> CompareConfig:
        """The comparison that ends a run: the run's model, data, threads and dtype, then the `compare` section."""
        values = {"model": self.model, "dataset": self.dataset, "threads": self.threads, "dtype": self.dtype,
                  **self.compare,
                  "output_dir": str(Path(self.output_dir) / "compare"), "overwrite_output_dir": True}
        return build_config(CompareConfig, values, "run config, section 'compare'")


# A sweep sets these of every comparison itself (per proxy, method and seed).
SWEEP_OWN = ("output_dir", "methods", "seeds", "reward", "reward_weights", "threads", "overwrite_output_dir")
ENSEMBLE_COMBINES = ("mean", "min", "uwo")  # rlgen.core.ENSEMBLE_COMBINES, which imports torch (a test keeps them equal)


@dataclass(frozen=True)
class SweepConfig:
    """`rlgen sweep` (rlgen/sweep.py): proxies x methods x seeds, one comparison per proxy, one report."""

    output_dir: str = opt("runs/overoptimization_sweep", "folder for the proxies, every comparison and the report")
    proxy_recipe: str = opt("", "reward-model recipe (a YAML file, see reward_models/) every proxy starts from")
    proxy: dict = opt({}, "options of every proxy over the recipe (rlgen reward-model train --help)")
    num_pairs: list[int] = opt([100, 300, 1000, 3000], "one proxy per size: its number of training pairs")
    proxy_epochs: float = opt(1.0, "passes over its pairs each proxy trains for (max_steps = ceil(num_pairs x "
                                   "proxy_epochs / batch_size)), as Gao et al. train every reward model for one epoch")
    ensemble_pairs: int = opt(300, "training pairs of each ensemble member (one of num_pairs)")
    ensemble_seeds: list[int] = opt([], "seeds of the ensemble members besides the proxy of ensemble_pairs pairs "
                                        "(which has the recipe's seed); empty: no ensembles")
    ensembles: list[str] = opt(list(ENSEMBLE_COMBINES), "one ensemble reward per combination, from: "
                                                        + ", ".join(ENSEMBLE_COMBINES))
    uwo_lambda: float = opt(1.0, "uwo: lam in mean - lam * variance")
    methods: list[str] = opt(["ppo", "bon"], "methods that optimise every proxy (bon: sampled once per seed, read "
                                             "for every proxy)")
    seeds: list[int] = opt([0, 1, 2], "one run per proxy, method and seed")
    compare: dict = opt({}, "options of every comparison (rlgen compare --help): budget, gold_reward (the first is "
                            "the one fitted), eval_steps, evaluate and method sections")
    workers: int = opt(2, "runs side by side, one process each")
    bootstrap: int = opt(1000, "bootstrap replicates over seeds and prompts")
    threads: int = opt(1, "torch intra-op threads per process")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        at_least(self, 1, "workers", "bootstrap", "threads")
        if not self.proxy_epochs > 0:
            raise UserError(f"proxy_epochs must be > 0, got {self.proxy_epochs}")
        if not self.num_pairs or min(self.num_pairs) < 1 or len(set(self.num_pairs)) != len(self.num_pairs):
            raise UserError(f"num_pairs: at least one size, each >= 1 and none repeated, got {self.num_pairs}")
        if self.ensemble_seeds and self.ensemble_pairs not in self.num_pairs:
            raise UserError(f"ensemble_pairs {self.ensemble_pairs} must be one of num_pairs {self.num_pairs}: its "
                            "proxy is the ensembles' first member")
        bad = next((c for c in self.ensembles if c not in ENSEMBLE_COMBINES), None)
        if bad:
            raise UserError(f"ensembles: unknown combination {bad!r} (known: {', '.join(ENSEMBLE_COMBINES)})")
        own = next((k for k in SWEEP_OWN if k in self.compare), None)
        if own:
            raise UserError(f"sweep section 'compare': key '{own}' is set by the sweep for every comparison")
        if self.proxy_recipe and not Path(self.proxy_recipe).is_file():
            raise UserError(f"proxy_recipe: no such file {self.proxy_recipe}")
        if not self.compare.get("gold_reward"):
            raise UserError("sweep section 'compare': set gold_reward (the first is the gold the report fits)")
        self.proxy_configs()
        self.compare_config("check", [str(Path(self.output_dir) / "proxies" / "check")], self.methods, self.seeds)

    def proxy_configs(self) -> dict[str, RewardModelConfig]:
        """The reward models to train, by name: `pairs<N>` per num_pairs, `pairs<N>_seed<s>` per ensemble seed."""
        recipe = {**(load_yaml(self.proxy_recipe) if self.proxy_recipe else {}), **self.proxy}
        base_seed = recipe.get("seed", 0)
        if base_seed in self.ensemble_seeds:
            raise UserError(f"ensemble_seeds {self.ensemble_seeds}: {base_seed} is the recipe's own seed, which the "
                            "first member already has")
        out = {}
        for n, seed in [(n, base_seed) for n in self.num_pairs] + [(self.ensemble_pairs, s) for s in self.ensemble_seeds]:
            name = f"pairs{n}" if seed == base_seed else f"pairs{n}_seed{seed}"
            steps = math.ceil(n * self.proxy_epochs / recipe.get("batch_size", RewardModelConfig.batch_size))
            values = {**recipe, "num_pairs": n, "seed": seed, "max_steps": steps, "threads": self.threads,
                      "output_dir": str(Path(self.output_dir) / "proxies" / name)}
            out[name] = build_config(RewardModelConfig, values, f"sweep proxy {name}")
        return out

    def compare_config(self, name: str, rewards: list[str], methods: list[str], seeds: list[int]) -> CompareConfig:
        """The comparison `name` of `methods` against `rewards` (the first optimised, any others at weight 0).
        The sections of the sweep's other methods are left out (best-of-n's comparison has no use for `ppo`'s
        and would note it as ignored); a section of a method the sweep does not run stays, to be noted."""
        others = set(self.methods) - set(methods)
        values = {**{k: v for k, v in self.compare.items() if k not in others}, "output_dir": str(Path(self.output_dir) / "runs" / name), "methods": methods,
                  "seeds": seeds, "reward": rewards, "reward_weights": [1.0] + [0.0] * (len(rewards) - 1),
                  "threads": self.threads}
        return build_config(CompareConfig, values, f"sweep comparison {name}")


def sweeps_quality_diversity(cfg: CompareConfig) -> bool:
    """Whether the comparison sweeps temperatures (`quality_diversity`; auto: when gad or seqgan is compared)."""
    value = str(cfg.quality_diversity).lower()
    return value == "true" or (value == "auto" and any(m in ("gad", "seqgan") for m in cfg.methods))
