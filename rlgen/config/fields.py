"""Config fields and building a config from a mapping: `opt` (a field with its help text, the one place help is
written) and `build_config` (known keys, field types and the config's own check, each error naming its source).

Import-light and free of the config classes, so that a config can build another in its own check.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import field

from rlgen.errors import UserError


def opt(default, help: str, **kw):
    """A config field with its help text (mutable defaults are copied per instance). `python=predicate`: the
    Python API may also give a value (or, in a list field, an item) the predicate accepts, e.g. a reward callable;
    it is kept as it is, and `recorded` names it in config.yaml."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def convert(value, tp, where: str):
    """Check/convert a YAML or CLI value to the field type `tp`; UserError naming `where` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()] if args[0] is not str else [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [convert(v, args[0], where) for v in value]
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


def is_rows(value) -> bool:
    """Whether a `dataset` value is rows given in Python: a list of dicts, a `datasets.Dataset`, or a mapping of
    split names to such rows (a `DatasetDict`); `datasets` is not imported here."""
    return isinstance(value, (list, tuple, Mapping)) or hasattr(value, "column_names")


def rows_name(rows) -> str:
    """A dataset given in Python, named for config.yaml and messages by its type, size and a hash of its rows."""
    if isinstance(rows, Mapping):
        content = {k: v.to_list() if hasattr(v, "to_list") else list(v) for k, v in rows.items()}
        size = ", ".join(f"{k}: {len(v)}" for k, v in content.items()) + " rows"
    else:
        content = rows.to_list() if hasattr(rows, "to_list") else list(rows)
        size = f"{len(content)} rows"
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"<{type(rows).__name__} given in Python: {size}, sha1 {digest}>"


def callable_name(fn) -> str:
    """A callable as a reward spec that names it: the spec `rlgen.rewards.load_reward` made it from (its
    `rlgen_spec`), else `module:qualname` (a reward file's path for a function of one), with a partial's arguments
    as `(key=value, ...)`; loadable again unless the function lives in `__main__` or a closure."""
    spec = getattr(fn, "rlgen_spec", None)
    if isinstance(spec, str):
        return spec
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"{callable_name(fn.func)}({', '.join(args)})"
    target = fn if hasattr(fn, "__qualname__") else type(fn)  # a callable instance: its class
    module = getattr(target, "__module__", None) or "?"
    if module.startswith("_rlgen_reward_"):  # a reward file, imported under this name by rlgen.rewards
        module = getattr(sys.modules.get(module), "__file__", None) or module
    return f"{module}:{target.__qualname__}"


def recorded(value):
    """`value` as config.yaml records it (YAML-safe): callables by `callable_name`, rows given in Python (a
    `datasets.Dataset` or a non-empty list of dicts) by `rows_name`, lists and mappings item by item."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if callable(value):
        return callable_name(value)
    if hasattr(value, "column_names") or (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(v, Mapping) for v in value)):
        return rows_name(value)
    if isinstance(value, Mapping):
        return {k: recorded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded(v) for v in value]
    return value


def _convert_field(f: dataclasses.Field, value, tp, where: str):
    """`convert`, except that what the field's `python` predicate accepts is kept as it is."""
    accepts = f.metadata.get("python")
    if accepts and typing.get_origin(tp) is list and isinstance(value, (list, tuple)):
        return [v if accepts(v) else convert(v, typing.get_args(tp)[0], where) for v in value]
    if accepts and accepts(value):
        return value
    return convert(value, tp, where)


# Options rlgen refuses on purpose: log-probs, KL and PPO ratios are those of temperature sampling, and these
# would make the sampling distribution differ from the one the log-probs describe (Huang et al. 2022).
REFUSED_KEYS = {
    "top_k": "rlgen samples with temperature only, so that stored log-probs, KL and PPO ratios are those of "
             "the distribution that sampled (top-k would truncate it); lower the temperature instead",
    "top_p": "rlgen samples with temperature only, so that stored log-probs, KL and PPO ratios are those of "
             "the distribution that sampled (nucleus sampling would truncate it); lower the temperature instead",
}


def near_miss(name: str, known, prefix: str = "") -> str:
    """" (did you mean 'x'?)" for the known name closest to a misspelt `name` (difflib), else ""."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


# The sections of a `rlgen run` file (rlgen.config.compare.RunConfig), named here to explain one met elsewhere.
RUN_SECTIONS = ("sft", "ppo", "seqgan", "evaluate", "compare")


def build_config(cls, values: dict, source: str):
    """Instantiate `cls` from a mapping, rejecting unknown keys, wrong types and values the config's own
    check refuses; every error names `source` and the key."""
    hints = typing.get_type_hints(cls)
    known = fields_of(cls)
    for k in values:
        if k in REFUSED_KEYS and k not in known:
            raise UserError(f"{source}: key '{k}' is not supported: {REFUSED_KEYS[k]}")
    unknown = [k for k in values if k not in known]
    if unknown and unknown[0] in RUN_SECTIONS and isinstance(values[unknown[0]], Mapping):
        k = unknown[0]
        stages = f"stages: [{k}]" if k in RUN_SECTIONS[:3] else "stages: [sft]"
        raise UserError(f"{source}: unknown key '{k}': a section, which only a `rlgen run` file has (one with "
                        f"`stages:`, e.g. `{stages}`); or put the section's keys at the top level")
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}'{near_miss(unknown[0], known)} (known keys: "
                        f"{', '.join(sorted(known))})")
    converted = {k: _convert_field(known[k], v, hints[k], f"{source}: key '{k}'") for k, v in values.items()}
    try:
        return cls(**converted)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
