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

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from rlgen import core

D_LOSSES = ("bt", "bce")
STATE_FILE = "discriminator.pt"  # in a checkpoint folder: AdversarialReward.state_dict()


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
    """One reward per reply from a causal discriminator's per-token scores `[B, T]` and `mask [B, T]` (the reply's
    tokens; positions before them, e.g. the prompt's, and after are masked): the sequence transforms read the last
    real token's score; `dense` gives the return from the first real token (the whole discounted sum, the reward
    a per-completion RL loop can take). `-> [B]`."""
    if transform == "dense":
        first = mask.bool().int().argmax(dim=1, keepdim=True)  # [B, 1]; a row without real tokens gets 0
        return dense_reward(token_scores, mask, gamma).gather(1, first).squeeze(1)
    if transform not in SEQUENCE_TRANSFORMS:
        raise ValueError(f"unknown reward transform {transform!r} (known: {', '.join(TRANSFORMS)})")
    return SEQUENCE_TRANSFORMS[transform](last_token_scores(token_scores, mask))


# ---- the discriminator: a causal LM with a score head, trained online ----------------------------------------


class AdversarialReward:
    """A discriminator that is a reward in the shared protocol and trains while the policy trains.

    D is a causal LM with a one-logit score head on every token (`rlgen.models.load_reward_base`: tiny,
    default, a folder, a Hub id in the cache; MiniLM, which pools [CLS], cannot give per-token scores). It reads
    the prompt and the reply (the chat template for conversations, as `rlgen.text.render_prompt_completion`) with
    the tokenizer's EOS appended to the reply; the reply's sequence score is the score at that EOS.

    - `d(prompts, completions, **columns)` -> one float per reply: `transform` of D's scores, in eval mode,
      without gradients (the RL loop's phase 2); their spread goes into the next `update`'s metrics.
    - `update(prompts, fakes, columns=None)`: with the real replies for the same prompts (`real_replies`: the
      dataset column `teacher`, given or seen with each (prompt, reply) when scored, or the replies of
      `teacher_model`, sampled once per prompt and kept), first D's accuracy on these fresh pairs (held out: it
      has not trained on them), then `epochs` shuffled passes of minibatches with `loss`: `bt` (GAD) or `bce`
      (SeqGAN; per token with `dense`, as ScratchGAN trains D). Under torch.distributed, gradients are averaged over the processes, so every
      replica stays the same. Returns the metrics below.
    - `state_dict()` / `load_state_dict()`: D's weights, its AdamW state, its shuffle generator, update count and
      the teacher model's replies so far, for exact resume (`save_state` / `load_state`: `STATE_FILE` in a folder).
    - The RL loop reads `d_every` (train D after every N-th policy update) and `d_warmup` (D updates on the
      starting policy's replies before the first policy update: GAD's discriminator warm-up).

    Metrics (`update`): `loss/discriminator` (mean training loss), `val/d_accuracy` (on the fresh pairs before
    training on them), `val/d_accuracy_train` (during the passes), `val/d_real_score` and `val/d_fake_score`
    (mean sequence scores of the fresh pairs), `val/d_reward_std` (spread of the last rewards given; their mean
    is the loop's `rewards/<name>/mean`), `time/d_update`.
    """

    def __init__(self, model: str = "tiny", teacher: str = "reference_completion", loss: str = "bt",
                 transform: str = "bt_score", gamma: float = 1.0, learning_rate: float = 1e-5,
                 batch_size: int = 16, epochs: int = 1, d_every: int = 1, d_warmup: int = 0, max_length: int = 256,
                 max_grad_norm: float = 1.0, teacher_model: str = "", teacher_max_new_tokens: int = 48,
                 teacher_temperature: float = 1.0, seed: int = 0, device: str | None = None):
        from rlgen.errors import UserError

        if loss not in D_LOSSES:
            raise UserError(f"adversarial: unknown loss {loss!r} (known: {', '.join(D_LOSSES)})")
        if transform not in TRANSFORMS:
            raise UserError(f"adversarial: unknown transform {transform!r} (known: {', '.join(TRANSFORMS)})")
        for name, value in (("batch_size", batch_size), ("epochs", epochs), ("d_every", d_every),
                            ("max_length", max_length)):
            if value < 1:
                raise UserError(f"adversarial: {name} must be at least 1, got {value}")
        if d_warmup < 0:
            raise UserError(f"adversarial: d_warmup must be at least 0, got {d_warmup}")
        if not 0 < gamma <= 1 or not learning_rate > 0:
            raise UserError(f"adversarial: gamma must be in (0, 1] and learning_rate > 0, got {gamma}, {learning_rate}")
        self.teacher, self.loss, self.transform, self.gamma = teacher, loss, transform, gamma
        self.batch_size, self.epochs, self.d_every, self.max_length = batch_size, epochs, d_every, max_length
        self.max_grad_norm, self.d_warmup = max_grad_norm, d_warmup
        self.__name__ = "adversarial"
        self._build(model, seed, learning_rate, device)
        self.teacher_policy = None
        if teacher_model:
            from rlgen.config import SamplingConfig
            from rlgen.policy import Policy

            self.teacher_policy = Policy.from_pretrained(teacher_model, reference=False, seed=seed).to(self.device)
            self.teacher_sampling = SamplingConfig(max_new_tokens=teacher_max_new_tokens,
                                                   temperature=teacher_temperature)
        self.teacher_replies: dict[str, str] = {}  # teacher_model's, by prompt
        self.scored_with: dict[str, str] = {}  # the teacher column's reply for each (prompt, reply) scored since update
        self.scored_columns: set[str] = set()
        self.updates = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last_rewards = torch.zeros(0)

    def _build(self, name: str, seed: int, learning_rate: float, device: str | None) -> None:
        from rlgen.errors import UserError
        from rlgen.models import load_reward_base

        model, self.tokenizer = load_reward_base(name, seed)
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise UserError(f"adversarial: model {name!r} ({type(model).__name__}) has no per-token score head; "
                            "give a causal LM (tiny, default, a folder)")
        # this process's GPU (accelerate and torchrun set it per process), else the CPU
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        self.model = model.to(self.device).float().eval()
        self.trunk = getattr(model, model.base_model_prefix)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    # -- scoring

    def _encode(self, prompts: list, replies: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids `[N, L]`, attention mask `[N, L]` and reply mask `[N, L]` (the reply's tokens and the
        appended EOS); prompts are cut from the left and replies from the right to fit `max_length`."""
        from rlgen.text import render_prompt_completion

        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        rows = []
        for prompt, reply in zip(prompts, replies):
            texts = render_prompt_completion(tok, prompt, reply)
            p = tok(texts["prompt"])["input_ids"]
            r = tok(texts["completion"], add_special_tokens=False)["input_ids"][:self.max_length - 1] + [eos]
            p = p[max(0, len(p) + len(r) - self.max_length):]
            rows.append((p, r))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        reply = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            reply[i, len(p):len(p) + len(r)] = 1
        return ids.to(self.device), attention.to(self.device), reply.to(self.device)

    def token_scores(self, prompts: list, replies: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """D's score at every position `[N, L]` (a causal D: each sees its prefix) and the reply mask `[N, L]`."""
        ids, attention, reply = self._encode(prompts, replies)
        hidden = self.trunk(input_ids=ids, attention_mask=attention).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float(), reply

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        """`transform` of D's scores of the replies, one float each; maligan normalises over the whole call."""
        self.model.eval()
        chunks = [self.token_scores(prompts[i:i + self.batch_size], completions[i:i + self.batch_size])
                  for i in range(0, len(completions), self.batch_size)]
        if not chunks:
            return []
        width = max(scores.shape[1] for scores, _ in chunks)
        scores = torch.cat([F.pad(s, (0, width - s.shape[1])) for s, _ in chunks])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in chunks])
        rewards = sequence_reward(self.transform, scores, mask, self.gamma)
        self.last_rewards = rewards.cpu()
        self.scored_columns = set(kwargs)
        if self.teacher_policy is None and self.teacher in kwargs:  # for `update`, which may get no columns
            self.scored_with.update((json.dumps([p, c]), str(r))
                                    for p, c, r in zip(prompts, completions, kwargs[self.teacher]))
        return rewards.tolist()

    # -- training

    def real_replies(self, prompts: list, fakes: list[str], columns: dict | None = None) -> list[str]:
        """The real (teacher) replies for a batch: the teacher model's (sampled once per prompt, with the global
        torch RNG), else the `teacher` column of `columns`, else the column's values that came with each (prompt,
        reply) when it was scored (so a loop that drops or reorders rows after scoring needs no columns here)."""
        from rlgen.errors import UserError

        if self.teacher_policy is not None:
            keys = [json.dumps(p) for p in prompts]
            new = [(k, p) for k, p in dict(zip(keys, prompts)).items() if k not in self.teacher_replies]
            if new:
                with torch.no_grad():
                    replies = self.teacher_policy.sample_completions([p for _, p in new], self.teacher_sampling,
                                                                     self.batch_size)
                self.teacher_replies.update(zip([k for k, _ in new], replies))
            return [self.teacher_replies[k] for k in keys]
        if columns is not None and self.teacher in columns:
            return [str(r) for r in columns[self.teacher]]
        keys = [json.dumps([p, f]) for p, f in zip(prompts, fakes)]
        if columns is not None or not all(k in self.scored_with for k in keys):
            seen = columns if columns is not None else self.scored_columns
            raise UserError(f"adversarial: the dataset has no column {self.teacher!r} of teacher replies (teacher=...; "
                            f"columns: {', '.join(sorted(k for k in seen if k != 'completion_ids')) or 'none'})")
        return [self.scored_with[k] for k in keys]

    def _loss(self, prompts: list, real: list[str], fake: list[str]) -> tuple[torch.Tensor, dict]:
        scores, mask = self.token_scores(list(prompts) + list(prompts), list(real) + list(fake))
        n = len(real)
        if self.loss == "bce" and self.transform == "dense":  # ScratchGAN: a label at every reply token
            return bce_loss(scores[:n], scores[n:], mask[:n], mask[n:])
        seq = last_token_scores(scores, mask)
        return (bradley_terry_loss if self.loss == "bt" else bce_loss)(seq[:n], seq[n:])

    def update(self, prompts: list, fakes: list[str], columns: dict | None = None) -> dict[str, float]:
        """Train D on (real, fake) replies to `prompts`; the real ones from `real_replies`."""
        import time

        start = time.perf_counter()
        real = self.real_replies(prompts, fakes, columns)
        self.scored_with.clear()
        with torch.no_grad():
            self.model.eval()
            _, held = self._loss(prompts, real, fakes)
        self.model.train()
        losses, accuracies = [], []
        for _ in range(self.epochs):
            for idx in torch.randperm(len(fakes), generator=self.generator).split(self.batch_size):
                loss, stats = self._loss([prompts[i] for i in idx], [real[i] for i in idx], [fakes[i] for i in idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(self.model)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                losses.append(loss.detach())
                accuracies.append(stats["accuracy"])
        self.model.eval()
        self.updates += 1
        return {"loss/discriminator": float(torch.stack(losses).mean()), "val/d_accuracy": float(held["accuracy"]),
                "val/d_accuracy_train": float(torch.stack(accuracies).mean()),
                "val/d_real_score": float(held["real_score"]), "val/d_fake_score": float(held["fake_score"]),
                "val/d_reward_std": float(self.last_rewards.std(unbiased=False)) if len(self.last_rewards) else 0.0,
                "time/d_update": time.perf_counter() - start}

    # -- checkpoints

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "updates": self.updates,
                "teacher_replies": dict(self.teacher_replies)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.updates = state["updates"]
        self.teacher_replies = dict(state["teacher_replies"])

    def save_state(self, folder: Path) -> None:
        torch.save(self.state_dict(), Path(folder) / STATE_FILE)

    def load_state(self, folder: Path) -> None:
        from rlgen.checkpoint import load_tensors  # weights_only: a planted pickle is refused, never run
        from rlgen.errors import UserError

        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise UserError(f"checkpoint {folder} has no {STATE_FILE}: it was written without an adversarial reward")
        self.load_state_dict(load_tensors(path, "a discriminator state"))

    def save(self, folder: Path) -> Path:
        """D as a Hugging Face folder (model and tokenizer)."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return Path(folder)


def _average_gradients(model: torch.nn.Module) -> None:
    """Mean of every gradient over the processes of a torch.distributed run (no-op in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def find_adversarial(reward_fns: list[tuple[str, object]]) -> AdversarialReward | None:
    """The one adversarial reward among `(name, fn)` pairs, or None; two are refused (one D per run)."""
    from rlgen.errors import UserError

    found = [fn for _, fn in reward_fns if isinstance(fn, AdversarialReward)]
    if len(found) > 1:
        raise UserError("reward: at most one adversarial reward per run (one discriminator trains alongside)")
    return found[0] if found else None


def share_live(reward_fns: list[tuple[str, object]], live: AdversarialReward | None) -> list[tuple[str, object]]:
    """`reward_fns` with any adversarial reward replaced by the training run's `live` one (an evaluation along
    training then scores with the discriminator as it is, not with a fresh one built from the same spec)."""
    if live is None:
        return reward_fns
    return [(name, live if isinstance(fn, AdversarialReward) else fn) for name, fn in reward_fns]
