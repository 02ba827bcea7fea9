"""`rlgen compare`: train several alignment methods from one starting model on equal terms, and report them.

For each method in `methods` and each seed in `seeds` (one run after another), train from the same starting
model on the same training prompts with the same sampling settings and the same reward callables, then score
the result with the shared evaluator: the same held-out prompts, rewards and reference (the starting model).

Budget, matched by generated completions: every run generates at most `max_steps * batch_size` completions.
- ppo (rlgen.ppo): `max_steps` updates of `batch_size` rollouts, one optimiser step each (one PPO epoch, one
  mini-batch), as TRL's GRPO/RLOO take one step per generation batch;
- grpo, rloo (TRL): `max_steps` steps of `batch_size` completions (`num_generations` per prompt);
- dpo (TRL): 2 own samples for each of `max_steps * batch_size / 2` prompts, ranked by the proxy into
  preference pairs, then `max_steps` DPO steps;
- seqgan (rlgen.seqgan): one discriminator pre-training round on `batch_size` samples, then
  `(max_steps - 1) // 2` adversarial epochs of one generator step (`batch_size` samples; its Monte-Carlo
  rollouts are partial continuations, counted in the tokens column) and one D step on `batch_size` fresh samples;
- sft (TRL SFTTrainer): `max_steps` steps of `batch_size` real replies; it generates nothing.
The table reports the completions and tokens each run actually generated, and its wall time.

Proxy and gold: the methods optimise `reward` (the proxy, e.g. a learned reward model); the evaluator also
scores `gold_reward`, which no method optimises (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"). The online methods (ppo, grpo, rloo) also score the gold on their training samples at
weight 0 (never part of the objective), so the learning curves show where the proxy keeps rising and the gold
does not; dpo ranks its pairs by the proxy alone.

Output folder: `compare_config.yaml`; `runs/<method>/seed<k>/` (the trained policy, metrics.jsonl, `eval/`
with the evaluator's samples, `result.json`); `runs/start/` (the starting model's evaluation); and the report
(rlgen.report): comparison.md/.csv, frontier.png, learning_curves.png, proxy_vs_gold.png, samples.md, report.html.
Resumable: a run whose `result.json` exists is not rerun, so the same command continues an interrupted
comparison, and adding a method or seed trains only the new runs; changing any other setting of an existing
comparison is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from rlgen.checkpoint import TrainingInterrupted
from rlgen.config import (
    EvalConfig,
    LoraConfigMixin,
    RewardConfigMixin,
    SamplingConfig,
    SFTConfig,
    build_config,
    opt,
    to_dict,
)
from rlgen.errors import UserError

COMPARE_HELP = "train several methods from one model on equal terms and report them side by side"
METHODS = ("sft", "ppo", "seqgan", "grpo", "rloo", "dpo")
TRL_METHODS = ("grpo", "rloo", "dpo")
# Default learning rates (full fine-tuning, LoRA), overridable per method; LoRA adapters take ~10-30x larger steps.
DEFAULT_LR = {"sft": (2e-5, 2e-4), "ppo": (1e-5, 3e-4), "seqgan": (1e-5, 1e-4), "grpo": (1e-5, 3e-4),
              "rloo": (1e-5, 3e-4), "dpo": (5e-6, 1e-4)}
# Settings that may change between invocations on the same output folder (they do not change any result).
MAY_CHANGE = ("methods", "seeds", "output_dir", "overwrite_output_dir", "threads")


@dataclass(frozen=True)
class CompareConfig(SamplingConfig, RewardConfigMixin, LoraConfigMixin):
    """`rlgen compare`: methods x seeds from one starting model, evaluated on equal terms."""

    model: str = opt("default", "starting model of every method: default (embedded SmolLM2-135M-Instruct), tiny, "
                                "a folder or a Hub id")
    output_dir: str = opt("runs/compare", "folder for every run, the tables, the plots and report.html")
    dataset: str = opt("chitchat", "prompts for training (train split) and evaluation (see evaluate.split)")
    methods: list[str] = opt(["sft", "ppo", "grpo"], f"methods to compare, from: {', '.join(METHODS)}")
    seeds: list[int] = opt([0, 1, 2], "one run per method and seed")
    max_steps: int = opt(8, "budget: each run generates at most max_steps x batch_size completions (see module doc)")
    batch_size: int = opt(8, "completions generated per policy update")
    num_generations: int = opt(4, "grpo/rloo: completions per prompt (must divide batch_size)")
    kl_coef: float = opt(0.05, "KL coefficient to the starting model for ppo, grpo, rloo and seqgan")
    dpo_beta: float = opt(0.1, "dpo: beta (strength of the implicit KL constraint)")
    learning_rate: float | None = opt(None, "learning rate of every method (default: each method's own, see "
                                            "DEFAULT_LR in rlgen/compare.py)")
    max_new_tokens: int = opt(32, "tokens to generate per completion, in training and evaluation")
    gold_reward: list[str] = opt([], "gold reward(s): scored by the evaluator, never optimised")
    samples_shown: int = opt(3, "prompts whose completions the report shows for every method")
    threads: int = opt(1, "torch intra-op threads (1 is fastest on busy 2-core machines)")
    overwrite_output_dir: bool = opt(False, "discard a previous comparison in output_dir instead of continuing it")
    evaluate: dict = opt({}, "options of the evaluation (see rlgen evaluate --help), e.g. num_prompts")
    sft: dict = opt({}, "options of the sft runs (rlgen sft --help)")
    ppo: dict = opt({}, "options of the ppo runs (rlgen ppo --help)")
    seqgan: dict = opt({}, "options of the seqgan runs (rlgen seqgan --help)")
    grpo: dict = opt({}, "options passed to TRL's GRPOConfig")
    rloo: dict = opt({}, "options passed to TRL's RLOOConfig")
    dpo: dict = opt({}, "options passed to TRL's DPOConfig")


def _lr(cfg: CompareConfig, method: str) -> float:
    return cfg.learning_rate if cfg.learning_rate is not None else DEFAULT_LR[method][cfg.lora_r > 0]


def _lora(cfg: CompareConfig) -> dict:
    return {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "lora_target_modules": cfg.lora_target_modules}


def _sampling(cfg: CompareConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplingConfig)}


def _stage_config(cfg: CompareConfig, method: str, model: str, output_dir: Path, seed: int):
    """The rlgen stage config of one run: the comparison's shared settings, then the method's own section."""
    from rlgen.ppo import PPOConfig
    from rlgen.seqgan import SeqGANConfig

    common = {"model": model, "output_dir": str(output_dir), "dataset": cfg.dataset, "seed": seed,
              "threads": cfg.threads, "overwrite_output_dir": True, **_lora(cfg)}
    if method == "sft":
        cls, values = SFTConfig, {"max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
                                  "learning_rate": _lr(cfg, "sft")}
    elif method == "ppo":
        cls, values = PPOConfig, {
            **_sampling(cfg), "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "mini_batch_size": cfg.batch_size, "ppo_epochs": 1, "learning_rate": _lr(cfg, "ppo"),
            "kl_coef": cfg.kl_coef, "missing_eos_penalty": 0.0,
            # the gold rewards ride along at weight 0: logged per update, never optimised
            "reward": cfg.reward + cfg.gold_reward,
            "reward_weights": (cfg.reward_weights or [1.0] * len(cfg.reward)) + [0.0] * len(cfg.gold_reward)}
    else:
        cls, values = SeqGANConfig, {
            **_sampling(cfg), "task": "text", "max_steps": max((cfg.max_steps - 1) // 2, 1),
            "batch_size": cfg.batch_size, "learning_rate": _lr(cfg, "seqgan"), "kl_coef": cfg.kl_coef,
            "g_steps": 1, "rollout_num": 2, "rollout_update_rate": 0.0, "baseline": "mean",
            "d_pretrain_rounds": 1, "d_pretrain_epochs": 1, "d_steps": 1, "d_epochs": 1,
            "d_negatives": cfg.batch_size, "d_learning_rate": 2e-5, "d_max_length": 48, "d_dropout": 0.1,
            "score_batch_size": 64, "max_grad_norm": 1.0, "eval_num_prompts": 0}
    return build_config(cls, {**common, **values, **getattr(cfg, method)}, f"compare section '{method}'")


def _eval_config(cfg: CompareConfig, model: str, output_dir: Path, seed: int) -> EvalConfig:
    values = {"model": model, "output_dir": str(output_dir), "dataset": cfg.dataset, "seed": seed,
              "threads": cfg.threads, "overwrite_output_dir": True, "reward": cfg.reward,
              "reward_weights": cfg.reward_weights, "gold_reward": cfg.gold_reward, "num_prompts": 32,
              **_sampling(cfg), **cfg.evaluate}
    return build_config(EvalConfig, values, "compare section 'evaluate'")


def check_compare_config(cfg: CompareConfig) -> None:
    """UserError naming the first bad setting; runs before anything is written or trained."""
    from rlgen.rewards import load_reward
    from rlgen.trl_methods import check_options

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UserError(f"methods: unknown method '{unknown[0]}' (known: {', '.join(METHODS)})")
    if not cfg.methods or not cfg.seeds:
        raise UserError("methods and seeds must each name at least one")
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError("methods and seeds must not repeat")
    if cfg.max_steps < 1 or cfg.batch_size < 1:
        raise UserError(f"max_steps and batch_size must be at least 1, got {cfg.max_steps} and {cfg.batch_size}")
    if any(m in cfg.methods for m in ("grpo", "rloo")) and (
            cfg.num_generations < 2 or cfg.batch_size % cfg.num_generations):
        raise UserError(f"num_generations {cfg.num_generations} must be at least 2 and divide batch_size "
                        f"{cfg.batch_size} (grpo/rloo)")
    if "dpo" in cfg.methods and cfg.batch_size % 2:
        raise UserError(f"dpo pairs two samples per prompt: batch_size {cfg.batch_size} must be even")
    for spec in cfg.reward + cfg.gold_reward:
        load_reward(spec)
    _eval_config(cfg, cfg.model, Path(cfg.output_dir), 0)
    for method in cfg.methods:
        if method in TRL_METHODS:
            check_options(method, getattr(cfg, method))
        else:
            _stage_config(cfg, method, cfg.model, Path(cfg.output_dir), 0)
    for method in METHODS:
        if getattr(cfg, method) and method not in cfg.methods:
            print(f"[compare] note: section '{method}' is ignored ({method} is not in methods)", flush=True)


def _fingerprint(cfg: CompareConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in MAY_CHANGE}


def _open_output(cfg: CompareConfig) -> Path:
    """The output folder, new or continued; a different comparison in it is refused (or discarded on request)."""
    import yaml

    out = Path(cfg.output_dir)
    saved = out / "compare_config.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite_output_dir:
            shutil.rmtree(out)
        elif not saved.is_file():
            raise UserError(f"output_dir {out} is not empty and holds no comparison: choose another folder or "
                            "pass --overwrite_output_dir true")
        else:
            old = _fingerprint(build_config(CompareConfig, yaml.safe_load(saved.read_text()), str(saved)))
            new = _fingerprint(cfg)
            changed = [k for k in new if old.get(k) != new[k]]
            if changed:
                k = changed[0]
                raise UserError(f"output_dir {out} holds a comparison with other settings ({k}: {old.get(k)!r} "
                                f"there, {new[k]!r} now); only methods and seeds may change when continuing it. "
                                "Choose another folder or pass --overwrite_output_dir true")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def _start_model(cfg: CompareConfig, out: Path) -> str:
    """A folder (or Hub id) holding the starting model: TRL's trainers build their reference from it."""
    from rlgen.models import resolve_model_path

    if cfg.model != "tiny":
        return resolve_model_path(cfg.model)
    folder = out / "start_model"
    if not (folder / "config.json").is_file():
        from rlgen.policy import Policy

        Policy.from_pretrained("tiny", reference=False).save(folder)
    return str(folder)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _reward_names(specs: list[str]) -> list[str]:
    """The names score_rewards logs for these specs, in order (a repeated name gets _2, _3, ...)."""
    from rlgen.rewards import _unique_name, reward_name

    names: list[str] = []
    for spec in specs:
        names.append(_unique_name(reward_name(spec), names))
    return names


