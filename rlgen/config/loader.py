"""Loading configs: YAML files, `--key value` flags and `--<section>.<key> VALUE` overrides.

Precedence: dataclass defaults < `--config FILE.yaml` < `--key value` flags. Unknown keys and values of
the wrong type are UserErrors that name the key (and the file); a value the config's own check refuses is
reported with the same source. Help text lives once, in each field's metadata, and feeds `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from rlgen.config.stages import CommonConfig
from rlgen.errors import UserError


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


# Options rlgen refuses on purpose: log-probs, KL and PPO ratios are those of temperature sampling, and these
# would make the sampling distribution differ from the one the log-probs describe (Huang et al. 2022).
REFUSED_KEYS = {
    "top_k": "rlgen samples with temperature only, so that stored log-probs, KL and PPO ratios are those of "
             "the distribution that sampled (top-k would truncate it); lower the temperature instead",
    "top_p": "rlgen samples with temperature only, so that stored log-probs, KL and PPO ratios are those of "
             "the distribution that sampled (nucleus sampling would truncate it); lower the temperature instead",
}


def build_config(cls, values: dict, source: str):
    """Instantiate `cls` from a mapping, rejecting unknown keys, wrong types and values the config's own
    check refuses; every error names `source` and the key."""
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    for k in values:
        if k in REFUSED_KEYS and k not in known:
            raise UserError(f"{source}: key '{k}' is not supported: {REFUSED_KEYS[k]}")
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    converted = {k: _convert(v, hints[k], f"{source}: key '{k}'") for k, v in values.items()}
    try:
        return cls(**converted)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


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
    hints = typing.get_type_hints(cls)
    flags = {k: _convert(v, hints[k], f"--{k}") for k, v in vars(args).items() if k in _fields(cls)}
    if flags:
        source += " and flags"
    return build_config(cls, {**values, **flags}, source)


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
