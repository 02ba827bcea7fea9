"""Run outputs: the output folder guard, the clean-up of failed runs, `metrics.jsonl`, and progress lines."""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rlgen.checkpoint import TrainingInterrupted, complete_checkpoints
from rlgen.errors import UserError


def check_output_dir(path: str | Path, overwrite: bool, resuming: bool = False) -> Path:
    """The output-folder guard alone (writes nothing): refuse a file, or a non-empty folder unless
    overwriting or resuming. Stages call it before loading anything, so bad input never touches the folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resuming):
        raise UserError(f"output_dir {folder} is not empty: pass --overwrite_output_dir true or choose another folder")
    return folder


def prepare_output_dir(path: str | Path, overwrite: bool, resuming: bool = False) -> Path:
    """Create `path`; refuse a non-empty folder unless overwriting or resuming (nothing is clobbered)."""
    folder = check_output_dir(path, overwrite, resuming)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint to resume from: rlgen's `checkpoint-N` or the Trainer's
    `checkpoints/checkpoint-N` (sft, reward-model train)."""
    return bool(complete_checkpoints(folder)) or any((folder / "checkpoints").glob("checkpoint-*"))


# What rlgen writes at the top of an output folder (fnmatch patterns): a failed run removes only new entries so
# named, never a file someone else made there meanwhile (issue 30: it removed every entry that appeared). The model
# files are those of transformers' save_pretrained, PEFT's and TRL's Trainer (checkpoints, model card).
OWN_ENTRIES = (
    "config.yaml", "compare_config.yaml", "run_state.json", "metrics.jsonl", "*.tmp*", "checkpoint-*", "checkpoints",
    "eval", "eval_*", "sft", "ppo", "seqgan", "runs", "proxies", "start_model", "all_samples", "discriminator",
    "critic", "adapter", "report.*", "comparison.*", "samples.md", "*.png", "sweep.*", "result.json",
    "*_summary.json", "calibration.jsonl", "rlgen_reward.json", "preference_pairs.jsonl", "config.json",
    "generation_config.json", "*.safetensors", "*.safetensors.index.json", "adapter_*", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "training_args.bin", "README.md", "optimizer*.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
)


def is_own_entry(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_ENTRIES)


def leaves_output_dir_as_found(resumable: Callable[[Path], bool] = has_checkpoint):
    """Decorator for a stage function `f(cfg, ...)` that writes to `cfg.output_dir`: if it raises while that folder
    holds nothing to continue from (`resumable`), what the run created there goes (the folder too, and the parent
    folders it made), so the same command runs again once the cause is fixed, instead of stopping at "output_dir is
    not empty" (issue 23). Entries that were there before stay; a TrainingInterrupted has saved a checkpoint and
    keeps everything."""

    def decorate(function):
        @functools.wraps(function)
        def run(cfg, *args, **kwargs):
            folder = Path(cfg.output_dir)
            made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
            before = set(folder.iterdir()) if folder.is_dir() else set()
            try:
                return function(cfg, *args, **kwargs)
            except TrainingInterrupted:
                raise
            except BaseException:
                # one process cleans up (several under accelerate launch): the main one, which wrote the files
                if os.environ.get("RANK", "0") == "0" and folder.is_dir() and not resumable(folder):
                    _remove_new(folder, before, made)
                raise

        return run

    return decorate


def _remove_new(folder: Path, before: set[Path], made: list[Path]) -> None:
    """Remove the entries this run made (new since it started, named as rlgen names its outputs), then the folders
    it made that are empty now; anything else stays, said in one line."""
    new = set(folder.iterdir()) - before
    others = sorted(p.name for p in new if not is_own_entry(p.name))
    if others:
        print(f"[rlgen] kept {', '.join(others)} in {folder}: not written by this run", flush=True)
    for path in new:
        if not is_own_entry(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path in made:
        if not path.is_dir() or any(path.iterdir()):
            break
        path.rmdir()


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per logged step to `<folder>/metrics.jsonl`."""

    def __init__(self, folder: str | Path, filename: str = "metrics.jsonl"):
        self.path = Path(folder) / filename

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def jsonable_row(metrics: dict) -> dict:
    """A metrics row as MetricsWriter writes it (non-finite floats as strings)."""
    return {k: _jsonable(v) for k, v in metrics.items()}


def trainer_metrics_callback(writer: MetricsWriter, names: dict[str, str]):
    """A transformers TrainerCallback writing the logged values named in `names` (TRL key -> rlgen name)."""
    from transformers import TrainerCallback

    class WriteMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {names[k]: v for k, v in logs.items() if k in names}
                if row:
                    writer.log(row, step=state.global_step)

    return WriteMetrics()


def quiet_progress():
    """A progress bar that shows the loss instead of printing every log dict."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    return QuietProgress()
