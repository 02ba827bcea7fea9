"""Where rlgen keeps files, and its one JSONL reader and writer (no torch: the config and CLI import it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlgen.errors import UserError


def cache_dir() -> Path:
    """User cache folder: `$RLGEN_CACHE`, else `$XDG_CACHE_HOME/rlgen`, else `~/.cache/rlgen`."""
    if os.environ.get("RLGEN_CACHE"):
        return Path(os.environ["RLGEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlgen"


def read_jsonl(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """One dict per non-empty line; a line that is not JSON is a UserError naming the file and line.
    A missing file is [] with `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from e
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write `rows`, one JSON object per line, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    tmp.replace(path)
