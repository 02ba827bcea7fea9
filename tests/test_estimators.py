"""Numeric tests of rlgen.estimators: advantages, policy losses, loss aggregation and the KL loss."""

import pytest
import torch

from rlgen import core
from rlgen import estimators as E


def _batch(B=8, T=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[5, 1:] = 0
    scores = torch.randn(B, generator=g)
    token_rewards, _ = core.shape_rewards(scores, torch.randn(B, T, generator=g), torch.randn(B, T, generator=g),
                                          mask, 0.1)
    return token_rewards, scores, torch.randn(B, T, generator=g), mask


@pytest.mark.parametrize("name", sorted(E.ADVANTAGES))
def test_advantage_api_shapes(name):
    token_rewards, scores, values, mask = _batch()
    adv, returns, stats = E.ADVANTAGES[name](token_rewards, scores, values, mask, group_size=4, gamma=1.0, lam=0.95)
    assert adv.shape == mask.shape and (adv[mask == 0] == 0).all()
    assert (returns is not None) == E.needs_critic(name)
    assert stats["zero_std_groups"].ndim == 0
