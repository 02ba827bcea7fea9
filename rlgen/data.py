"""Datasets: the chit-chat demo data, user files (JSONL, CSV, `datasets` folders) and prompt rendering.

Demo data comes from the PyPI package `chitchat-dataset` (MIT licence; the Chit-Chat Challenge corpus,
about 7,000 casual English conversations). Each pair of consecutive turns becomes one row
`{"prompt": turn_i, "completion": turn_i+1}`; a turn is a speaker's consecutive messages joined by a space.
The split is by conversation: sha1(conversation id) mod 100 < 90 is train, < 95 validation, else test.
It is built on first use and cached as JSONL under the rlgen cache folder.

A single user file is split the same way by each row's prompt (`row_key`); when that leaves a split empty (a file
of few prompts), by prompt rank or, with too few prompts for that, by row rank instead (`split_file`), so that any
file with rows enough to train on can be used.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

from rlgen.config.fields import rows_name
from rlgen.errors import UserError
from rlgen.files import cache_dir, read_jsonl, write_jsonl

SPLITS = ("train", "validation", "test")
ALL = "all"  # the split of every row (`load_rows`): to evaluate on all of a small file of one's own
CHITCHAT_VERSION = "v1"
MAX_TURN_WORDS = 40  # keep replies short enough for CPU sampling


def _chitchat_json() -> Path | None:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "dataset.json"
    return path if path.is_file() else None


def _conversations() -> dict:
    path = _chitchat_json()
    if path is None:
        raise UserError("the demo data needs the package chitchat-dataset: pip install chitchat-dataset")
    with open(path) as f:
        return json.load(f)


def _turns(conversation: dict) -> list[str]:
    return [" ".join(m["text"].strip() for m in turn).strip() for turn in conversation["messages"]]


def split_of(key: str) -> str:
    """The split of a conversation id (demo data) or of a row of a single user file (`row_key`):
    sha1(key) mod 100 below 90 is train, below 95 validation, the rest test."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def row_key(row: dict) -> str:
    """What a single file's rows are split by: the prompt (its JSON for a list of messages), else the `text`,
    `messages` or `chosen` column, so every row with the same prompt lands in the same split."""
    for column in ("prompt", "text", "messages", "chosen"):
        if column in row:
            value = row[column]
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return json.dumps(row, sort_keys=True)


