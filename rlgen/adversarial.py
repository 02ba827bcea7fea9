"""Adversarial rewards: a discriminator trained online while the policy trains, and its score as the reward.

The maths first, as pure functions in the style of `rlgen.core` (tensors in, `(loss, stats)` or tensors out):
- discriminator losses: `bradley_terry_loss` (GAD, Ye et al. 2025, arXiv 2511.10643: the teacher's reply to a
  prompt preferred over the student's) and `bce_loss` (SeqGAN, Yu et al. 2017: real 1, generated 0; per token
  with masks, as ScratchGAN trains its discriminator);
- reward transforms of the discriminator's scores (`TRANSFORMS`): `prob` (SeqGAN: sigmoid(D)), `maligan`
  (Che et al. 2017, TextGAN-PyTorch `maligan_instructor.py` `get_mali_reward`), `dense` (ScratchGAN, de Masson
  d'Autume et al. 2019, deepmind-research `scratchgan/losses.py` `reinforce_loss`), `bt_score` (GAD: the raw score).

Shapes: `B` the batch, `T` reply tokens; `mask: [B, T]` is 1 on real tokens, right-padded; masked positions
never reach a result. `stats` hold detached 0-dim tensors, as in `rlgen.core`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rlgen import core

D_LOSSES = ("bt", "bce")


def bradley_terry_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """GAD's discriminator loss: `mean_i -log sigmoid(real_i - fake_i)` over pairs (real and fake reply to the
    same prompt), the Bradley-Terry loss of a reward model with the real reply as the chosen one.

    Args:
        real_scores: `[B]` scalar scores of the real (teacher) replies.
        fake_scores: `[B]` scores of the policy's replies to the same prompts.

    Returns:
        `(loss, stats)`; stats: `accuracy` (share of pairs with real > fake, ties count half), `margin` (mean
        real - fake), `real_score`, `fake_score` (means).
    """
    if real_scores.shape != fake_scores.shape or real_scores.dim() != 1:
        raise ValueError(f"bradley_terry_loss pairs [B] scores, got {tuple(real_scores.shape)} and "
                         f"{tuple(fake_scores.shape)}")
    diff = real_scores - fake_scores
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        stats = {"accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(), "margin": diff.mean(),
                 "real_score": real_scores.mean(), "fake_score": fake_scores.mean()}
    return loss, {k: v.detach() for k, v in stats.items()}


def bce_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_mask: torch.Tensor | None = None,
             fake_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """SeqGAN's discriminator loss: binary cross-entropy with logits, label 1 real and 0 generated, the mean
    over all real and generated items together (sequences, or with masks real tokens: ScratchGAN's per-token
    `sequential_cross_entropy_loss`, masked).

    Args:
        real_logits: `[B]` per-sequence or `[B, T]` per-token logits of real replies.
        fake_logits: `[B']` or `[B', T']` logits of generated replies.
        real_mask, fake_mask: `[B, T]`, `[B', T']` real tokens (per-token logits only; both or neither).

    Returns:
        `(loss, stats)`; stats: `accuracy` (share of items on the right side of logit 0; 0 counts as generated,
        as `rlgen.discriminator.heldout_accuracy`), `real_score`, `fake_score` (mean logits).
    """
    if (real_mask is None) != (fake_mask is None):
        raise ValueError("bce_loss: give both masks or neither")
    if real_mask is None:
        real_mask, fake_mask = torch.ones_like(real_logits), torch.ones_like(fake_logits)
    real_ce = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none")
    fake_ce = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")
    count = real_mask.bool().sum() + fake_mask.bool().sum()
    loss = (core.masked_sum(real_ce, real_mask) + core.masked_sum(fake_ce, fake_mask)) / count
    with torch.no_grad():
        right = core.masked_sum((real_logits > 0).float(), real_mask) + core.masked_sum((fake_logits <= 0).float(),
                                                                                         fake_mask)
        stats = {"accuracy": right / count, "real_score": core.masked_mean(real_logits, real_mask),
                 "fake_score": core.masked_mean(fake_logits, fake_mask)}
    return loss, {k: v.detach() for k, v in stats.items()}


# ---- reward transforms ------------------------------------------------------------------------------------


def prob_reward(scores: torch.Tensor) -> torch.Tensor:
    """SeqGAN: `sigmoid(s)`, the discriminator's probability that the reply is real. `[B] -> [B]`."""
    return torch.sigmoid(scores)


def maligan_reward(scores: torch.Tensor) -> torch.Tensor:
    """MaliGAN's normalised importance weight, baseline subtracted, over the batch: with `D = sigmoid(s)`,
    `r = D / (1 - D)`, `r = r / sum(r)`, `r - mean(r)` (TextGAN-PyTorch `get_mali_reward`). As
    `D / (1 - D) = exp(s)`, this is `softmax(s) - 1 / B`, computed so (no overflow when D is near 1).
    `[B] -> [B]`, summing to 0."""
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=0)
    return (weights - weights.mean()).to(scores.dtype)


def dense_reward(token_scores: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """ScratchGAN's dense reward: per-token `r_t = 2 sigmoid(D_t) - 1` (in [-1, 1]; "more stable than MaskGAN's
    log D", `reinforce_loss`), and the discounted returns `R_t = sum_{s >= t} gamma^(s-t) r_s` over real tokens.

    Args:
        token_scores: `[B, T]` the discriminator's logit at each reply token (a causal D: each sees its prefix).
        mask: `[B, T]` real tokens.
        gamma: discount (ScratchGAN: 0.23 on EMNLP2017 News).

    Returns:
        `[B, T]` returns, 0 at masked positions (ScratchGAN subtracts a moving-average baseline: the RL
        estimator's job here).
    """
    return core.discounted_returns(2.0 * torch.sigmoid(token_scores) - 1.0, mask, gamma)


def bt_score_reward(scores: torch.Tensor) -> torch.Tensor:
    """GAD: the Bradley-Terry discriminator's raw score is the reward (GRPO normalises it per group). `[B] -> [B]`."""
    return scores


SEQUENCE_TRANSFORMS = {"prob": prob_reward, "maligan": maligan_reward, "bt_score": bt_score_reward}
TRANSFORMS = ("prob", "maligan", "dense", "bt_score")


def last_token_scores(token_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, T] -> [B]`: the score at each row's last real token, the sequence score of a causal discriminator
    (as a causal LM's sequence classifier pools). A row without real tokens raises."""
    last = core._last_real_index(mask)
    if (last < 0).any():
        raise ValueError("last_token_scores: a row has no real token")
    return token_scores.gather(1, last.unsqueeze(1)).squeeze(1)


def sequence_reward(transform: str, token_scores: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """One reward per reply from a causal discriminator's per-token scores `[B, T]` and `mask [B, T]`: the
    sequence transforms read the last real token's score; `dense` gives the return from the first token, `R_0`
    (the whole discounted sum, the reward a per-completion RL loop can take). `-> [B]`."""
    if transform == "dense":
        return dense_reward(token_scores, mask, gamma)[:, 0]
    if transform not in SEQUENCE_TRANSFORMS:
        raise ValueError(f"unknown reward transform {transform!r} (known: {', '.join(TRANSFORMS)})")
    return SEQUENCE_TRANSFORMS[transform](last_token_scores(token_scores, mask))
