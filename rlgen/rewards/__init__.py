"""Reward protocol: load reward functions from specs, call them, validate and combine their values.

A reward is any callable ``f(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]``
(the TRL GRPO ``reward_funcs`` convention) returning one value per completion; ``None`` means the reward does
not apply to that sample. Extra keyword arguments must be accepted: every caller (PPO, the evaluator, the TRL
baselines) passes ``completion_ids`` (each completion's token ids, EOS included) and the dataset's other columns
(``reward_columns``). As in TRL, when the prompts are conversational (lists of messages) each completion is
passed as one assistant message, ``[{"role": "assistant", "content": text}]``.
"""

import ast
import functools
import importlib
import importlib.util
import inspect
import itertools
import math
import numbers
import re
import sys
import weakref
from pathlib import Path

from rlgen.adversarial import AdversarialReward
from rlgen.errors import RewardError, UserError
from rlgen.rewards.ensemble import RewardEnsemble, ensemble
from rlgen.rewards.learned import LearnedReward, folder_reward_name, is_hub_id
from rlgen.rewards.rules import (
    keyword,
    regex_match,
    repetition_penalty,
    sentiment_lexicons,
    sentiment_negative,
    sentiment_positive,
    sentiment_textblob,
    target_length,
    target_sentiment,
    toxicity_penalty,
)
from rlgen.text import is_conversation

__all__ = ["BUILTIN_REWARDS", "LearnedReward", "RewardEnsemble", "load_reward", "reward_columns", "reward_mean_metrics",
           "reward_name", "score_rewards", "scored_names"]

BUILTIN_REWARDS = {
    "sentiment_positive": sentiment_positive,
    "sentiment_negative": sentiment_negative,
    "sentiment_textblob": sentiment_textblob,
    "sentiment_lexicons": sentiment_lexicons,
    "target_length": target_length,
    "target_sentiment": target_sentiment,
    "keyword": keyword,
    "regex_match": regex_match,
    "repetition_penalty": repetition_penalty,
    "toxicity_penalty": toxicity_penalty,
    "ensemble": ensemble,  # a reward factory: ensemble(members=[spec, ...], combine=..., lam=...) -> RewardEnsemble
    # a factory: adversarial(teacher='completion', loss='bt', transform='bt_score', ...), a discriminator that
    # trains alongside the RL loop (rlgen.adversarial)
    "adversarial": AdversarialReward,
}

_SPEC = re.compile(r"([^()]*?)\s*(?:\((.*)\))?", re.DOTALL)
_module_counter = itertools.count()
_file_modules = {}  # resolved path of a reward file -> its module


def _one_line(text):
    return " ".join(str(text).split())


def _literal_kwargs(args, spec):
    """Parse ``key=literal, ...`` with ast; anything else is a UserError naming the spec."""
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError as e:
        raise UserError(f"reward spec {spec!r}: bad arguments ({e.msg}); write name(key=value, ...)") from e
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        raise UserError(
            f"reward spec {spec!r}: only keyword arguments are allowed; write name(key=value, ...)"
        )
    kwargs = {}
    for kw in call.keywords:
        if kw.arg is None or kw.arg in kwargs:
            what = "**-unpacking" if kw.arg is None else f"a repeated argument {kw.arg!r}"
            raise UserError(f"reward spec {spec!r}: {what} is not allowed")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise UserError(
                f"reward spec {spec!r}: argument {kw.arg}={ast.unparse(kw.value)} is not a literal "
                "(use numbers, strings, lists, tuples, dicts, True/False/None)"
            ) from e
    return kwargs


def _split_spec(spec):
    """``'name(a=1)'`` -> ``('name', {'a': 1})``."""
    match = _SPEC.fullmatch(spec)
    if match is None or not match.group(1).strip():
        raise UserError(f"reward spec {spec!r}: bad syntax; write name or name(key=value, ...)")
    target, args = match.groups()
    return target.strip(), ({} if args is None else _literal_kwargs(args, spec))