def _train(cfg: CompareConfig, method: str, start: str, run_dir: Path, seed: int) -> dict:
    """Train one run; returns {completions, tokens, curve}. The curve's keys: `completions`,
    `rewards/<proxy>/mean` and `rewards/gold_<gold>/mean` (training samples, online methods only)."""
    if method in TRL_METHODS:
        from rlgen.policy import SamplingSettings
        from rlgen.rewards import load_reward
        from rlgen.trl_methods import train_trl

        fns = [load_reward(s) for s in cfg.reward] + [(f"gold_{n}", f) for n, f in map(load_reward, cfg.gold_reward)]
        weights = (cfg.reward_weights or [1.0] * len(cfg.reward)) + [0.0] * len(cfg.gold_reward)
        sampling = SamplingSettings.from_config(cfg)
        result = train_trl(method, model=start, output_dir=run_dir, prompts=_train_prompts(cfg),
                           reward_fns=fns, weights=weights, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                           num_generations=cfg.num_generations, learning_rate=_lr(cfg, method),
                           beta=cfg.dpo_beta if method == "dpo" else cfg.kl_coef, sampling=sampling,
                           lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                                 "target_modules": cfg.lora_target_modules},
                           seed=seed, threads=cfg.threads, options=getattr(cfg, method))
        return {k: result[k] for k in ("completions", "tokens", "curve")}
    stage = _stage_config(cfg, method, start, run_dir, seed)
    if method == "sft":
        from rlgen.sft import train_sft

        train_sft(stage)
        return {"completions": 0, "tokens": 0, "curve": []}
    if method == "seqgan":
        from rlgen.seqgan import train_seqgan

        generated = train_seqgan(stage).summary["generated"]
        return {"completions": generated["completions"], "tokens": generated["tokens"], "curve": []}
    from rlgen.ppo import train_ppo

    train_ppo(stage)
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    names = _reward_names(stage.reward)
    keys = {f"rewards/{n}/mean": f"rewards/{n}/mean" for n in names[:len(cfg.reward)]}
    keys.update({f"rewards/{n}/mean": f"rewards/gold_{g}/mean"
                 for n, g in zip(names[len(cfg.reward):], _reward_names(cfg.gold_reward))})
    curve = [{"completions": row["step"] * cfg.batch_size, **{new: row[old] for old, new in keys.items() if old in row}}
             for row in rows]
    tokens = round(sum(float(row["completions/mean_length"]) * cfg.batch_size for row in rows))
    return {"completions": len(rows) * cfg.batch_size, "tokens": tokens, "curve": curve}


