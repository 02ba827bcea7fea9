"""The two SeqGAN tasks behind one interface, so that `rlgen.seqgan.train_seqgan` runs either without branches.

`OracleTask` is the paper's synthetic benchmark (Yu et al. 2017, section 5): the real data are samples of an
oracle LSTM, the generator an LSTM of the same size, D the paper's CNN over token ids [M, T].
`TextTask` is real text: the real data are the replies of `dataset`, the generator any causal LM, D a sequence
classifier over reply texts.

Each task holds its data and a `summary` (what it adds to the run's summary), and has the same methods:
- `generator(policy, resuming)`, `discriminator()`: the models (phase 1);
- `pretrain(policy)`: MLE pre-training of the generator (phase 2; a resumed run skips it);
- `positives(n)`, `negatives(policy, n)`: real and fresh generated sequences for D (phases 3 and 4d);
- `sample(policy, rollout_model, rollouts)`: a batch of B sequences with `rollout_num` (N) Monte-Carlo rollouts
  of each proper prefix (none when `rollouts` is False: reward_transform maligan scores whole sequences) (4a); `score(d, batch)`: D of those rollouts [T-1, N, B] and of the whole sequences [B] (4b);
- `evaluate(policy, d, epoch)`: the metrics of an adversarial epoch; `finish(policy, d)`: the final evaluation;
- `state_dict()`, `load_state_dict(state)`: what a checkpoint keeps of the task (JSON: summary, curves, counts).

The rollouts of one batch are batched: for the LSTM all (T-1) x N x B rollouts advance together from the
cached prefix states (h, c); for other models one cached `generate` call per prefix length covers all N x B.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rlgen import core
from rlgen.config import SamplingConfig, SeqGANConfig, SFTConfig, lora_kwargs
from rlgen.discriminator import (
    CNNDiscriminator,
    DiscriminatorReward,
    TextDiscriminator,
    heldout_accuracy,
    prob_real,
)
from rlgen.lstm import SeqGANLSTMConfig, SeqGANLSTMForCausalLM, build_oracle, build_token_tokenizer
from rlgen.oracle import oracle_metrics, temperature_sweep
from rlgen.policy import Policy, completion_mask_from_ids
from rlgen.tracking import MetricsWriter


@dataclass
class Batch:
    """One generator batch. input_ids, attention_mask [B, P + T] (prompt, then completion); completion_mask,
    logprobs [B, T] (log-probs under the distribution that sampled); sequences: ids [B, T] or B texts;
    rollouts: the Monte-Carlo completions of every proper prefix, in the task's own form."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    sequences: torch.Tensor | list[str]
    rollouts: object


# ---- Monte-Carlo rollouts ---------------------------------------------------------------------------------


@torch.no_grad()
def lstm_rollouts(model: SeqGANLSTMForCausalLM, seqs: torch.Tensor, n: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None, chunk: int = 512) -> torch.Tensor:
    """All Monte-Carlo completions of every proper prefix of seqs [B, T], as one batch.

    Returns [T-1, N, B, T]: entry [t-1, k, b] keeps seqs[b, :t] and samples positions t..T-1 from `model`.
    The prefix states (h, c) come from one teacher-forced pass; at each position p the rollouts of prefixes
    1..p (a contiguous block of p*N*B rows) advance one step together, in row chunks of `chunk`.
    """
    B, T = seqs.shape
    start = torch.full((B, 1), model.config.start_token_id, dtype=torch.long, device=seqs.device)
    h_pre, c_pre = model.states(torch.cat([start, seqs[:, :-1]], 1))  # [B, T, H]; index t predicts seqs[:, t]
    out = seqs[None, None].repeat(T - 1, n, 1, 1).view(-1, T)  # [(T-1)*N*B, T]
    H = h_pre.shape[-1]
    h = torch.zeros(T - 1, n, B, H, device=seqs.device)
    c = torch.zeros_like(h)
    h, c = h.view(-1, H), c.view(-1, H)
    block = n * B
    for p in range(1, T):
        h[(p - 1) * block:p * block] = h_pre[:, p].repeat(n, 1)  # prefix of length p starts sampling at p
        c[(p - 1) * block:p * block] = c_pre[:, p].repeat(n, 1)
        for lo in range(0, p * block, chunk):
            hi = min(lo + chunk, p * block)
            tok = core.inverse_cdf_sample(model.lm_head(h[lo:hi]), temperature, generator)
            out[lo:hi, p] = tok
            if p < T - 1:
                _, (h[lo:hi], c[lo:hi]) = model.step(tok, (h[lo:hi], c[lo:hi]))
    return out.view(T - 1, n, B, T)


