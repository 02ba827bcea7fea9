"""Stage configs: one frozen dataclass per stage, loaded from YAML and overridden on the command line.

Precedence: dataclass defaults < `--config FILE.yaml` < `--key value` flags. Unknown keys and values of
the wrong type are UserErrors that name the key (and the file). Help text lives once, in each field's
metadata, and feeds `--help` and the README's option tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlgen.errors import UserError


def opt(default, help: str, **kw):
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class CommonConfig:
    """Options every stage takes."""

    model: str = opt("default", "policy model: default (embedded SmolLM2-135M-Instruct), tiny, a folder or a Hub id")
    output_dir: str = opt("runs/latest", "folder for the resolved config, metrics.jsonl and the final model")
    dataset: str = opt("chitchat", "chitchat (demo data), a .jsonl/.csv file or a folder")
    max_steps: int = opt(20, "number of optimisation steps")
    seed: int = opt(0, "random seed (each process adds its rank)")
    save_steps: int = opt(0, "save a checkpoint every N steps (0: only at the end)")
    resume_from_checkpoint: str | None = opt(None, "checkpoint folder or 'latest' to resume from")
    overwrite_output_dir: bool = opt(False, "allow writing into a non-empty output_dir")
    threads: int = opt(1, "torch intra-op threads (0: torch default; 1 is fastest on busy 2-core machines)")
    report_to: list[str] = opt([], "trackers besides metrics.jsonl: tensorboard, wandb, ...")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options shared by every stage that generates."""

    max_new_tokens: int = opt(48, "tokens to generate per completion")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same temperature)")
    top_k: int = opt(0, "top-k sampling (0: off)")
    top_p: float = opt(1.0, "nucleus sampling (1.0: off)")
    max_prompt_length: int = opt(256, "prompts are cut from the left to this many tokens")


@dataclass(frozen=True)
class LoraConfigMixin:
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "modules that get LoRA adapters")


@dataclass(frozen=True)
class RewardConfigMixin:
    reward: list[str] = opt(["sentiment_positive"], "reward(s): built-in name, package.module:fn, file.py:fn or a "
                                                     "reward-model folder; repeatable")
    reward_weights: list[float] = opt([], "one weight per reward (default: all 1.0)")


@dataclass(frozen=True)
class EvalConfig(SamplingConfig, RewardConfigMixin, CommonConfig):
    """`rlgen evaluate`: sample completions for held-out prompts and report eval/* metrics."""

    gold_reward: list[str] = opt([], "gold reward(s) reported as eval/gold/<fn>/* but never optimised "
                                     "(e.g. the scorer that labelled a learned proxy reward)")
    split: str = opt("test", "dataset split whose prompts are used")
    num_prompts: int = opt(64, "number of prompts (the first N of the split)")
    batch_size: int = opt(16, "prompts per generation batch")
    self_bleu_max_texts: int = opt(200, "self-BLEU uses at most this many completions (quadratic cost)")


@dataclass(frozen=True)
class SFTConfig(LoraConfigMixin, CommonConfig):
    """`rlgen sft`: supervised fine-tuning with TRL's SFTTrainer (full or LoRA)."""

    learning_rate: float = opt(2e-5, "peak learning rate")
    batch_size: int = opt(8, "sequences per device per step")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimiser step")
    max_length: int = opt(256, "sequences are truncated to this many tokens")
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule (transformers names)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    logging_steps: int = opt(1, "log every N steps")
    completion_only_loss: bool = opt(True, "train on completion tokens only (prompt/completion data)")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _convert(value, tp, where: str):
    """Check/convert a YAML or CLI value to the field type `tp`; UserError naming `where` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()] if args[0] is not str else [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def build_config(cls, values: dict, source: str):
    """Instantiate `cls` from a mapping, rejecting unknown keys and wrong types (naming `source`)."""
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    return cls(**{k: _convert(v, hints[k], f"{source}: key '{k}'") for k, v in values.items()})


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--key` flag per field, with the field's help; defaults are suppressed so we see what was given."""
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        tp = hints[name]
        help_text = f"{f.metadata.get('help', '')} (default: {_default(f)!r})"
        kwargs = dict(default=argparse.SUPPRESS, help=help_text, metavar=name.upper())
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(tp) is list:
            kwargs.update(action="extend", nargs="+")
        parser.add_argument(f"--{name}", **kwargs)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_stage_config(cls, args: argparse.Namespace, config_path: str | None, section: str | None = None):
    """defaults < YAML < flags given on the command line.

    The YAML file is either the stage's own (every key is an option of `cls`) or a `rlgen run` file (it has
    `stages`): then its common top-level keys and its `section` apply, so one experiment file serves both
    `rlgen run --config F` and `rlgen <stage> --config F`.
    """
    values: dict = {}
    source = "command line"
    if config_path:
        data = load_yaml(config_path)
        source = f"config file {config_path}"
        if section is not None and "stages" in data:
            common = {f.name for f in dataclasses.fields(CommonConfig)} & set(_fields(cls))
            stage_values = data.get(section) or {}
            if not isinstance(stage_values, dict):
                raise UserError(f"{source}: section '{section}' must be a mapping of key: value")
            data = {**{k: v for k, v in data.items() if k in common}, **stage_values}
            source += f", section '{section}'"
        values.update(data)
    flags = {k: v for k, v in vars(args).items() if k in _fields(cls)}
    config = build_config(cls, values, source)
    return dataclasses.replace(config, **{k: _convert(v, typing.get_type_hints(cls)[k], f"--{k}")
                                          for k, v in flags.items()})


def parse_section_overrides(extra: list[str], sections: tuple[str, ...]) -> dict[str, dict]:
    """`--<section>.<key> VALUE` arguments (options of a run's stages or a comparison's methods) as
    {section: {key: VALUE}}; the values are checked later, with the section's config class."""
    overrides: dict[str, dict] = {}
    it = iter(extra)
    for token in it:
        if not token.startswith("--") or "." not in token:
            raise UserError(f"unrecognized argument {token} (section options are given as --<section>.<key> VALUE)")
        section, key = token[2:].split(".", 1)
        if section not in sections:
            raise UserError(f"{token}: unknown section '{section}' (sections: {', '.join(sections)})")
        value = next(it, None)
        if value is None:
            raise UserError(f"{token} needs a value")
        overrides.setdefault(section, {})[key] = value
    return overrides


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, folder: str | Path, name: str = "config.yaml") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
