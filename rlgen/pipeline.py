"""`rlgen run`: the pipeline that trains stage after stage and scores each on equal terms.

`rlgen run` evaluates the starting model, then runs each training stage in `stages` (each starts from the
previous stage's output), evaluating after each with the same prompts, rewards and reference (the
starting model), and writes `report.md` with one row per model. Every section of the run was checked when
its RunConfig was built, so a bad option in a late stage stops the run before the first one trains.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import threading
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
from rlgen.tracking import leaves_output_dir_as_found, never, prepare_output_dir


def _status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in GB (10^9 bytes); NaN where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return math.nan


class PeakRSS:
    """The peak resident memory of this process during a `with` block, in GB (`.gb`; NaN off Linux): the process's
    high-water mark (VmHWM) where the block raised it (exact), else the largest RSS a thread sampled every
    `interval` seconds. The high-water mark itself is not reset, so GNU time still reports the whole run's."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.gb = interval, math.nan

    def __enter__(self) -> PeakRSS:
        self._hwm, self._sampled, self._stop = _status_gb("VmHWM"), _status_gb("VmRSS"), threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._sampled = max(self._sampled, _status_gb("VmRSS"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_gb("VmHWM")
        self.gb = hwm if hwm > self._hwm else max(self._sampled, _status_gb("VmRSS"))


# glibc serves allocations below its mmap threshold from the heap, which a freed tensor leaves fragmented and
# resident; the threshold adapts upwards (to 32 MiB) as large tensors are freed, so a layer's activations all land
# there. A fixed 1 MiB threshold maps them instead, and freeing returns them (mallopt M_MMAP_THRESHOLD = -3).
MMAP_THRESHOLD = 1 << 20


def map_large_allocations() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Return what the last stage freed to the system: collect Python's garbage (a trainer and its optimiser
    states can sit in reference cycles), then glibc's malloc_trim, without which the freed heap stays in
    this process's resident memory and adds to every later stage's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
    overrides = parse_section_overrides(extra, ("evaluate", "compare", *TRAINING_STAGES))
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

    map_large_allocations()
    out = prepare_output_dir(run.output_dir, run.overwrite_output_dir)
    save_config(run, out)
    eval_template = run.stage_config("evaluate", out, run.model)
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    peak_gb: dict[str, float] = {}

    def evaluate(name: str, model: str) -> None:
        t = time.perf_counter()
        cfg = dataclasses.replace(eval_template, model=model, output_dir=str(out / f"eval_{name}"))
        print(f"[rlgen] evaluating {name} on {cfg.num_prompts} {cfg.split} prompts", flush=True)
        with PeakRSS() as peak:
            rows[name] = run_evaluation(cfg, ref_name=run.model)
        release_memory()
        seconds[f"eval_{name}"] = time.perf_counter() - t
        peak_gb[f"eval_{name}"] = peak.gb

    evaluate("start", run.model)
    model = run.model
    for stage in run.stages:
        cfg = run.stage_config(stage, out / stage, model)
        print(f"[rlgen] stage {stage}: {cfg.max_steps} steps from {model}", flush=True)
        t = time.perf_counter()
        with PeakRSS() as peak:
            training_function(stage)(cfg)
        release_memory()
        seconds[stage] = time.perf_counter() - t
        peak_gb[stage] = peak.gb
        model = str(out / stage)
        evaluate(stage, model)
    from rlgen.data import held_out_note

    prompts = held_out_note(eval_template.dataset, eval_template.split, eval_template.num_prompts)
    from rlgen.files import read_jsonl

    samples = {name: read_jsonl(out / f"eval_{name}" / "eval_samples.jsonl") for name in rows}
    report = write_run_report(out, rows, seconds, f"Every model was evaluated on {prompts}.", samples, peak_gb)
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