@torch.no_grad()
def generate_rollout_texts(model, policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, lengths: torch.Tensor, n: int,
                           sampling: SamplingConfig) -> tuple[list[list[str]], list[torch.Tensor], int]:
    """Monte-Carlo completions of every proper prefix of each completion, with `model.generate` (any causal LM).

    prompt_ids/prompt_mask [B, P] (left-padded), completion_ids [B, T], lengths [B] (real tokens, EOS included).
    For each prefix length t = 1..T-1, one cached `generate` call continues the rows with lengths > t N times,
    sampled as the completions were (`sampling`), so a reply has at most `sampling.max_new_tokens` tokens and
    at least `sampling.min_new_tokens`, whatever the longest completion T of the batch.
    Returns, per t, the decoded texts (rows * N, row-major) and the row indices they belong to, and the number
    of tokens generated (EOS included).
    """
    texts, rows, n_tokens = [], [], 0
    T = completion_ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        for t in range(1, T):
            idx = (lengths > t).nonzero().squeeze(-1)
            if idx.numel() == 0:
                texts.append([])
                rows.append(idx)
                continue
            ids = torch.cat([prompt_ids[idx], completion_ids[idx, :t]], 1).repeat_interleave(n, 0)
            mask = torch.cat([prompt_mask[idx], torch.ones_like(completion_ids[idx, :t])], 1).repeat_interleave(n, 0)
            gen = policy.generation_config(dataclasses.replace(
                sampling, max_new_tokens=sampling.max_new_tokens - t, min_new_tokens=max(sampling.min_new_tokens - t, 0)))
            gen.output_logits = False
            with policy.model_generation_defaults_hidden(model):  # the model folder cannot change the sampling
                new = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen).sequences[:, ids.shape[1]:]
            new_mask, _ = completion_mask_from_ids(new, policy.eos_token_ids)
            n_tokens += int(new_mask.sum())
            full = torch.cat([completion_ids[idx, :t].repeat_interleave(n, 0),
                              new.masked_fill(new_mask == 0, policy.tokenizer.pad_token_id)], 1)
            decoded = policy.tokenizer.batch_decode(full, skip_special_tokens=True)
            texts.append([s.strip() for s in decoded])
            rows.append(idx)
    finally:
        model.train(was_training)
    return texts, rows, n_tokens


# ---- the tasks --------------------------------------------------------------------------------------------


