"""A reward-model ensemble as one reward: ``ensemble(members=[spec, ...], combine='min', lam=1.0)``.

Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization", ICLR) train k reward models that
differ only in their seed and optimise a conservative combination of their scores, which mitigates
over-optimisation of a learned proxy under best-of-n and PPO: ``mean``, ``min`` (worst-case optimisation, WCO)
or ``uwo`` (uncertainty-weighted optimisation, mean - lam * intra-ensemble variance); see
:func:`rlgen.core.ensemble_reward`. Members are any reward specs (``rlgen.rewards.load_reward``): typically
reward-model folders, also rule rewards or functions.

``score_rewards`` scores an ensemble member by member and reports every member's values under
``<ensemble name>/<member name>`` besides the combined ones, so metrics get ``rewards/ensemble/<member>/mean``;
called as a plain reward (TRL's ``reward_funcs``), it returns the combined values only.
"""

import math
import numbers

import torch

from rlgen import core
from rlgen.errors import UserError

NAME = "ensemble"


def _check(members, combine, lam):
    if not members:
        raise UserError(f"{NAME}: needs at least one member")
    if combine not in core.ENSEMBLE_COMBINES:
        raise UserError(f"{NAME}: unknown combine {combine!r}; choose one of {', '.join(core.ENSEMBLE_COMBINES)}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (math.isfinite(lam) and lam >= 0):
        raise UserError(f"{NAME}: lam must be a finite number >= 0, got {lam!r}")


class RewardEnsemble:
    """A reward ``f(prompts, completions, **kwargs) -> list[float | None]`` combining the values of ``members``
    (``(name, reward)`` pairs; a repeated name gets a ``_2``, ``_3``, ... suffix) per sample.

    A member's None (it does not apply to the sample) leaves it out of that sample's combination; a sample no
    member scored gets None. Member values are validated as ``score_rewards`` validates any reward's.
    """

    def __init__(self, members, combine="mean", lam=1.0):
        from rlgen.rewards import unique_name

        _check(members, combine, lam)
        names: list[str] = []
        for name, _ in members:
            names.append(unique_name(name, names))
        self.members = [(name, fn) for name, (_, fn) in zip(names, members)]
        self.combine = combine
        self.lam = float(lam)
        self.__name__ = NAME
        self._spec = None

    @property
    def rlgen_spec(self) -> str:
        """How config.yaml records it (rlgen.config.fields.callable_name): the spec ``load_reward`` made it from, or
        for one built in Python an ``ensemble(...)`` spec of its members' recorded names."""
        if self._spec is not None:
            return self._spec
        from rlgen.config.fields import callable_name

        members = [callable_name(fn) for _, fn in self.members]
        return f"{NAME}(members={members!r}, combine={self.combine!r}, lam={self.lam!r})"

    @rlgen_spec.setter
    def rlgen_spec(self, spec: str):
        self._spec = spec

    def __repr__(self):
        return f"RewardEnsemble({[name for name, _ in self.members]!r}, combine={self.combine!r}, lam={self.lam!r})"

    @property
    def member_names(self) -> list[str]:
        return [name for name, _ in self.members]

    def member_values(self, prompts, completions, **kwargs) -> dict[str, list]:
        """Each member's validated values, as ``score_rewards``' ``per_fn``: by member name, then (for a member that
        is an ensemble itself) its own members' under ``<member>/<its member>``."""
        from rlgen.rewards import score_rewards

        return score_rewards(self.members, prompts, completions, columns=kwargs)[1]

    def combine_values(self, values: dict[str, list]) -> list[float | None]:
        """``member_values``' result -> one combined value per sample (None where no member gave one)."""
        rows = [values[name] for name in self.member_names]
        scores = torch.tensor([[0.0 if v is None else v for v in row] for row in rows], dtype=torch.float64)
        mask = torch.tensor([[v is not None for v in row] for row in rows], dtype=torch.bool)
        combined = core.ensemble_reward(scores, self.combine, self.lam, mask)  # [k, B] -> [B]
        return [None if math.isnan(v) else v for v in combined.tolist()]

    def __call__(self, prompts, completions, **kwargs):
        return self.combine_values(self.member_values(prompts, completions, **kwargs))


def ensemble(members=None, combine="mean", lam=1.0):
    """The ``ensemble`` built-in, a reward factory ``load_reward`` calls with the spec's arguments: each member
    spec loaded with ``load_reward`` (so a bad one fails now, named by its place and spec), then combined.

    ``members``: a list of reward specs (or reward callables); ``combine``: ``mean``, ``min`` or ``uwo``; ``lam``:
    UWO's variance penalty, >= 0 (the other modes ignore it).
    """
    from rlgen.rewards import load_reward

    if members is None:
        raise UserError(f"{NAME} needs members=[spec, ...], e.g. {NAME}(members=['runs/rm_0', 'runs/rm_1'])")
    if isinstance(members, (str, bytes)) or not isinstance(members, (list, tuple)):
        raise UserError(f"{NAME}: members must be a list of reward specs, got {members!r}")
    _check(members, combine, lam)  # before any member (a reward model) loads
    loaded = []
    for i, spec in enumerate(members, 1):
        if not (isinstance(spec, str) or callable(spec)):
            raise UserError(f"{NAME}: member {i} of {len(members)} is {spec!r}, not a reward spec")
        try:
            loaded.append(load_reward(spec))
        except UserError as e:
            raise UserError(f"{NAME}: member {i} of {len(members)}: {e}") from e
    return RewardEnsemble(loaded, combine, lam)
