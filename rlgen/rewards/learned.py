"""A learned reward: a sequence-classification model (a local folder or, online, a Hub id) with one logit
scoring ``prompt + completion``, or the whole conversation (chat template) for conversational prompts."""

import json
import re
import warnings
from pathlib import Path

import torch

from rlgen.errors import UserError
from rlgen.files import is_hub_id
from rlgen.text import as_messages, is_conversation, render_conversation

NORMALISATION_FILE = "rlgen_reward.json"
_SANE_MAX_LENGTH = 1_000_000


def _one_line(text):
    return " ".join(str(text).split())


def _sane(length):
    return isinstance(length, int) and 0 < length < _SANE_MAX_LENGTH


def _read_normalisation(folder):
    """``(gain, bias)`` from the folder's rlgen_reward.json, or ``(1.0, 0.0)`` without one."""
    file = folder / NORMALISATION_FILE
    if not file.exists():
        return 1.0, 0.0
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object with 'gain' and 'bias', got {type(data).__name__}")
    values = data.get("gain", 1.0), data.get("bias", 0.0)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise UserError(
            f"{file}: 'gain' and 'bias' must be numbers, got gain={values[0]!r} bias={values[1]!r}"
        )
    return float(values[0]), float(values[1])


def _from_hub(name):
    """Tokenizer and model from the Hub (or its local cache); UserError naming the id when neither has it."""
    from huggingface_hub import constants
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlgen.files import hub_model_folder

    folder = hub_model_folder(name, "reward model")  # not cached: one line at once, not after network retries
    try:
        return AutoTokenizer.from_pretrained(folder), AutoModelForSequenceClassification.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"reward model folder not found: {name}, and the Hub model {name!r} is not in the local "
                            "Hugging Face cache (offline: HF_HUB_OFFLINE is set)") from e
        raise UserError(f"reward model folder not found: {name}, and cannot load the Hub model {name!r}: "
                        f"{_one_line(e)}") from e


def _load(path):
    """Tokenizer and one-logit classifier from a local folder or a Hub id; UserError naming it otherwise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    if is_hub_id(path):
        tokenizer, model = _from_hub(str(path))
    elif not folder.is_dir():
        raise UserError(f"reward model folder not found: {folder}")
    elif not (folder / "config.json").is_file():
        raise UserError(f"no reward model in {folder}: config.json is missing")
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load reward model from {folder}: {_one_line(e)}") from e
    if model.config.num_labels != 1:
        raise UserError(f"reward model {folder} has {model.config.num_labels} labels; a reward model needs 1")
    return tokenizer, model


def _ensure_pad_token(tokenizer, model, folder):
    """Pad with eos/sep/unk when the tokenizer has no pad token; the model must know which id that is."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"reward model {folder}: tokenizer has no pad, eos, sep or unk token to pad with")
        tokenizer.pad_token = fallback
    model.config.pad_token_id = tokenizer.pad_token_id


def scored_text(tokenizer, prompt, completion) -> str:
    """What a reward model scores: ``prompt + completion``, or for a conversational prompt the whole conversation
    (a text completion as one assistant message) rendered with the chat template, as TRL's GRPO renders it."""
    if is_conversation(prompt):
        return render_conversation(tokenizer, prompt + as_messages(completion, "assistant"))
    return prompt + completion


def folder_reward_name(path):
    """A reward model folder's reward name: its folder name, kept to ``[\\w.-]`` for metric keys."""
    return re.sub(r"[^\w.-]+", "_", Path(path).resolve().name)


class LearnedReward:
    """Scores ``prompt + completion`` with a one-logit sequence classifier: ``gain * logit + bias`` (gain and bias
    from a folder's rlgen_reward.json; 1 and 0 for a Hub id). Conversational prompts are scored as TRL's GRPO
    scores them with a reward model: the chat template of the prompt's messages followed by the completion's.

    Texts longer than the model's context are truncated on the tokenizer's truncation side, with one warning
    per call. The last call's texts and scores are kept: scored again on the same texts (an ensemble member that is
    also a reward of its own, or a member of several ensembles: `load_reward` gives one object per folder), the
    model does not run again.
    """

    def __init__(self, path, batch_size=32, device=None, max_length=None):
        folder = Path(path)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(
                f"reward model {folder}: batch_size must be a positive integer, got {batch_size!r}"
            )
        self.path = folder
        self.__name__ = folder_reward_name(folder)
        self.rlgen_spec = str(folder)  # how config.yaml records it (rlgen.config.fields.callable_name)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = _load(path)
        _ensure_pad_token(self.tokenizer, self.model, folder)
        self.tokenizer.padding_side = "right"
        self.model.to(self.device).eval()
        if max_length is not None and not _sane(max_length):
            raise UserError(
                f"reward model {folder}: max_length must be a positive integer, got {max_length!r}"
            )
        self.max_length = max_length if max_length is not None else self._context_length()
        self.gain, self.bias = _read_normalisation(folder)
        self._last: tuple[list[str], list[float]] = ([], [])  # the last call's texts and scores

    def __repr__(self):
        return f"LearnedReward({str(self.path)!r})"

    def _context_length(self):
        """The smallest sane limit among the model config and the tokenizer, or None when neither has one."""
        limits = [
            getattr(self.model.config, "max_position_embeddings", None),
            self.tokenizer.model_max_length,
        ]
        limits = [n for n in limits if _sane(n)]
        return min(limits) if limits else None

    def _warn_truncation(self, texts):
        if self.max_length is None:
            return
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        too_long = sum(n > self.max_length for n in lengths)
        if too_long:
            warnings.warn(
                f"reward model {self.__name__}: truncated {too_long} of {len(texts)} texts "
                f"to {self.max_length} tokens",
                stacklevel=3,
            )

    def _score_batch(self, texts):
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        return self.model(**enc).logits[:, 0].float().tolist()

    def __call__(self, prompts, completions, **kwargs):
        texts = [scored_text(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        if not texts:
            return []
        if texts == self._last[0]:
            return list(self._last[1])
        self._warn_truncation(texts)
        raw = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                raw.extend(self._score_batch(texts[start : start + self.batch_size]))
        scores = [self.gain * r + self.bias for r in raw]
        self._last = (texts, scores)
        return list(scores)
