"""Run outputs: the output folder guard, `metrics.jsonl`, and progress lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlgen.errors import UserError


def prepare_output_dir(path: str | Path, overwrite: bool, resuming: bool = False) -> Path:
    """Create `path`; refuse a non-empty folder unless overwriting or resuming (nothing is clobbered)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resuming):
        raise UserError(f"output_dir {folder} is not empty: pass --overwrite_output_dir true or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