def _import_file(location, spec):
    """The module of a reward file, run once per process (per resolved path), like an imported module."""
    path = Path(location)
    if not path.is_file():
        raise UserError(f"reward spec {spec!r}: file not found: {location}")
    if path.resolve() in _file_modules:
        return _file_modules[path.resolve()]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_rlgen_reward_{next(_module_counter)}_{stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None:
        raise UserError(f"reward spec {spec!r}: {location} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(
            f"reward spec {spec!r}: loading {location} raised {type(e).__name__}: {_one_line(e)}"
        ) from e
    _file_modules[path.resolve()] = module
    return module


def _import_module(location, spec):
    try:
        return importlib.import_module(location)
    except ImportError as e:
        raise UserError(f"reward spec {spec!r}: cannot import module {location!r}: {_one_line(e)}") from e
    except Exception as e:
        raise UserError(
            f"reward spec {spec!r}: importing module {location!r} raised {type(e).__name__}: {_one_line(e)}"
        ) from e


def _load_attribute(target, spec):
    """``module:function`` or ``file.py:function`` -> ``(function name, callable)``."""
    location, _, attr = target.rpartition(":")
    if not location or not attr:
        raise UserError(f"reward spec {spec!r}: write module:function or path/to/file.py:function")
    is_file = location.endswith(".py") or "/" in location or "\\" in location
    module = _import_file(location, spec) if is_file else _import_module(location, spec)
    where = f"file {location}" if is_file else f"module {location}"
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as e:
        raise UserError(f"reward spec {spec!r}: {where} has no function {attr!r}") from e
    if not callable(fn):
        raise UserError(
            f"reward spec {spec!r}: {attr!r} in {where} is not callable (it is {type(fn).__name__})"
        )
    return attr.rpartition(".")[2], fn


def _check_kwargs(spec, fn, kwargs, strict):
    """Reject arguments the function does not name (strict) or cannot take at all."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p.name for p in params if p.kind in kinds and p.name not in ("prompts", "completions")]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    reserved = [k for k in kwargs if k in ("prompts", "completions")]
    unknown = reserved or [k for k in kwargs if k not in named and (strict or not takes_any)]
    if unknown:
        known = ", ".join(named) or "none"
        raise UserError(f"reward spec {spec!r}: unknown argument {unknown[0]!r} (arguments: {known})")


def _check_builtin(spec, fn, kwargs):
    """Call a built-in on an empty batch so bad argument values fail at load time, naming the spec."""
    _check_kwargs(spec, fn, kwargs, strict=True)
    try:
        fn(prompts=[], completions=[], **kwargs)
    except UserError as e:
        raise UserError(f"reward spec {spec!r}: {e}") from e
    except Exception as e:
        raise UserError(f"reward spec {spec!r}: {type(e).__name__}: {_one_line(e)}") from e


def _builtin_factory(spec, factory, kwargs):
    """Call a built-in reward factory (``ensemble``) with the spec's arguments; errors name the spec."""
    _check_kwargs(spec, factory, kwargs, strict=True)
    try:
        reward = factory(**kwargs)
    except UserError as e:
        raise UserError(f"reward spec {spec!r}: {e}") from e
    except Exception as e:
        raise UserError(f"reward spec {spec!r}: {type(e).__name__}: {_one_line(e)}") from e
    reward.rlgen_spec = spec  # config.yaml records the spec that made it (rlgen.config.fields.recorded)
    return reward


# Reward models loaded and still in use, by folder (or Hub id), its files' times and the arguments: a folder named
# by several specs (a proxy that is also an ensemble member, several ensembles over the same members) loads once,
# and scores a batch once (`LearnedReward` keeps its last call's scores); a folder written again loads again.
_LEARNED: "weakref.WeakValueDictionary[tuple, LearnedReward]" = weakref.WeakValueDictionary()


def _learned_key(target, kwargs) -> tuple:
    folder = Path(target)
    if not folder.is_dir():
        return str(target), repr(sorted(kwargs.items()))
    files = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
    return str(folder.resolve()), files, repr(sorted(kwargs.items()))


def _learned(target, kwargs, spec):
    key = _learned_key(target, kwargs)
    reward = _LEARNED.get(key)
    if reward is None:
        try:
            reward = LearnedReward(target, **kwargs)
        except TypeError as e:
            raise UserError(f"reward spec {spec!r}: bad arguments for a reward model: {_one_line(e)}") from e
        _LEARNED[key] = reward
    return reward.__name__, reward


def _is_factory(fn):
    """A target that takes neither ``prompts``/``completions`` nor ``**kwargs`` cannot be a reward (every caller
    passes them by name): it is a factory of one, such as ``trl.rewards:get_soft_overlong_punishment``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind is p.VAR_KEYWORD or p.name in ("prompts", "completions") for p in params)


def _from_factory(spec, factory, kwargs):
    """Call a reward factory with the spec's arguments, at load time; its result must be a reward callable."""
    try:
        reward = factory(**kwargs)
    except Exception as e:
        raise UserError(
            f"reward spec {spec!r}: it takes neither prompts/completions nor **kwargs, so it is called as a reward "
            f"factory, which raised {type(e).__name__}: {_one_line(e)}"
        ) from e
    if not callable(reward) or _is_factory(reward):
        got = repr(reward) if not callable(reward) else "a callable that takes neither prompts/completions nor **kwargs"
        raise UserError(
            f"reward spec {spec!r}: it takes neither prompts/completions nor **kwargs, so it is called as a reward "
            f"factory, and must return a reward f(prompts, completions, **kwargs); it returned {_one_line(got)}"
        )
    try:  # config.yaml records the spec that made it (rlgen.config.fields.recorded)
        reward.rlgen_spec = spec
    except AttributeError:
        pass
    return reward


def _bind(name, fn, kwargs):
    """Bind keyword arguments; the partial keeps a ``__name__`` because TRL logs rewards by it."""
    if not kwargs:
        return fn
    bound = functools.partial(fn, **kwargs)
    bound.__name__ = name
    return bound


def load_reward(spec):
    """Resolve a reward spec to ``(name, callable)``; a callable is taken as it is, named by its ``__name__``.

    Specs: a built-in name (see BUILTIN_REWARDS), ``package.module:function``, ``path/to/file.py:function``,
    a reward model folder or a Hub model id ``owner/name`` that is not a folder (-> LearnedReward). Each may carry literal keyword arguments, bound with
    functools.partial: ``target_length(target=30)``, ``mypkg.mod:fn(scale=2.0)``; a folder's arguments go to
    LearnedReward (``batch_size``, ``device``, ``max_length``). A ``module:function`` or file target that takes
    neither ``prompts``/``completions`` nor ``**kwargs`` is a reward factory: it is called here with the arguments
    (``trl.rewards:get_soft_overlong_punishment(max_completion_len=16, soft_punish_cache=4)``) and must return a
    reward. ``ensemble(members=[spec, ...], combine='min', lam=1.0)`` loads each member spec and combines their
    values (``rlgen.rewards.ensemble``). The name is the built-in name, the function's (or factory's) name or the
    folder name, without arguments, so it fits metric keys such as ``rewards/<name>/mean``.
    """
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    spec = spec.strip()
    if not spec:
        raise UserError("empty reward spec")
    if Path(spec).is_dir():
        return _learned(spec, {}, spec)
    target, kwargs = _split_spec(spec)
    if target in BUILTIN_REWARDS:
        name, fn = target, BUILTIN_REWARDS[target]
        if _is_factory(fn):
            return name, _builtin_factory(spec, fn, kwargs)
        _check_builtin(spec, fn, kwargs)
    elif Path(target).is_dir():
        return _learned(target, kwargs, spec)
    elif ":" in target:
        name, fn = _load_attribute(target, spec)
        _check_kwargs(spec, fn, kwargs, strict=False)
        if _is_factory(fn):
            return name, _from_factory(spec, fn, kwargs)
    elif is_hub_id(target):
        return _learned(target, kwargs, spec)
    elif "/" in target or "\\" in target:
        raise UserError(f"reward spec {spec!r}: reward model folder not found: {target}")
    else:
        known = ", ".join(BUILTIN_REWARDS)
        raise UserError(
            f"unknown reward {spec!r}: built-ins are {known}; "
            "or give module:function, path/to/file.py:function or a reward model folder"
        )
    return name, _bind(name, fn, kwargs)


def reward_name(spec) -> str:
    """The name ``load_reward(spec)`` gives a valid spec (or a callable), without loading it (no model, no file
    run)."""
    if callable(spec):
        return load_reward(spec)[0]
    spec = spec.strip()
    target = spec if Path(spec).is_dir() else _split_spec(spec)[0]
    if Path(target).is_dir():
        return folder_reward_name(target)
    if target not in BUILTIN_REWARDS and ":" in target:
        return target.rpartition(":")[2].rpartition(".")[2]
    return target


def _as_list(name, result):
    """A list/tuple or 1-D array-like (numpy, torch) as a list; RewardError otherwise."""
    if isinstance(result, (list, tuple)):
        return list(result)
    if getattr(result, "ndim", None) == 1 and hasattr(result, "tolist"):
        return result.tolist()
    raise RewardError(
        f"reward {name!r} returned {type(result).__name__}; expected a list with one float (or None) per completion"
    )


def _as_float(name, index, value):
    """A finite float, or None; RewardError naming the function, index and value otherwise."""
    if value is None:
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {name!r} returned non-numeric {value!r} ({type(value).__name__}) at index {index}"
        )
    if not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {value!r} at index {index}; rewards must be finite")
    return float(value)