def _train_prompts(cfg: CompareConfig) -> list[str]:
    from rlgen.data import load_rows

    return [str(r["prompt"]) for r in load_rows(cfg.dataset, "train")]


def _evaluate(cfg: CompareConfig, model: str, start: str, folder: Path, seed: int) -> tuple[dict, list[dict], float]:
    from rlgen.pipeline import run_evaluation

    t = time.perf_counter()
    metrics = run_evaluation(_eval_config(cfg, model, folder, seed), ref_name=start)
    return metrics, _read_jsonl(folder / "eval_samples.jsonl"), time.perf_counter() - t


def _write_result(run_dir: Path, record: dict) -> None:
    """result.json, written last and atomically: its presence marks the run finished."""
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(run_dir / "result.json")


def run_compare(cfg: CompareConfig) -> dict[str, Path]:
    """Train and evaluate every (method, seed) not finished yet, then write the report; returns its paths."""
    from rlgen.models import set_threads
    from rlgen.report import write_report

    check_compare_config(cfg)
    set_threads(cfg.threads)
    out = _open_output(cfg)
    start = _start_model(cfg, out)
    records = []
    start_dir = out / "runs" / "start"
    if not (start_dir / "result.json").is_file():
        print(f"[compare] evaluating the starting model {cfg.model}", flush=True)
        start_dir.mkdir(parents=True, exist_ok=True)
        metrics, samples, eval_s = _evaluate(cfg, start, start, start_dir / "eval", cfg.seeds[0])
        _write_result(start_dir, {"method": "start", "seed": None, "metrics": metrics, "train_s": 0.0,
                                  "eval_s": eval_s, "completions": 0, "tokens": 0, "curve": [], "samples": samples})
    records.append(json.loads((start_dir / "result.json").read_text()))
    total = len(cfg.methods) * len(cfg.seeds)
    for i, (method, seed) in enumerate(((m, s) for m in cfg.methods for s in cfg.seeds), 1):
        run_dir = out / "runs" / method / f"seed{seed}"
        if (run_dir / "result.json").is_file():
            print(f"[compare] {i}/{total} {method} seed {seed}: finished earlier, kept", flush=True)
        else:
            print(f"[compare] {i}/{total} {method} seed {seed}: training", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
            t = time.perf_counter()
            try:
                trained = _train(cfg, method, start, run_dir, seed)
            except TrainingInterrupted as e:  # PPO's own hint (--resume_from_checkpoint) does not apply here
                e.args = (f"{signal.Signals(e.signum).name} received during {method} seed {seed}: finished runs are "
                          "kept; run the same command again to continue (this run starts over)",)
                raise
            train_s = time.perf_counter() - t
            metrics, samples, eval_s = _evaluate(cfg, str(run_dir), start, run_dir / "eval", seed)
            _write_result(run_dir, {"method": method, "seed": seed, "metrics": metrics, "train_s": train_s,
                                    "eval_s": eval_s, **trained, "samples": samples})
            print(f"[compare] {method} seed {seed}: proxy {metrics['eval/reward/mean']:.3f}, KL "
                  f"{metrics['eval/kl']:.2f}, {train_s:.0f}s training", flush=True)
        records.append(json.loads((run_dir / "result.json").read_text()))
    return write_report(out, records, _reward_names(cfg.reward), _reward_names(cfg.gold_reward), to_dict(cfg),
                        title=f"rlgen comparison: {', '.join(cfg.methods)} from {cfg.model}")
