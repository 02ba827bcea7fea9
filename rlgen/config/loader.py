"""Loading configs: YAML files, `--key value` flags and `--<section>.<key> VALUE` overrides.

Precedence: dataclass defaults < `--config FILE.yaml` < `--key value` flags. Unknown keys and values of
the wrong type are UserErrors that name the key (and the file); a value the config's own check refuses is
reported with the same source. Help text lives once, in each field's metadata, and feeds `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml

from rlgen.config.fields import build_config, convert, fields_of, near_miss, recorded
from rlgen.config.stages import CommonConfig
from rlgen.errors import UserError


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


def section_names(cls) -> tuple[str, ...]:
    """The fields of `cls` that hold a section of options (a mapping), set as `--<section>.<key> VALUE`."""
    hints = typing.get_type_hints(cls)
    return tuple(name for name in fields_of(cls) if hints[name] is dict)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--key` flag per field, with the field's help; defaults are suppressed so we see what was given.
    A section (a mapping) is listed as `--<section>.<key> VALUE`: its keys arrive as unknown arguments, for
    `parse_section_overrides`."""
    hints = typing.get_type_hints(cls)
    unused = getattr(cls, "UNUSED_OPTIONS", ())  # inherited options the command never reads: not listed
    for name, f in fields_of(cls).items():
        tp = hints[name]
        help_text = argparse.SUPPRESS if name in unused else f"{f.metadata.get('help', '')} (default: {_default(f)!r})"
        if tp is dict:
            parser.add_argument(f"--{name}.<key>", default=argparse.SUPPRESS, metavar="VALUE", dest=name,
                                help=f"{help_text}; each key is a flag of its own")
            continue
        kwargs = dict(default=argparse.SUPPRESS, help=help_text, metavar=name.upper())
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(tp) is list:
            kwargs.update(action="extend", nargs="+")
        parser.add_argument(f"--{name}", **kwargs)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_stage_config(cls, args: argparse.Namespace, config_path: str | None, section: str | None = None,
                       base: dict | None = None):
    """defaults < `base` (e.g. `rlgen evaluate`'s run folder settings) < YAML < flags given on the command line.

    The YAML file is either the stage's own (every key is an option of `cls`) or a `rlgen run` file (it has
    `stages`): then its common top-level keys and its `section` apply, so one experiment file serves both
    `rlgen run --config F` and `rlgen <stage> --config F`.
    """
    values: dict = dict(base or {})
    source = "command line"
    if config_path:
        data = load_yaml(config_path)
        source = f"config file {config_path}"
        if section is not None and "stages" in data:
            common = {f.name for f in dataclasses.fields(CommonConfig)} & set(fields_of(cls))
            stage_values = data.get(section) or {}
            if not isinstance(stage_values, dict):
                raise UserError(f"{source}: section '{section}' must be a mapping of key: value")
            data = {**{k: v for k, v in data.items() if k in common}, **stage_values}
            source += f", section '{section}'"
        values.update(data)
    hints = typing.get_type_hints(cls)
    flags = {k: convert(v, hints[k], f"--{k}") for k, v in vars(args).items() if k in fields_of(cls)}
    if flags:
        source += " and flags"
    return build_config(cls, {**values, **flags}, source)


def parse_section_overrides(extra: list[str], sections: tuple[str, ...], options=()) -> dict[str, dict]:
    """`--<section>.<key> VALUE` arguments (options of a run's stages or a comparison's methods) as
    {section: {key: VALUE}}; a section inside a section takes more dots (`rlgen sweep --compare.evaluate.num_prompts
    8`: {"compare": {"evaluate": {"num_prompts": "8"}}}). The values are checked later, with the section's config
    class. A misspelt flag is suggested its nearest of `options` (the command's own) or `sections`."""
    overrides: dict[str, dict] = {}
    it = iter(extra)
    for token in it:
        if not token.startswith("--") or "." not in token:
            hint = near_miss(token.lstrip("-"), options, "--") or " (section options are given as --<section>.<key> VALUE)"
            raise UserError(f"unrecognized argument {token}{hint}")
        section, key = token[2:].split(".", 1)
        if section not in sections:
            raise UserError(f"{token}: unknown section '{section}'{near_miss(section, sections)} (sections: "
                            f"{', '.join(sections)})")
        value = next(it, None)
        if value is None:
            raise UserError(f"{token} needs a value")
        *inner, key = key.split(".")
        target = overrides.setdefault(section, {})
        for name in inner:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise UserError(f"{token}: '{name}' was given a value earlier, so it takes no keys")
        if isinstance(target.get(key), dict):
            raise UserError(f"{token}: '{key}' was given keys earlier, so it takes no value")
        target[key] = value
    return overrides


def _merged(base: dict, update: dict) -> dict:
    """`base` updated by `update`, a section inside both merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def with_section_overrides(config, overrides: dict[str, dict]):
    """`config` with each section's options updated by `overrides` ({section: {key: VALUE}}, a section inside a
    section merged key by key), checked again."""
    return dataclasses.replace(config, **{k: _merged(getattr(config, k), v) for k, v in overrides.items()})


def to_dict(config) -> dict:
    """The config's values as config.yaml records them (`recorded`: a reward callable by its name, rows given in
    Python by their size and hash); no deep copy, so a loaded reward model is not copied."""
    return {f.name: recorded(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_config(config, folder: str | Path, name: str = "config.yaml") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