def _call_reward(name, fn, prompts, completions, kwargs):
    """Call one reward and return its validated values."""
    try:
        result = fn(prompts=prompts, completions=completions, **kwargs)
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {_one_line(e)}") from e
    values = _as_list(name, result)
    if len(values) != len(completions):
        raise RewardError(
            f"reward {name!r} returned the wrong number of values: expected {len(completions)}, got {len(values)}"
        )
    return [_as_float(name, i, v) for i, v in enumerate(values)]


def _check_weights(weights, count):
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise UserError(f"reward weights: got {len(weights)} weights for {count} reward functions")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise UserError(f"reward weights: {w!r} is not a finite number")
    return [float(w) for w in weights]


def unique_name(name, taken):
    """``name``, or ``name_2``, ``name_3``, ... when a reward of that name was already scored."""
    candidates = itertools.chain([name], (f"{name}_{i}" for i in itertools.count(2)))
    return next(c for c in candidates if c not in taken)


def scored_names(reward_fns) -> list[str]:
    """The keys of ``score_rewards(reward_fns, ...)``'s ``per_fn``, in order, without calling anything: each
    reward's name (a repeated one with a ``_2``, ``_3``, ... suffix), an ensemble's followed by its members'."""
    names: list[str] = []
    for name, fn in reward_fns:
        key = unique_name(name, names)
        names.append(key)
        if isinstance(fn, RewardEnsemble):
            for member in scored_names(fn.members):
                names.append(unique_name(f"{key}/{member}", names))
    return names


