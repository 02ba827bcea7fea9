"""`rlgen evaluate` and `rlgen run`: the pipeline that trains stage after stage and scores each on equal terms.

`rlgen run` evaluates the starting model, then runs each training stage in `stages` (each starts from the
previous stage's output), evaluating after each with the same prompts, rewards and reference (the
starting model), and writes `report.md` with one row per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlgen.config import (
    CommonConfig,
    EvalConfig,
    SFTConfig,
    build_config,
    opt,
    parse_section_overrides,
    parse_stage_config,
    save_config,
)
from rlgen.errors import UserError
from rlgen.tracking import MetricsWriter, prepare_output_dir

RUN_HELP = "the pipeline: evaluate the starting model, run each training stage, evaluate after each, report"

def _training_stages() -> dict:
    """stage name -> (config class, training function); the order of `stages` in a run is the user's."""
    from rlgen.ppo import PPOConfig, train_ppo
    from rlgen.seqgan import SeqGANConfig, train_seqgan
    from rlgen.sft import train_sft

    return {"sft": (SFTConfig, train_sft), "ppo": (PPOConfig, train_ppo), "seqgan": (SeqGANConfig, train_seqgan)}


TRAINING_STAGES = ("sft", "ppo", "seqgan")
REPORT_COLUMNS = ["eval/reward/mean", "eval/kl", "eval/perplexity_ref", "eval/mean_length", "eval/eos_fraction",
                  "eval/distinct_1", "eval/distinct_2", "eval/self_bleu"]


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


def _stage_config(cls, run: RunConfig, section: str, output_dir: Path, model: str, source: str):
    """A stage's config: the run's common keys, then the stage's section, then the pipeline's wiring."""
    common = {f.name: getattr(run, f.name) for f in dataclasses.fields(CommonConfig)}
    common.pop("output_dir")
    values = {**common, **getattr(run, section), "output_dir": str(output_dir), "model": model}
    return build_config(cls, values, f"{source}, section '{section}'")


def _compare_config(run: RunConfig, output_dir: Path):
    """The comparison that ends a run: the run's model, data and threads, then the `compare` section."""
    from rlgen.compare import CompareConfig

    values = {"model": run.model, "dataset": run.dataset, "threads": run.threads, **run.compare,
              "output_dir": str(output_dir / "compare"), "overwrite_output_dir": True}
    return build_config(CompareConfig, values, "run config, section 'compare'")


def parse_run_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """RunConfig from `--config`, flags, and `--<section>.<key> VALUE` overrides of its sections."""
    overrides = parse_section_overrides(extra, ("evaluate", "compare", *TRAINING_STAGES))
    run = parse_stage_config(RunConfig, args, args.config)
    bad = [s for s in run.stages if s not in TRAINING_STAGES]
    if bad:
        raise UserError(f"stages: unknown stage '{bad[0]}' (known: {', '.join(TRAINING_STAGES)})")
    run = dataclasses.replace(run, **{s: {**getattr(run, s), **v} for s, v in overrides.items()})
    # Validate every section now, before anything trains.
    source = f"config file {args.config}" if args.config else "command line"
    _stage_config(EvalConfig, run, "evaluate", Path(run.output_dir), run.model, source)
    for stage in run.stages:
        _stage_config(_training_stages()[stage][0], run, stage, Path(run.output_dir), run.model, source)
    if run.compare:
        from rlgen.compare import check_compare_config

        check_compare_config(_compare_config(run, Path(run.output_dir)))
    return run


def run_evaluation(cfg: EvalConfig, ref_name: str | None = None, log_step: int = 0) -> dict[str, float]:
    """`rlgen evaluate`: score `cfg.model` on the first `num_prompts` prompts of `cfg.split`."""
    import torch

    from rlgen.data import load_rows, prompt_of
    from rlgen.evaluation import evaluate_policy
    from rlgen.models import default_device, set_threads
    from rlgen.policy import Policy, SamplingSettings
    from rlgen.rewards import load_reward, reward_columns

    set_threads(cfg.threads)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    save_config(cfg, out)
    reward_fns = [load_reward(spec) for spec in cfg.reward]
    if cfg.reward_weights and len(cfg.reward_weights) != len(reward_fns):
        raise UserError(f"reward_weights has {len(cfg.reward_weights)} values for {len(reward_fns)} rewards")
    rows = load_rows(cfg.dataset, cfg.split)[:cfg.num_prompts]
    policy = Policy.from_pretrained(cfg.model, reference=True, ref_name=ref_name, seed=cfg.seed).to(default_device())
    torch.manual_seed(cfg.seed)  # after loading: building a model (or converting the GGUF) draws random numbers
    sampling = SamplingSettings.from_config(cfg)
    gold_fns = [load_reward(spec) for spec in cfg.gold_reward]
    metrics = evaluate_policy(policy, [prompt_of(r) for r in rows], reward_fns, sampling,
                              weights=cfg.reward_weights or None, batch_size=cfg.batch_size, output_dir=out,
                              self_bleu_max_texts=cfg.self_bleu_max_texts, gold_rewards=gold_fns,
                              columns=reward_columns(rows))
    MetricsWriter(out).log(metrics, step=log_step)
    return metrics


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(folder: Path, rows: dict[str, dict], seconds: dict[str, float]) -> Path:
    """report.md and report.json: one row per evaluated model."""
    reward_columns = sorted({k for m in rows.values() for k in m
                             if k.startswith(("eval/rewards/", "eval/gold/")) and k.endswith("/mean")})
    columns = reward_columns + REPORT_COLUMNS
    lines = ["# rlgen run report", "", "| model | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c, float("nan"))) for c in columns) + " |")
    lines += ["", "KL and perplexity are measured against the starting model.", "",
              "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    (folder / "report.json").write_text(json.dumps({"models": rows, "seconds": seconds}, indent=2))
    return path


def run_pipeline(run: RunConfig) -> Path:
    """Evaluate, train each stage, evaluate again; returns the report path."""
    out = prepare_output_dir(run.output_dir, run.overwrite_output_dir)
    save_config(run, out)
    source = "run config"
    eval_template = _stage_config(EvalConfig, run, "evaluate", out, run.model, source)
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def evaluate(name: str, model: str) -> None:
        t = time.perf_counter()
        cfg = dataclasses.replace(eval_template, model=model, output_dir=str(out / f"eval_{name}"))
        print(f"[rlgen] evaluating {name} on {cfg.num_prompts} {cfg.split} prompts", flush=True)
        rows[name] = run_evaluation(cfg, ref_name=run.model)
        seconds[f"eval_{name}"] = time.perf_counter() - t

    evaluate("start", run.model)
    model = run.model
    for stage in run.stages:
        config_class, train = _training_stages()[stage]
        cfg = _stage_config(config_class, run, stage, out / stage, model, source)
        print(f"[rlgen] stage {stage}: {cfg.max_steps} steps from {model}", flush=True)
        t = time.perf_counter()
        train(cfg)
        seconds[stage] = time.perf_counter() - t
        model = str(out / stage)
        evaluate(stage, model)
    report = write_report(out, rows, seconds)
    print(report.read_text())
    print(f"[rlgen] report: {report}")
    if run.compare:
        from rlgen.compare import run_compare

        compare = _compare_config(run, out)
        print(f"[rlgen] comparing {', '.join(compare.methods)} from {run.model} ({len(compare.seeds)} seed(s) each)",
              flush=True)
        paths = run_compare(compare)
        print(paths["comparison_md"].read_text())
        print(f"[rlgen] comparison: {paths['html']}")
    return report
