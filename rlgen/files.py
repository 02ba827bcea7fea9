"""Where rlgen keeps files, where it finds Hub models, and its one JSONL reader and writer (no torch: the config and
CLI import it)."""

from __future__ import annotations

import json
import math
import os
import re
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
    """Write `rows`, one JSON object per line, atomically (a reader never sees half a file; processes that write
    the same file at once, e.g. every rank filling the demo-data cache, each replace it whole)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    tmp.replace(path)


def finite_or_none(value):
    """`value` with every NaN or infinite float (numpy and 0-d torch scalars too) replaced by None, through lists and
    mappings: JSON has no NaN (json.dumps writes a bare `NaN` that strict readers such as jq and JavaScript reject),
    so an undefined number, e.g. the standard error of one prompt, is written as null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write `obj` as strictly valid JSON: non-finite numbers as null (`finite_or_none`), other objects by str."""
    Path(path).write_text(json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=str) + "\n")


def read_metrics(path: str | Path) -> dict:
    """A flat {name: value} file `write_json` wrote, with null read back as NaN (a metric that was not defined)."""
    return {k: float("nan") if v is None else v for k, v in json.loads(Path(path).read_text()).items()}


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` is a Hub id `owner/name` rather than an existing path."""
    return bool(re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", str(name))) and not Path(name).expanduser().exists()


def hub_model_folder(name: str, what: str) -> str:
    """The local Hugging Face cache's folder of the Hub model `name`; UserError at once when it is not cached,
    rather than after a minute of network retries (rlgen runs offline). With HF_HUB_OFFLINE=0 set explicitly,
    `name` itself, which transformers downloads."""
    from huggingface_hub import try_to_load_from_cache

    if os.environ.get("HF_HUB_OFFLINE") == "0":
        return name
    config = try_to_load_from_cache(name, "config.json")
    if not isinstance(config, str):
        raise UserError(f"{what} {name!r} is neither a local folder nor in the Hugging Face cache: download it "
                        f"first (hf download {name}), give a folder, or set HF_HUB_OFFLINE=0 to let it download")
    return str(Path(config).parent)