class OracleTask:
    """The synthetic benchmark: 10,000 training and held-out test sequences of length T from an oracle LSTM."""

    def __init__(self, cfg: SeqGANConfig, out: Path, writer: MetricsWriter, device: torch.device,
                 g: torch.Generator, g_sample: torch.Generator):
        self.cfg, self.writer, self.device, self.g, self.g_sample = cfg, writer, device, g, g_sample
        self.T = cfg.seq_len
        oracle = build_oracle(cfg.vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.oracle_seed, cfg.oracle_params)
        train_ids, _ = oracle.sample(cfg.num_train, self.T, generator=g)
        test_ids, _ = oracle.sample(cfg.num_test, self.T, generator=g)
        uniform = torch.randint(cfg.vocab_size, (cfg.num_test, self.T), generator=g)
        self.summary: dict = {"oracle": {"nll_own_samples": oracle.nll(train_ids), "nll_uniform": oracle.nll(uniform)}}
        # The data come from the CPU generator (the same on every device); the models move to the GPU if any.
        self.oracle, self.train_ids, self.test_ids = oracle.to(device), train_ids.to(device), test_ids.to(device)
        self.curve: list[tuple[int, float]] = []  # (adversarial epoch, eval/nll_oracle)

    def generator(self, policy: Policy | None, resuming: bool = False) -> Policy:
        cfg = self.cfg
        if policy is None:
            lm = SeqGANLSTMForCausalLM(SeqGANLSTMConfig(vocab_size=cfg.vocab_size, embedding_size=cfg.embedding_size,
                                                        hidden_size=cfg.hidden_size))
            policy = Policy(lm, build_token_tokenizer(cfg.vocab_size), reference=False)  # reference: after MLE
        return policy.to(self.device)

    def discriminator(self) -> nn.Module:
        cfg = self.cfg
        return CNNDiscriminator(cfg.vocab_size, cfg.d_embedding_size, dropout=cfg.d_dropout, seq_len=self.T).to(self.device)

    def _metrics(self, policy: Policy, step: int, log: bool = True) -> dict[str, float]:
        cfg = self.cfg
        metrics = oracle_metrics(policy.base_model, self.oracle, self.test_ids, cfg.eval_samples, cfg.temperature,
                                 cfg.seed + step)
        if log:
            self.writer.log(metrics, step=step)
        return metrics

    def pretrain(self, policy: Policy) -> Policy:
        """Adam on the oracle data (the authors: minibatches of batch_size, last partial one dropped)."""
        cfg, lm, stats = self.cfg, policy.base_model, self.summary["oracle"]
        stats["nll_untrained_generator"] = self._metrics(policy, 0, log=False)["eval/nll_oracle"]
        self.writer.log({f"oracle/{k}": v for k, v in stats.items()}, step=0)
        print(f"[seqgan] oracle: own samples {stats['nll_own_samples']:.3f}, uniform {stats['nll_uniform']:.3f}, "
              f"untrained generator {stats['nll_untrained_generator']:.3f}", flush=True)
        start = time.perf_counter()
        opt = torch.optim.Adam(lm.parameters(), lr=cfg.mle_learning_rate)
        starts = torch.full((cfg.batch_size, 1), lm.config.start_token_id, dtype=torch.long, device=self.device)
        curve = []
        for epoch in tqdm(range(cfg.mle_epochs), desc="seqgan MLE", unit="epoch"):
            lm.train()
            perm = torch.randperm(cfg.num_train, generator=self.g)
            losses = []
            for lo in range(0, cfg.num_train - cfg.batch_size + 1, cfg.batch_size):
                x = self.train_ids[perm[lo:lo + cfg.batch_size]]
                logits = lm(torch.cat([starts, x[:, :-1]], 1)).logits
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
            lm.eval()
            step = epoch + 1 - cfg.mle_epochs  # MLE epochs are logged at steps <= 0
            self.writer.log({"loss/mle": sum(losses) / len(losses)}, step=step)
            if cfg.mle_eval_every and (epoch + 1) % cfg.mle_eval_every == 0 and step < 0:
                curve.append((epoch + 1, self._metrics(policy, step)["eval/nll_oracle"]))
        self.summary["s_per_mle_epoch"] = (time.perf_counter() - start) / max(cfg.mle_epochs, 1)
        self.last_eval = self._metrics(policy, 0)
        self.summary["mle"] = {"nll_oracle_curve": curve, **self.last_eval}
        print(f"[seqgan] MLE {cfg.mle_epochs} epochs ({self.summary['s_per_mle_epoch']:.1f} s/epoch): "
              f"{json.dumps(self.last_eval)}", flush=True)
        self.summary["temperature_sweep_mle"] = temperature_sweep(
            policy, cfg.eval_temperatures, oracle=self.oracle, test_ids=self.test_ids, n=cfg.eval_samples,
            seed=cfg.seed)
        return policy

    def positives(self, n: int) -> torch.Tensor:
        return self.train_ids  # the paper: all oracle training data each round

    def negatives(self, policy: Policy, n: int) -> torch.Tensor:
        return policy.base_model.sample(n, self.T, self.cfg.temperature, self.g_sample)[0]

    def sample(self, policy: Policy, rollout_model: SeqGANLSTMForCausalLM, rollouts: bool = True) -> Batch:
        cfg = self.cfg
        seqs, logprobs = policy.base_model.sample(cfg.batch_size, self.T, cfg.temperature, self.g_sample)  # [B, T]
        start = torch.full((cfg.batch_size, 1), policy.base_model.config.start_token_id, dtype=torch.long,
                           device=self.device)
        input_ids = torch.cat([start, seqs], 1)
        if rollouts:
            rollouts = lstm_rollouts(rollout_model, seqs, cfg.rollout_num, cfg.temperature, self.g_sample)
        return Batch(input_ids, torch.ones_like(input_ids), torch.ones_like(seqs), logprobs, seqs, rollouts)

    def score(self, d: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = batch.sequences.shape
        scores = prob_real(d, batch.rollouts.view(-1, T), self.cfg.score_batch_size)
        return scores.view(T - 1, self.cfg.rollout_num, B), prob_real(d, batch.sequences, self.cfg.score_batch_size)

    def evaluate(self, policy: Policy, d: nn.Module, epoch: int) -> dict[str, float]:
        """Every `eval_every` epochs and after the last: the oracle metrics, and D's accuracy on held-out oracle
        sequences against as many fresh samples (up to 1000 each)."""
        cfg = self.cfg
        if not ((cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.max_steps):
            return {}
        self.last_eval = self._metrics(policy, epoch)
        self.curve.append((epoch, self.last_eval["eval/nll_oracle"]))
        accuracy = heldout_accuracy(d, self.test_ids[:1000], self.negatives(policy, 1000))
        return {**self.last_eval, "eval/d_accuracy_heldout": accuracy}

    def finish(self, policy: Policy, d: nn.Module) -> None:
        self.summary["adv"] = {**self.last_eval, "nll_oracle_curve": self.curve}

    def state_dict(self) -> dict:
        return {"summary": self.summary, "curve": self.curve, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.summary, self.last_eval = state["summary"], state["last_eval"]
        self.curve = [tuple(point) for point in state["curve"]]  # JSON made the pairs lists


class TextTask:
    """Real replies: the prompts and completions of `dataset` (train split for training, test for evaluation)."""

    def __init__(self, cfg: SeqGANConfig, out: Path, writer: MetricsWriter, device: torch.device,
                 g: torch.Generator, g_sample: torch.Generator):
        from rlgen.data import load_rows

        self.cfg, self.out, self.writer, self.device = cfg, out, writer, device
        self.train_rows = load_rows(cfg.dataset, "train", columns=("prompt", "completion"))
        self.test_rows = load_rows(cfg.dataset, "test", columns=("prompt", "completion"))
        self.sampling = SamplingConfig.of(cfg)
        # what the generator sampled: completions, and Monte-Carlo rollouts (partial continuations); `tokens`
        # counts both
        self.generated = {"completions": 0, "tokens": 0, "rollouts": 0, "rollout_tokens": 0}
        self.summary: dict = {}

    def generator(self, policy: Policy | None, resuming: bool = False) -> Policy | None:
        """The given or loaded policy; None when the SFT stage (phase 2) loads it, unless resuming past phase 2:
        then the model SFT loads (its weights come from the checkpoint)."""
        cfg = self.cfg
        if policy is None and (cfg.mle_steps == 0 or resuming):
            policy = Policy.from_pretrained(cfg.model, **lora_kwargs(cfg), reference=cfg.mle_steps == 0, seed=cfg.seed)
        return None if policy is None else policy.to(self.device)

    def discriminator(self) -> nn.Module:
        from rlgen.models import minilm_folder

        cfg = self.cfg
        folder = minilm_folder() if cfg.discriminator in ("auto", "minilm") else Path(cfg.discriminator)
        return TextDiscriminator(str(folder), cfg.d_max_length, dropout=cfg.d_dropout).to(self.device)

    def pretrain(self, policy: Policy | None) -> Policy:
        """`mle_steps` steps of the SFT stage on the dataset's replies (none: the model as it is)."""
        cfg = self.cfg
        if cfg.mle_steps == 0:
            return policy
        from rlgen.sft import train_sft

        start = time.perf_counter()
        sft_cfg = SFTConfig(model=cfg.model, output_dir=str(self.out / "sft"), dataset=cfg.dataset,
                            max_steps=cfg.mle_steps, seed=cfg.seed, threads=cfg.threads, overwrite_output_dir=True,
                            **lora_kwargs(cfg))
        policy = train_sft(sft_cfg, policy).to(self.device)
        self.summary["s_mle"] = time.perf_counter() - start
        return policy

    def positives(self, n: int) -> list[str]:
        return [r["completion"] for r in random.sample(self.train_rows, min(n, len(self.train_rows)))]

    def negatives(self, policy: Policy, n: int) -> list[str]:
        """Replies to n random training prompts (counted in `generated`)."""
        prompts = [r["prompt"] for r in random.sample(self.train_rows, min(n, len(self.train_rows)))]
        texts = []
        for ro in policy.sample_batches(prompts, self.sampling, self.cfg.batch_size):
            texts += ro.completions
            self.generated["completions"] += len(ro.completions)
            self.generated["tokens"] += int(ro.completion_mask.sum())
        return texts

    def sample(self, policy: Policy, rollout_model, rollouts: bool = True) -> Batch:
        cfg = self.cfg
        rows = random.sample(self.train_rows, cfg.batch_size)
        ro = policy.sample([r["prompt"] for r in rows], self.sampling, with_values=False)
        lengths = ro.completion_mask.sum(1)
        texts, rows_of, n_rollout = [], [], 0
        if rollouts:
            texts, rows_of, n_rollout = generate_rollout_texts(rollout_model, policy, ro.prompt_ids, ro.prompt_mask,
                                                               ro.completion_ids, lengths, cfg.rollout_num,
                                                               self.sampling)
        self.generated["completions"] += len(ro.completions)
        self.generated["tokens"] += int(lengths.sum()) + n_rollout
        self.generated["rollouts"] += sum(map(len, texts))
        self.generated["rollout_tokens"] += n_rollout
        return Batch(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.logprobs, ro.completions,
                     (texts, rows_of))

    def score(self, d: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        n, size = self.cfg.rollout_num, self.cfg.score_batch_size
        final = prob_real(d, list(batch.sequences), size).to(self.device)
        T = batch.completion_mask.shape[1]
        scores = final[None, None].repeat(T - 1, n, 1)  # a prefix that holds EOS is the whole reply
        for t, (texts, idx) in enumerate(zip(*batch.rollouts)):
            if texts:
                scores[t][:, idx] = prob_real(d, texts, size).view(len(idx), n).T
        return scores, final

    def evaluate(self, policy: Policy, d: nn.Module, epoch: int) -> dict[str, float]:
        return {}  # the shared evaluator runs once, at the end

    def finish(self, policy: Policy, d: nn.Module) -> None:
        """The shared evaluator on `eval_num_prompts` test prompts, with D as its reward, and D's accuracy on
        their real replies against as many fresh ones."""
        cfg = self.cfg
        self.summary["generated"] = dict(self.generated)  # training only: the evaluation below samples too
        if cfg.eval_num_prompts == 0:
            return
        from rlgen.evaluation import evaluate_policy

        rows = self.test_rows[:cfg.eval_num_prompts]
        adv = evaluate_policy(policy, [r["prompt"] for r in rows], [("discriminator", DiscriminatorReward(d))],
                              self.sampling, batch_size=cfg.batch_size, output_dir=self.out)
        real = [r["completion"] for r in rows]
        adv["eval/d_accuracy"] = heldout_accuracy(d, real, self.negatives(policy, len(real)))
        self.writer.log(adv, step=cfg.max_steps)
        self.summary["adv"] = adv

    def state_dict(self) -> dict:
        return {"summary": self.summary, "generated": self.generated}

    def load_state_dict(self, state: dict) -> None:
        self.summary, self.generated = state["summary"], state["generated"]


TASKS = {"oracle": OracleTask, "text": TextTask}
