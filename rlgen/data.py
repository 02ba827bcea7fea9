"""Datasets: the chit-chat demo data, user files (JSONL, CSV, `datasets` folders) and prompt rendering.

Demo data comes from the PyPI package `chitchat-dataset` (MIT licence; the Chit-Chat Challenge corpus,
about 7,000 casual English conversations). Each pair of consecutive turns becomes one row
`{"prompt": turn_i, "completion": turn_i+1}`; a turn is a speaker's consecutive messages joined by a space.
The split is by conversation: sha1(conversation id) mod 100 < 90 is train, < 95 validation, else test.
It is built on first use and cached as JSONL under the rlgen cache folder.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

from rlgen.errors import UserError

SPLITS = ("train", "validation", "test")
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


def split_of(conversation_id: str) -> str:
    bucket = int(hashlib.sha1(conversation_id.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


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
        tmp = folder / f"{split}.jsonl.tmp"
        with open(tmp, "w") as f:
            for row in split_rows:
                f.write(json.dumps(row) + "\n")
        tmp.rename(folder / f"{split}.jsonl")


def chitchat_folder() -> Path:
    from rlgen.models import cache_dir

    folder = cache_dir() / f"chitchat-{CHITCHAT_VERSION}"
    if not all((folder / f"{s}.jsonl").is_file() for s in SPLITS):
        build_chitchat(folder)
    return folder


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from e
    return rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return _read_jsonl(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise UserError(f"dataset {path}: unsupported file type (use .jsonl, .csv or a datasets folder)")


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


def load_rows(dataset: str, split: str = "train", columns: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows of `dataset` (`chitchat`, a .jsonl/.csv file, or a folder) that must have `columns`.

    A single file serves every split. Raises UserError naming the file for a missing file, an empty
    dataset or a missing column.
    """
    if dataset in ("chitchat", "default"):
        path = chitchat_folder()
        rows = _read_jsonl(path / f"{split}.jsonl")
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise UserError(f"dataset {dataset} does not exist")
        rows = _read_folder(path, split) if path.is_dir() else _read_file(path)
    if not rows:
        raise UserError(f"dataset {path} ({split}) is empty")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(f"dataset {path} has no column {', '.join(repr(c) for c in missing)} (has {sorted(rows[0])})")
    return rows


def load_sft_rows(dataset: str, split: str = "train") -> list[dict]:
    """Rows with `text`, `messages` or `prompt` + `completion` (checked on the first row)."""
    rows = load_rows(dataset, split, columns=())
    if "text" not in rows[0] and "messages" not in rows[0] and not {"prompt", "completion"} <= set(rows[0]):
        raise UserError(f"dataset {dataset} needs a 'text' column, a 'messages' column or 'prompt' and 'completion' "
                        f"columns (has {sorted(rows[0])})")
    return rows


def is_conversation(value) -> bool:
    """True for a list of chat messages (`[{"role": ..., "content": ...}]`, TRL's conversational format)."""
    from trl.data_utils import is_conversational

    return isinstance(value, list) and bool(value) and is_conversational({"prompt": value})


def prompt_of(row: dict):
    """A row's prompt: its messages when conversational, else its text."""
    return row["prompt"] if is_conversation(row["prompt"]) else str(row["prompt"])


def _chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"conversational data (lists of messages) needs a tokenizer with a chat template; "
                        f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} has none")
    return tokenizer


def render_prompt(tokenizer, text) -> str:
    """The string the model sees before its reply: the chat template when the tokenizer has one. A conversational
    prompt (a list of messages) is rendered as TRL renders it (`maybe_apply_chat_template`)."""
    if is_conversation(text):
        from trl.data_utils import maybe_apply_chat_template

        return maybe_apply_chat_template({"prompt": text}, _chat_template(tokenizer))["prompt"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


def as_messages(value, role: str) -> list[dict]:
    """`value` if it is a list of messages, else one `role` message with its text."""
    return value if is_conversation(value) else [{"role": role, "content": str(value)}]


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """A whole conversation as text, as TRL renders a `messages` row."""
    from trl.data_utils import apply_chat_template

    return apply_chat_template({"messages": messages}, _chat_template(tokenizer))["text"]


def render_prompt_completion(tokenizer, prompt, completion) -> dict[str, str]:
    """`{"prompt", "completion"}` texts: the prompt as `render_prompt` renders it, or, when either side is a list
    of messages (a text side becomes a user or assistant message), the pair as TRL renders it."""
    if not (is_conversation(prompt) or is_conversation(completion)):
        return {"prompt": render_prompt(tokenizer, str(prompt)), "completion": str(completion)}
    from trl.data_utils import maybe_apply_chat_template

    example = {"prompt": as_messages(prompt, "user"), "completion": as_messages(completion, "assistant")}
    return maybe_apply_chat_template(example, _chat_template(tokenizer))