def _call_ensemble(name, fn, prompts, completions, kwargs):
    """An ensemble's combined values and its members' (``{member: values}``, validated one by one)."""
    try:
        members = fn.member_values(prompts, completions, **kwargs)
    except RewardError as e:
        raise RewardError(f"reward {name!r}: {e}") from e
    return [_as_float(name, i, v) for i, v in enumerate(fn.combine_values(members))], members


_WARNED_ALL_NONE: set[str] = set()


def _warn_if_all_none(name, values):
    """One line (once per reward name and process) when a reward returned None for every completion of a batch:
    it adds nothing to the score, so a run would otherwise train silently at reward 0."""
    if values and all(v is None for v in values) and name not in _WARNED_ALL_NONE:
        from tqdm import tqdm  # write() keeps the line off a running progress bar

        _WARNED_ALL_NONE.add(name)
        tqdm.write(f"[rlgen] warning: reward {name!r} returned None for all {len(values)} completions of a batch, so it adds "
              f"nothing to their score (None means 'does not apply'); rewards/{name}/none_fraction logs the share",
              file=sys.stderr)


def score_rewards(reward_fns, prompts, completions, weights=None, columns=None):
    """Call each ``(name, fn)`` and return ``(totals, per_fn)``.

    ``totals[i]`` is the weighted sum (weights default to 1) of the values for sample i, where None contributes
    nothing; a sample every function gives None totals 0.0. ``per_fn`` maps each name to its validated values
    (floats or None); a repeated name gets a ``_2``, ``_3``, ... suffix. An ensemble (``RewardEnsemble``) is scored
    member by member: its combined values under its name, then each member's under ``<name>/<member>`` (reported,
    not added to the totals); ``scored_names`` gives the keys. Functions are called as TRL does,
    ``fn(prompts=..., completions=..., **columns)`` (``columns``: dataset column name -> one value per sample,
    ``completion_ids`` among them; a dict, so no column name can collide with this function's own arguments), so
    ``def f(completions, **kwargs)`` works too. A function that raises or returns anything but one finite number
    (or None) per completion raises RewardError naming it. Text completions of conversational prompts are passed
    as one assistant message each, as TRL passes them.
    """
    if len(prompts) != len(completions):
        raise UserError(f"score_rewards: {len(prompts)} prompts but {len(completions)} completions")
    kwargs = dict(columns or {})
    for name in ("prompts", "completions"):
        if name in kwargs:
            raise UserError(f"dataset column {name!r} collides with the reward argument {name!r}: rename it")
    if prompts and is_conversation(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    weights = _check_weights(weights, len(reward_fns))
    totals = [0.0] * len(completions)
    per_fn = {}
    for (name, fn), weight in zip(reward_fns, weights):
        key = unique_name(name, per_fn)
        if isinstance(fn, RewardEnsemble):
            values, members = _call_ensemble(name, fn, prompts, completions, kwargs)
        else:
            values, members = _call_reward(name, fn, prompts, completions, kwargs), {}
        per_fn[key] = values
        _warn_if_all_none(key, values)
        for member, member_values in members.items():
            per_fn[unique_name(f"{key}/{member}", per_fn)] = member_values
        for i, value in enumerate(values):
            if value is not None:
                totals[i] += weight * value
    return totals, per_fn


def reward_columns(rows):
    """The dataset columns reward functions get, as keyword lists (TRL's convention): all but `prompt`,
    `completion` and `completion_ids` (the sampled ones are passed instead); the dataset's own `completion` (a
    reference reply, e.g. the teacher's for `adversarial`) comes as `reference_completion`."""
    keys = [k for k in (rows[0] if rows else {}) if k not in ("prompt", "completion", "completion_ids")]
    columns = {k: [r.get(k) for r in rows] for k in keys}
    if rows and "completion" in rows[0] and "reference_completion" not in columns:
        columns["reference_completion"] = [r.get("completion") for r in rows]
    return columns


def reward_mean_metrics(per_fn):
    """``{"rewards/<name>/mean": mean of the non-None values}`` (none for a function with only None values), and
    ``rewards/<name>/none_fraction``, the share of None, for a function that returned any None. An ensemble's
    members (``<name>/<member>`` in ``per_fn``) give ``rewards/<name>/<member>/mean``."""
    metrics = {}
    for name, values in per_fn.items():
        present = [v for v in values if v is not None]
        if present:
            metrics[f"rewards/{name}/mean"] = sum(present) / len(present)
        if len(present) < len(values):
            metrics[f"rewards/{name}/none_fraction"] = (len(values) - len(present)) / len(values)
    return metrics
