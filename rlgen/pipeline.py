"""`rlgen run`: the pipeline that trains stage after stage and scores each on equal terms.

`rlgen run` evaluates the starting model, then runs each training stage in `stages` (each starts from the
previous stage's output), evaluating after each with the same prompts, rewards and reference (the
starting model), and writes `report.md` with one row per model. Every section of the run was checked when
its RunConfig was built, so a bad option in a late stage stops the run before the first one trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from rlgen.config import (
    TRAINING_STAGES,
    RunConfig,
    parse_section_overrides,
    parse_stage_config,
    save_config,
    with_section_overrides,
)
from rlgen.config.fields import fields_of
from rlgen.tracking import leaves_output_dir_as_found, never, prepare_output_dir


def training_function(stage: str):
    """The training function of a stage of `rlgen run` (imported only when the stage runs)."""
    if stage == "sft":
        from rlgen.sft import train_sft as train
    elif stage == "ppo":
        from rlgen.ppo import train_ppo as train
    else:
        from rlgen.seqgan import train_seqgan as train
    return train


def parse_run_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """RunConfig from `--config`, flags, and `--<section>.<key> VALUE` overrides of its sections; building it
    checks every section, and every stage's data and a comparison's rewards and TRL options are checked here too."""
    overrides = parse_section_overrides(extra, ("evaluate", "compare", *TRAINING_STAGES), fields_of(RunConfig))
    run = parse_stage_config(RunConfig, args, args.config)
    run = with_section_overrides(run, overrides)
    from rlgen.data import check_stage_data

    for section in ("evaluate", *run.stages):
        check_stage_data(section, run.stage_config(section, Path(run.output_dir), run.model))
    if run.compare:
        from rlgen.compare import check_compare_config

        check_compare_config(run.compare_config())
    return run


@leaves_output_dir_as_found(never)  # a run has no resume: a failed one starts over
def run_pipeline(run: RunConfig) -> Path:
    """Evaluate, train each stage, evaluate again; returns the report path."""
    from rlgen.evaluation import run_evaluation
    from rlgen.report import write_run_report

    out = prepare_output_dir(run.output_dir, run.overwrite_output_dir)
    save_config(run, out)
    eval_template = run.stage_config("evaluate", out, run.model)
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
        cfg = run.stage_config(stage, out / stage, model)
        print(f"[rlgen] stage {stage}: {cfg.max_steps} steps from {model}", flush=True)
        t = time.perf_counter()
        training_function(stage)(cfg)
        seconds[stage] = time.perf_counter() - t
        model = str(out / stage)
        evaluate(stage, model)
    from rlgen.data import held_out_note

    prompts = held_out_note(eval_template.dataset, eval_template.split, eval_template.num_prompts)
    from rlgen.files import read_jsonl

    samples = {name: read_jsonl(out / f"eval_{name}" / "eval_samples.jsonl") for name in rows}
    report = write_run_report(out, rows, seconds, f"Every model was evaluated on {prompts}.", samples)
    print(report.read_text())
    print(f"[rlgen] report: {report}")
    if run.compare:
        from rlgen.compare import run_compare

        compare = run.compare_config()
        print(f"[rlgen] comparing {', '.join(compare.methods)} from {run.model} ({len(compare.seeds)} seed(s) each)",
              flush=True)
        paths = run_compare(compare)
        print(paths["comparison_md"].read_text())
        print(f"[rlgen] comparison: {paths['html']}")
    return report
