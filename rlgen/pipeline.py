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
import json
import math
import threading
import time
from pathlib import Path

import yaml

from rlgen.config import (
    TRAINING_STAGES,
    RunConfig,
    check_device_dtype,
    parse_section_overrides,
    parse_stage_config,
    save_config,
    to_dict,
    with_section_overrides,
)
from rlgen.config.fields import fields_of
from rlgen.errors import UserError
from rlgen.files import read_jsonl, read_metrics, write_json
from rlgen.tracking import has_checkpoint, leaves_output_dir_as_found, prepare_output_dir


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
    overrides = parse_section_overrides(extra, ("evaluate", "compare", *TRAINING_STAGES), fields_of(RunConfig))
    run = parse_stage_config(RunConfig, args, args.config)
    run = with_section_overrides(run, overrides)
    from rlgen.data import check_stage_data

    for section in ("evaluate", *run.stages):
        cfg = run.stage_config(section, Path(run.output_dir), run.model)
        check_device_dtype(cfg.dtype)
        check_stage_data(section, cfg)
    if run.compare:
        from rlgen.compare import check_compare_config

        check_device_dtype(run.compare_config().dtype)
        check_compare_config(run.compare_config())
    return run


STATE_FILE = "run_state.json"  # {"done": {step: seconds}}: the evaluations and stages a run has finished
# Settings a continued run may change (they change no result).
MAY_CHANGE = ("overwrite_output_dir", "resume_from_checkpoint", "threads")


def run_progress(folder: Path) -> dict[str, float]:
    """The steps (eval_start, sft, eval_sft, ...) the run in `folder` has finished, with their seconds."""
    path = folder / STATE_FILE
    return json.loads(path.read_text())["done"] if path.is_file() else {}


def has_progress(folder: Path) -> bool:
    """Whether a failed run leaves work to continue from: a finished step or a stage's checkpoint."""
    return bool(run_progress(folder)) or any(has_checkpoint(folder / stage) for stage in TRAINING_STAGES)


def _continued(run: RunConfig, out: Path) -> dict[str, float] | None:
    """The finished steps of an earlier run of this config in `out`, which this one continues; None for a fresh
    run. UserError when `out` holds a run with other settings."""
    if run.overwrite_output_dir or not (out / "config.yaml").is_file() or not has_progress(out):
        return None
    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    now = to_dict(run)
    changed = [k for k in now if k not in MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise UserError(f"output_dir {out} holds a run with other settings ({k}: {saved.get(k)!r} there, "
                        f"{now[k]!r} now): repeat its command to continue it, or pass --overwrite_output_dir true to "
                        "start over")
    return run_progress(out)


@leaves_output_dir_as_found(has_progress)
def run_pipeline(run: RunConfig) -> Path:
    """Evaluate, train each stage, evaluate again; returns the report path. A failed run keeps what it finished
    and its stages' checkpoints, and the same command continues it: finished steps are skipped and a stage with a
    checkpoint resumes from its latest (issue 30: a failed run used to remove its whole folder)."""
    from rlgen.evaluation import run_evaluation
    from rlgen.report import write_run_report

    map_large_allocations()
    out = Path(run.output_dir)
    done = _continued(run, out)
    if done is None:
        out = prepare_output_dir(run.output_dir, run.overwrite_output_dir)
        (out / STATE_FILE).unlink(missing_ok=True)
        done = {}
    else:
        print(f"[rlgen] continuing the run in {out}: {', '.join(done) or 'nothing'} finished", flush=True)
    save_config(run, out)
    eval_template = run.stage_config("evaluate", out, run.model)
    rows: dict[str, dict] = {}
    peak_gb: dict[str, float] = {}  # this invocation's steps only (a continued run's earlier steps were not seen)

    def finished(step: str, seconds: float, gb: float) -> None:
        done[step] = seconds
        peak_gb[step] = gb
        write_json(out / STATE_FILE, {"done": done})

    def evaluate(name: str, model: str) -> None:
        folder = out / f"eval_{name}"
        if f"eval_{name}" in done:
            rows[name] = read_metrics(folder / "eval_summary.json")
            return
        t = time.perf_counter()
        cfg = dataclasses.replace(eval_template, model=model, output_dir=str(folder))
        print(f"[rlgen] evaluating {name} on {cfg.num_prompts} {cfg.split} prompts", flush=True)
        with PeakRSS() as peak:
            rows[name] = run_evaluation(cfg, ref_name=run.model)
        release_memory()
        finished(f"eval_{name}", time.perf_counter() - t, peak.gb)

    try:
        evaluate("start", run.model)
        model = run.model
        for stage in run.stages:
            cfg = run.stage_config(stage, out / stage, model)
            if stage not in done:
                if has_checkpoint(out / stage):
                    cfg = dataclasses.replace(cfg, resume_from_checkpoint="latest")
                print(f"[rlgen] stage {stage}: {cfg.max_steps} steps from {model}"
                      + (" (resuming from its latest checkpoint)" if cfg.resume_from_checkpoint else ""), flush=True)
                t = time.perf_counter()
                with PeakRSS() as peak:
                    training_function(stage)(cfg)
                release_memory()
                finished(stage, time.perf_counter() - t, peak.gb)
            model = str(out / stage)
            evaluate(stage, model)
    except BaseException:
        if has_progress(out):
            print(f"[rlgen] kept {out} with what this run finished and its checkpoints: the same command continues "
                  "it", flush=True)
        raise
    seconds = dict(done)
    from rlgen.data import held_out_note

    prompts = held_out_note(eval_template.dataset, eval_template.split, eval_template.num_prompts)
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