def split_file(rows: list[dict]) -> tuple[dict[str, list[dict]], str | None]:
    """The rows of a single file by split, and which fallback made them: None, "prompt rank" or "row rank".

    By `split_of(row_key(row))`, so a prompt stays on one side. When that leaves a split empty (a file of few
    prompts), each held-out split takes max(1, n // 20) rows (validation from 3 rows; 2 rows: one train, one
    test), the rest train: whole prompts in the order of sha1 of the prompt, so that a prompt still stays on one
    side ("prompt rank"), where the prompts are enough for that with at least half the rows left to train; else
    rows ordered by sha1 of their row number and key ("row rank"), and rows sharing a prompt may then fall on
    both sides.

    >>> splits, how = split_file([{"prompt": "p"}] * 40)
    >>> how, [len(splits[s]) for s in SPLITS]
    ('row rank', [36, 2, 2])
    >>> splits, how = split_file([{"prompt": f"p{i % 16}"} for i in range(40)])
    >>> how, [len(splits[s]) for s in SPLITS]
    ('prompt rank', [35, 3, 2])
    """
    by_hash: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows:
        by_hash[split_of(row_key(row))].append(row)
    if all(by_hash.values()):
        return by_hash, None
    n = len(rows)
    held = max(1, n // 20)
    n_test, n_validation = (held if n >= 2 else 0), (held if n >= 3 else 0)
    by_prompt = _split_by_prompt(rows, n_test, n_validation)
    if by_prompt is not None:
        return by_prompt, "prompt rank"

    def rank(item):
        i, row = item
        return hashlib.sha1(f"{i}:{row_key(row)}".encode()).hexdigest()

    ordered = [row for _, row in sorted(enumerate(rows), key=rank)]
    return {"test": ordered[:n_test], "validation": ordered[n_test:n_test + n_validation],
            "train": ordered[n_test + n_validation:]}, "row rank"


def _split_by_prompt(rows: list[dict], n_test: int, n_validation: int) -> dict[str, list[dict]] | None:
    """Whole prompts (in sha1 order of `row_key`) to test until it has `n_test` rows, then to validation until
    `n_validation`, the rest to train; None when train would keep less than half the rows or none."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row), []).append(row)
    order = sorted(groups, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key in order:
        split = ("test" if len(splits["test"]) < n_test else
                 "validation" if len(splits["validation"]) < n_validation else "train")
        splits[split].extend(groups[key])
    if not splits["train"] or 2 * len(splits["train"]) < len(rows):
        return None
    return splits


_NOTED: set[str] = set()


def file_splits(path: str | Path, rows: list[dict]) -> dict[str, list[dict]]:
    """The splits of a single file (`split_file`); the fallback split is said in one line, once per file, by the
    first process of a launch only (torchrun and accelerate set RANK)."""
    splits, how = split_file(rows)
    if how and str(path) not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(str(path))
        counts = ", ".join(f"{len(splits[s])} {s}" for s in SPLITS)
        why = ("each prompt on one side" if how == "prompt rank" else
               "too few prompts to keep each on one side: rows sharing a prompt may fall on both sides")
        print(f"[rlgen] dataset {path}: too few prompts to split by their hash; split by {how} instead ({counts}; "
              f"{why})", flush=True)
    return splits


def chitchat_texts(limit: int | None = None) -> list[str]:
    """Raw turns of the corpus (in a fixed order), or [] if the package is missing."""
    if _chitchat_json() is None:
        return []
    out: list[str] = []
    conversations = _conversations()
    for cid in sorted(conversations):
        out.extend(t for t in _turns(conversations[cid]) if t)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def build_chitchat(folder: Path) -> None:
    """Write train/validation/test JSONL files of (context -> reply) pairs into `folder`."""
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    conversations = _conversations()
    for cid in sorted(conversations):
        turns = _turns(conversations[cid])
        split = split_of(cid)
        for context, reply in zip(turns, turns[1:]):
            if context and reply and len(context.split()) <= MAX_TURN_WORDS and len(reply.split()) <= MAX_TURN_WORDS:
                rows[split].append({"prompt": context, "completion": reply, "conversation_id": cid})
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        write_jsonl(folder / f"{split}.jsonl", split_rows)


def chitchat_folder() -> Path:
    folder = cache_dir() / f"chitchat-{CHITCHAT_VERSION}"
    if not all((folder / f"{s}.jsonl").is_file() for s in SPLITS):
        build_chitchat(folder)
    return folder


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return read_jsonl(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise UserError(f"dataset {path}: unsupported file type (use .jsonl, .csv or a datasets folder)")


def _given_rows(dataset, split: str | None) -> list[dict]:
    """Rows given in Python (`rlgen.config.fields.is_rows`): a mapping of splits (a DatasetDict) gives `split`'s;
    a Dataset or a list of dicts gives all its rows (`split` None) or its `split` split as a
    single file's."""
    name = rows_name(dataset)
    if isinstance(dataset, Mapping):
        if split is None or split not in dataset:
            raise UserError(f"dataset {name} has no split '{split}' (has {sorted(dataset)})")
        dataset = dataset[split]
        split = None
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    bad = next((r for r in rows if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise UserError(f"dataset {name}: rows must be dicts of column: value, got {type(bad).__name__}")
    if not rows:
        raise UserError(f"dataset {name} is empty")
    if split is not None:
        _check_split(name, split, SPLITS)
        every = len(rows)
        rows = file_splits(name, rows)[split]  # as a single file's, the row-rank fallback included
        if not rows:
            raise UserError(f"dataset {name}: no row falls in the {split} split ({every} row(s) are too few to hold "
                            f"any out); give more rows or a DatasetDict with a '{split}' split")
    return [dict(r) for r in rows]


def read_rows(path, columns: tuple[str, ...] = ()) -> list[dict]:
    """Every row of one .jsonl/.csv file (or of rows given in Python), all splits together; UserError for a
    missing, empty or bad file."""
    if not isinstance(path, (str, Path)):
        rows = _given_rows(path, None)
        _check_columns(rows_name(path), rows, columns)
        return rows
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"dataset {path} does not exist")
    rows = _read_file(path)
    if not rows:
        raise UserError(f"dataset {path} is empty")
    _check_columns(path, rows, columns)
    return rows


def _check_columns(path, rows: list[dict], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(f"dataset {path} has no column {', '.join(repr(c) for c in missing)} (has {sorted(rows[0])})")


def _read_folder(path: Path, split: str) -> list[dict]:
    for ext in (".jsonl", ".csv"):
        if (path / f"{split}{ext}").is_file():
            return _read_file(path / f"{split}{ext}")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise UserError(f"dataset folder {path} has no {split}.jsonl/.csv and is not a saved datasets folder") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset folder {path} has no split '{split}' (has {sorted(ds)})")
        ds = ds[split]
    return ds.to_list()


def _check_split(dataset, split: str, known) -> None:
    """UserError naming the splits of `dataset` when `split` is not one of them (was a KeyError or a missing file)."""
    if split not in known:
        raise UserError(f"unknown split {split!r}: dataset {dataset} has the splits {', '.join(known)}")


def _folder_splits(path: Path) -> list[str]:
    """The splits of a folder: its `<split>.jsonl/.csv` files, else a saved DatasetDict's (dataset_dict.json)."""
    files = sorted({p.stem for ext in ("jsonl", "csv") for p in path.glob(f"*.{ext}")})
    if files or not (path / "dataset_dict.json").is_file():
        return files
    return json.loads((path / "dataset_dict.json").read_text()).get("splits", [])


def load_rows(dataset, split: str = "train", columns: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows of `dataset` (`chitchat`, a .jsonl/.csv file, a folder, or rows given in Python) that must have `columns`.

    A folder holds its splits (`train.jsonl`, `test.csv`, ... or a saved datasets folder); a single file is split
    by `split_of(row_key(row))` as the demo data is by conversation, so evaluation never scores training prompts.
    From Python, a DatasetDict (or a dict of splits) holds its splits, and a Dataset or a list of dicts is split as
    a single file is. Raises UserError naming the file for a missing file, an empty dataset or split, or a missing
    column. `split` "all" (ALL) gives every row: all of a file's rows, or every split of a folder or the demo data.
    """
    if split == ALL:
        if isinstance(dataset, Mapping):
            rows = [dict(r) for name in dataset for r in _given_rows(dataset, name)]
        elif not isinstance(dataset, str) or Path(dataset).expanduser().is_file():
            rows = read_rows(dataset, columns)
        else:
            folder = Path(dataset).expanduser()
            present = [s for s in SPLITS if dataset in ("chitchat", "default") or any(
                (folder / f"{s}{ext}").is_file() for ext in (".jsonl", ".csv"))]
            rows = [r for s in present or SPLITS for r in load_rows(dataset, s, columns)]
        _check_columns(rows_name(dataset) if not isinstance(dataset, str) else dataset, rows, columns)
        return rows
    if not isinstance(dataset, str):
        path = rows_name(dataset)
        rows = _given_rows(dataset, split)
    elif dataset in ("chitchat", "default"):
        _check_split(dataset, split, SPLITS)
        path = chitchat_folder()
        rows = read_jsonl(path / f"{split}.jsonl")
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise UserError(f"dataset {dataset} does not exist")
        if path.is_dir():
            found = _folder_splits(path)
            if found:
                _check_split(path, split, found)
            rows = _read_folder(path, split)
        else:
            _check_split(path, split, SPLITS)
            every = read_rows(path, columns)
            rows = file_splits(path, every)[split]
            if not rows:
                raise UserError(f"dataset {path}: no row falls in the {split} split ({len(every)} row(s) are too "
                                f"few to hold any out); give more rows or a folder with {split}.jsonl")
    if not rows:
        raise UserError(f"dataset {path} ({split}) is empty")
    _check_columns(path, rows, columns)
    return rows


def check_stage_data(stage: str, cfg) -> None:
    """Read the rows `stage` (evaluate, sft, ppo, seqgan, a TRL method) will read from `cfg.dataset`; UserError
    naming the file otherwise. The CLI calls it before a stage's module loads, and `rlgen run` and `rlgen compare`
    for every stage and method, so that a data error waits neither for TRL and the models nor for earlier stages."""
    if stage == "evaluate":
        load_rows(cfg.dataset, cfg.split)
    elif stage == "sft":
        load_sft_rows(cfg.dataset, "train")
    elif stage == "seqgan":
        if cfg.task == "text":  # the oracle task makes its own data
            for split in ("train", "test"):
                load_rows(cfg.dataset, split, ("prompt", "completion"))
    else:
        load_rows(cfg.dataset, "train")


def held_out_note(dataset, split: str, n: int) -> str:
    """Which prompts an evaluation used and how they were kept apart from training, for reports."""
    given = not isinstance(dataset, str)
    if isinstance(dataset, Mapping):
        how = "its own split"
    elif not given and dataset in ("chitchat", "default"):
        how = "split by a hash of the conversation id"
    elif given or Path(dataset).expanduser().is_file():  # split as `load_rows` splits it (`split_file`)
        what = "rows given in Python" if given else "a single file"
        fallback = split_file(read_rows(dataset))[1]
        how = f"{what}, split by {fallback} (too few prompts to split by their hash)" if fallback else \
            f"{what}, split by a hash of each prompt"
    else:
        how = "the folder's own split"
    if given:
        dataset = rows_name(dataset)
    if split == ALL:
        return f"the first {n} prompts of every row of {dataset} (split all: training prompts included, not held out)"
    held = "held out from training" if split != "train" else "the TRAINING prompts (not held out)"
    return f"the first {n} prompts of the {split} split of {dataset} ({how}; {held})"


def load_sft_rows(dataset, split: str = "train") -> list[dict]:
    """Rows with `text`, `messages` or `prompt` + `completion` (checked on the first row)."""
    rows = load_rows(dataset, split, columns=())
    if "text" not in rows[0] and "messages" not in rows[0] and not {"prompt", "completion"} <= set(rows[0]):
        name = dataset if isinstance(dataset, str) else rows_name(dataset)
        raise UserError(f"dataset {name} needs a 'text' column, a 'messages' column or 'prompt' and 'completion' "
                        f"columns (has {sorted(rows[0])})")
    return rows
