"""Stage 3, SeqGAN (Yu et al. 2017, "SeqGAN: Sequence Generative Adversarial Nets with Policy Gradient").

The generator is the shared `Policy`; the discriminator D is the paper's CNN over token ids (`cnn`) or a
Hugging Face sequence classifier over text (default for real text: all-MiniLM-L6-v2). One function,
`train_seqgan`, runs the numbered phases:
1. data: the oracle task samples 10,000 training (and held-out test) sequences from an oracle LSTM;
   the text task reads real replies of `dataset`.
2. MLE pre-training of the generator (oracle: Adam over the oracle data; text: the SFT stage).
3. D pre-training: `d_pretrain_rounds` x (fresh negatives, `d_pretrain_epochs` epochs over real + generated).
4. adversarial epochs: `g_steps` policy-gradient steps, each on one batch with per-token rewards
   Q(t) = mean of D over `rollout_num` Monte-Carlo completions of the prefix (eq. 4; D of the whole sequence
   at t = T) by a rollout policy (a delayed copy, theta' <- r theta' + (1 - r) theta); then `d_steps` x
   (fresh negatives, `d_epochs` epochs).
5. evaluation and save: NLL-oracle / NLL-test / own-sample NLL (oracle), or the shared evaluator (text).

The rollouts of one batch are batched: for the LSTM all (T-1) x N x B rollouts advance together from the
cached prefix states (h, c), and D scores them in large chunks; for other models one cached `generate` call
per prefix length covers all N x B rollouts. The policy-gradient maths lives in `rlgen.core`.

Oracle metrics (`eval/*`): nll_oracle = mean per-token NLL of generator samples under the oracle (the
paper's metric); nll_test = generator NLL of held-out oracle samples; nll_self = generator NLL of its own
samples (its entropy rate). `temperature_sweep` gives the same metrics for a generator sampled at lower
temperatures, to compare SeqGAN with MLE at matched entropy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlgen import core
from rlgen.config import SamplingConfig, SeqGANConfig, SFTConfig, apply_preset, lora_kwargs, save_config
from rlgen.errors import UserError
from rlgen.lstm import SeqGANLSTMConfig, SeqGANLSTMForCausalLM, build_oracle, build_token_tokenizer
from rlgen.models import default_device, minilm_folder, set_threads
from rlgen.policy import Policy, completion_mask_from_ids
from rlgen.tracking import MetricsWriter, prepare_output_dir

# The paper's discriminator (authors' discriminator.py): window sizes and filter counts, 1720 features.
CNN_WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20]
CNN_FILTERS = [100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160]

# ---- discriminators ---------------------------------------------------------------------------------------


class CNNDiscriminator(nn.Module):
    """The paper's D: embedding, convolutions of several widths with max-over-time pooling, a highway layer
    (Srivastava et al. 2015), dropout and a 2-way output (class 1 = real). Input ids [M, L], L >= 1."""

    def __init__(self, vocab_size: int, embedding_size: int = 64, widths=tuple(CNN_WIDTHS),
                 filters=tuple(CNN_FILTERS), dropout: float = 0.25, seq_len: int | None = None):
        super().__init__()
        self.spec = dict(vocab_size=vocab_size, embedding_size=embedding_size, widths=list(widths),
                         filters=list(filters), dropout=dropout, seq_len=seq_len)
        kept = [(w, f) for w, f in zip(widths, filters) if seq_len is None or w <= seq_len]
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_size, f, w) for w, f in kept)
        features = sum(f for _, f in kept)
        self.highway = nn.Linear(features, 2 * features)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(features, 2)
        with torch.no_grad():  # the authors' init: embedding U(-1, 1), conv N(0, 0.1) truncated, bias 0.1
            self.embedding.weight.uniform_(-1.0, 1.0)
            for conv in self.convs:
                nn.init.trunc_normal_(conv.weight, std=0.1, a=-0.2, b=0.2)
                conv.bias.fill_(0.1)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [M, L] -> logits [M, 2]."""
        x = self.embedding(ids).transpose(1, 2)  # [M, E, L]
        feats = torch.cat([conv(x).relu_().amax(dim=-1) for conv in self.convs], dim=1)  # [M, F]
        transform, gate = self.highway(feats).chunk(2, dim=-1)
        gate = torch.sigmoid(gate)
        feats = gate * torch.relu(transform) + (1.0 - gate) * feats
        return self.out(self.dropout(feats))

    def l2_penalty(self) -> torch.Tensor:
        """tf.nn.l2_loss of the output layer: sum(w^2) / 2 + sum(b^2) / 2."""
        return 0.5 * (self.out.weight.square().sum() + self.out.bias.square().sum())

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cnn_discriminator.json").write_text(json.dumps(self.spec))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return folder


class TextDiscriminator(nn.Module):
    """A Hugging Face sequence classifier (2 labels, class 1 = real) over reply texts."""

    def __init__(self, folder: str, max_length: int = 64, dropout: float | None = None):
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        extra = {} if dropout is None else {"classifier_dropout": dropout}
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32,
                                                                            **extra)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"discriminator {folder}: cannot load a sequence classifier ({str(e).splitlines()[0]})") from e
        self.max_length = max_length

    def logits(self, texts: list[str]) -> torch.Tensor:
        """texts (M) -> logits [M, 2]."""
        enc = self.tokenizer([t if t.strip() else "." for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return self.model(**enc.to(self.model.device)).logits.float()

    def l2_penalty(self) -> torch.Tensor:
        head = self.model.classifier
        return 0.5 * (head.weight.square().sum() + head.bias.square().sum())

    def save(self, folder: str | Path) -> Path:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return Path(folder)


def load_discriminator(folder: str | Path) -> nn.Module:
    """A saved CNNDiscriminator or sequence-classifier folder, in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"discriminator folder {folder} does not exist")
    if (folder / "cnn_discriminator.json").is_file():
        from safetensors.torch import load_file

        d = CNNDiscriminator(**json.loads((folder / "cnn_discriminator.json").read_text()))
        d.load_state_dict(load_file(str(folder / "model.safetensors")))
        return d.eval()
    return TextDiscriminator(str(folder)).eval()


@torch.no_grad()
def prob_real(d: nn.Module, batch, batch_size: int = 2048) -> torch.Tensor:
    """D's probability that each sequence is real. batch: ids [M, L] (cnn) or M texts -> [M], in eval mode."""
    was_training = d.training
    d.eval()
    try:
        out = [torch.softmax(d.logits(batch[i:i + batch_size]), dim=-1)[:, 1] for i in range(0, len(batch), batch_size)]
    finally:
        d.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


class DiscriminatorReward:
    """D as a reward in the shared protocol: `f(prompts, completions, **kw) -> list[float]`, P(real) per reply.

    For the CNN, completions are decimal token ids ("17 4032 ...", as the LSTM policy's tokenizer decodes
    them) cut or padded (with token 0) to the CNN's sequence length.
    """

    def __init__(self, d: nn.Module, batch_size: int = 256):
        self.d = d
        self.batch_size = batch_size
        self.__name__ = "discriminator"

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        if not isinstance(self.d, CNNDiscriminator):
            return prob_real(self.d, list(completions), self.batch_size).tolist()
        length = self.d.spec["seq_len"] or max(self.d.spec["widths"])
        rows = []
        for text in completions:
            ids = [int(w) for w in text.split() if w.isdigit()][:length]
            rows.append(ids + [0] * (length - len(ids)))
        ids = torch.tensor(rows, dtype=torch.long, device=next(self.d.parameters()).device).view(-1, length)
        return prob_real(self.d, ids, self.batch_size).tolist()


@functools.lru_cache(maxsize=4)
def _cached_discriminator(folder: str) -> nn.Module:
    return load_discriminator(folder)


def discriminator(prompts: list[str], completions: list[str], folder: str = "", **kwargs) -> list[float]:
    """Reward spec form: `rlgen.seqgan:discriminator(folder='runs/seqgan/discriminator')`."""
    if not folder:
        raise UserError("reward rlgen.seqgan:discriminator needs folder='<output_dir>/discriminator'")
    return DiscriminatorReward(_cached_discriminator(folder))(prompts, completions)


def _take(data, idx: torch.Tensor):
    return data[idx] if isinstance(data, torch.Tensor) else [data[i] for i in idx.tolist()]


def _join(pos, neg):
    return torch.cat([pos, neg]) if isinstance(pos, torch.Tensor) else list(pos) + list(neg)


def train_discriminator(d: nn.Module, optimizer, pos, neg, epochs: int, batch_size: int, l2: float,
                        generator: torch.Generator) -> dict[str, float]:
    """`epochs` passes over real (label 1) + generated (label 0) sequences, shuffled, minibatches of
    `batch_size`; cross-entropy + l2 * output-layer L2. pos/neg: ids [M, L] or lists of texts.
    Returns the last epoch's mean loss and accuracy."""
    data = _join(pos, neg)
    labels = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
    labels = labels.to(next(d.parameters()).device)  # the shuffles stay on the CPU generator
    d.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        perm = torch.randperm(len(labels), generator=generator)
        for lo in range(0, len(perm), batch_size):
            idx = perm[lo:lo + batch_size]
            logits = d.logits(_take(data, idx))
            y = labels[idx]
            loss = nn.functional.cross_entropy(logits, y) + l2 * d.l2_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
    d.eval()
    return {"loss/d": loss_sum / max(seen, 1), "val/d_accuracy_train": correct / max(seen, 1)}


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
                           temperature: float = 1.0) -> tuple[list[list[str]], list[torch.Tensor], int]:
    """Monte-Carlo completions of every proper prefix of each completion, with `model.generate` (any causal LM).

    prompt_ids/prompt_mask [B, P] (left-padded), completion_ids [B, T], lengths [B] (real tokens, EOS included).
    For each prefix length t = 1..T-1, one cached `generate` call continues the rows with lengths > t N times.
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
            gen = policy.generation_config(SamplingConfig(max_new_tokens=T - t, temperature=temperature))
            gen.output_logits = False
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


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """theta' <- rate * theta' + (1 - rate) * theta (the paper's delayed rollout policy, rate 0.8)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(rate).add_(s.detach(), alpha=1.0 - rate)


# ---- oracle evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def oracle_metrics(model: SeqGANLSTMForCausalLM, oracle: SeqGANLSTMForCausalLM, test_ids: torch.Tensor,
                   n: int, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """eval/nll_oracle (oracle NLL of n generator samples), eval/nll_test (NLL of held-out oracle samples) and
    eval/nll_self (NLL of the generator's own samples: its entropy rate), the last two under the generator
    sampled at `temperature` (softmax(logits / temperature))."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    samples, logps = model.sample(n, test_ids.shape[1], temperature, g)
    return {"eval/nll_oracle": oracle.nll(samples), "eval/nll_test": model.nll(test_ids, temperature),
            "eval/nll_self": float(-logps.mean())}


def temperature_sweep(policy: Policy, temperatures: list[float], *, oracle: SeqGANLSTMForCausalLM | None = None,
                      test_ids: torch.Tensor | None = None, n: int = 10000, prompts: list[str] | None = None,
                      reward_fns: list[tuple[str, object]] = (), sampling: SamplingConfig | None = None,
                      seed: int = 0) -> list[dict[str, float]]:
    """The generator sampled at each temperature: an entropy-matched control for adversarial training.

    LSTM generators with an oracle get `oracle_metrics` (nll_oracle / nll_test / nll_self); any other policy
    gets the shared evaluator (`evaluate_policy`) on `prompts` at each temperature. One dict per temperature.
    """
    rows = []
    for temp in temperatures:
        if isinstance(policy.base_model, SeqGANLSTMForCausalLM) and oracle is not None:
            metrics = oracle_metrics(policy.base_model, oracle, test_ids, n, temp, seed)
        else:
            from rlgen.evaluation import evaluate_policy

            settings = dataclasses.replace(sampling or SamplingConfig(), temperature=temp)
            metrics = evaluate_policy(policy, list(prompts or []), list(reward_fns), settings)
        rows.append({"temperature": temp, **metrics})
    return rows


# ---- the stage --------------------------------------------------------------------------------------------


@dataclass
class SeqGANResult:
    """The trained generator and discriminator and a summary of the run (timings, before/after metrics)."""

    policy: Policy
    discriminator: nn.Module
    summary: dict


def _timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def train_seqgan(cfg: SeqGANConfig, policy: Policy | None = None) -> SeqGANResult:
    """Run SeqGAN on `cfg.task`; save the generator to `cfg.output_dir` and D to `<output_dir>/discriminator`."""
    # 0. setup: preset, checks, threads, seeds, output folder
    cfg = apply_preset(cfg)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # data, shuffles; sampling uses g_sample (g itself on the CPU)
    device = default_device()
    g_sample = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out)
    writer = MetricsWriter(out)
    oracle_task = cfg.task == "oracle"
    total = _timer()
    summary: dict = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("report_to",)}}
    T = cfg.seq_len if oracle_task else cfg.max_new_tokens
    sampling = SamplingConfig.of(cfg)

    # 1. data and models: oracle + its samples (oracle task) or real replies (text task); generator; D
    if oracle_task:
        oracle = build_oracle(cfg.vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.oracle_seed, cfg.oracle_params)
        train_ids, _ = oracle.sample(cfg.num_train, T, generator=g)
        test_ids, _ = oracle.sample(cfg.num_test, T, generator=g)
        uniform = torch.randint(cfg.vocab_size, (cfg.num_test, T), generator=g)
        summary["oracle"] = {"nll_own_samples": oracle.nll(train_ids), "nll_uniform": oracle.nll(uniform)}
        # The data come from the CPU generator (the same on every device); the models move to the GPU if any.
        oracle, train_ids, test_ids = oracle.to(device), train_ids.to(device), test_ids.to(device)
        if policy is None:
            lm = SeqGANLSTMForCausalLM(SeqGANLSTMConfig(vocab_size=cfg.vocab_size, embedding_size=cfg.embedding_size,
                                                        hidden_size=cfg.hidden_size))
            policy = Policy(lm, build_token_tokenizer(cfg.vocab_size), reference=False)  # reference: after MLE
        policy.to(device)
        d = CNNDiscriminator(cfg.vocab_size, cfg.d_embedding_size, dropout=cfg.d_dropout, seq_len=T).to(device)
        summary["oracle"]["nll_untrained_generator"] = oracle_metrics(policy.base_model, oracle, test_ids,
                                                                      cfg.eval_samples, seed=cfg.seed)["eval/nll_oracle"]
        writer.log({f"oracle/{k}": v for k, v in summary["oracle"].items()}, step=0)
        print(f"[seqgan] oracle: own samples {summary['oracle']['nll_own_samples']:.3f}, uniform "
              f"{summary['oracle']['nll_uniform']:.3f}, untrained generator "
              f"{summary['oracle']['nll_untrained_generator']:.3f}", flush=True)
    else:
        from rlgen.data import load_rows

        train_rows = load_rows(cfg.dataset, "train", columns=("prompt", "completion"))
        test_rows = load_rows(cfg.dataset, "test", columns=("prompt", "completion"))
        if policy is None and cfg.mle_steps == 0:
            policy = Policy.from_pretrained(cfg.model, **lora_kwargs(cfg), reference=True, seed=cfg.seed)
        if policy is not None:
            policy.to(device)
        folder = minilm_folder() if cfg.discriminator in ("auto", "minilm") else Path(cfg.discriminator)
        d = TextDiscriminator(str(folder), cfg.d_max_length, dropout=cfg.d_dropout).to(device)

    generated = {"completions": 0, "tokens": 0, "rollout_tokens": 0}  # what the generator sampled (text task)

    def negatives(n: int):
        """n fresh generator samples: ids [n, T] (oracle) or reply texts (text)."""
        if oracle_task:
            return policy.base_model.sample(n, T, cfg.temperature, g_sample)[0]
        prompts = [r["prompt"] for r in random.sample(train_rows, min(n, len(train_rows)))]
        texts = []
        for ro in policy.sample_batches(prompts, sampling, cfg.batch_size):
            texts += ro.completions
            generated["completions"] += len(ro.completions)
            generated["tokens"] += int(ro.completion_mask.sum())
        return texts

    def positives(n: int):
        if oracle_task:
            return train_ids  # the paper: all oracle training data each round
        return [r["completion"] for r in random.sample(train_rows, min(n, len(train_rows)))]

    def evaluate(step: int) -> dict[str, float]:
        metrics = oracle_metrics(policy.base_model, oracle, test_ids, cfg.eval_samples, cfg.temperature, cfg.seed + step)
        writer.log(metrics, step=step)
        return metrics

    # 2. MLE pre-training of the generator
    clock = _timer()
    if oracle_task:
        lm = policy.base_model
        opt_mle = torch.optim.Adam(lm.parameters(), lr=cfg.mle_learning_rate)
        starts = torch.full((cfg.batch_size, 1), lm.config.start_token_id, dtype=torch.long, device=device)
        curve = []
        for epoch in range(cfg.mle_epochs):
            lm.train()
            perm = torch.randperm(cfg.num_train, generator=g)
            losses = []
            for lo in range(0, cfg.num_train - cfg.batch_size + 1, cfg.batch_size):  # drop_last, as the authors
                x = train_ids[perm[lo:lo + cfg.batch_size]]
                logits = lm(torch.cat([starts, x[:, :-1]], 1)).logits
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
                opt_mle.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
                opt_mle.step()
                losses.append(float(loss.detach()))
            lm.eval()
            step = epoch + 1 - cfg.mle_epochs  # MLE epochs are logged at steps <= 0
            writer.log({"loss/mle": sum(losses) / len(losses)}, step=step)
            if cfg.mle_eval_every and (epoch + 1) % cfg.mle_eval_every == 0 and step < 0:
                curve.append((epoch + 1, evaluate(step)["eval/nll_oracle"]))
        summary["s_per_mle_epoch"] = clock() / max(cfg.mle_epochs, 1)
        start_metrics = last_eval = evaluate(0)
        summary["mle"] = {"nll_oracle_curve": curve, **start_metrics}
        print(f"[seqgan] MLE {cfg.mle_epochs} epochs ({summary['s_per_mle_epoch']:.1f} s/epoch): "
              f"{json.dumps(start_metrics)}", flush=True)
        summary["temperature_sweep_mle"] = temperature_sweep(policy, cfg.eval_temperatures, oracle=oracle,
                                                             test_ids=test_ids, n=cfg.eval_samples, seed=cfg.seed)
    elif cfg.mle_steps > 0:
        from rlgen.sft import train_sft

        sft_cfg = SFTConfig(model=cfg.model, output_dir=str(out / "sft"), dataset=cfg.dataset, max_steps=cfg.mle_steps,
                            seed=cfg.seed, threads=cfg.threads, overwrite_output_dir=True, **lora_kwargs(cfg))
        policy = train_sft(sft_cfg, policy).to(device)
        summary["s_mle"] = clock()
    if policy.ref_model is None and not policy.is_peft and cfg.kl_coef > 0:
        policy.ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)  # reference = MLE generator

    # 3. D pre-training on real vs fresh generated sequences
    opt_d = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=cfg.d_learning_rate)
    clock = _timer()
    for rnd in range(cfg.d_pretrain_rounds):
        stats = train_discriminator(d, opt_d, positives(cfg.d_negatives), negatives(cfg.d_negatives),
                                    cfg.d_pretrain_epochs, cfg.batch_size, cfg.d_l2, g)
        writer.log({f"d_pretrain/{k}": v for k, v in stats.items()}, step=rnd + 1)
    summary["s_per_d_pretrain_round"] = clock() / max(cfg.d_pretrain_rounds, 1)
    print(f"[seqgan] D pre-training {cfg.d_pretrain_rounds} rounds "
          f"({summary['s_per_d_pretrain_round']:.1f} s/round)", flush=True)

    # 4. adversarial epochs: g-steps (MC-rollout rewards, policy gradient), then d-steps
    rollout_model = policy.model
    if cfg.rollout_update_rate > 0:
        rollout_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params, lr=cfg.learning_rate)
    times = {"rollout": 0.0, "score": 0.0, "update": 0.0, "d_step": 0.0, "eval": 0.0}
    n_g = n_d = 0
    adv_curve: list[tuple[int, float]] = []
    adv_clock = _timer()
    for epoch in range(1, cfg.max_steps + 1):
        row: dict[str, float] = {}
        for _ in range(cfg.g_steps):
            # 4a. sample a batch and its Monte-Carlo rollouts (rollout policy)
            clock = _timer()
            if oracle_task:
                seqs, old_lp = policy.base_model.sample(cfg.batch_size, T, cfg.temperature, g_sample)  # [B, T]
                starts = torch.full((cfg.batch_size, 1), policy.base_model.config.start_token_id, dtype=torch.long,
                                    device=device)
                input_ids = torch.cat([starts, seqs], 1)
                attention = torch.ones_like(input_ids)
                mask = torch.ones_like(seqs)
                rolls = lstm_rollouts(rollout_model, seqs, cfg.rollout_num, cfg.temperature, g_sample)  # [T-1, N, B, T]
            else:
                batch_rows = random.sample(train_rows, cfg.batch_size)
                ro = policy.sample([r["prompt"] for r in batch_rows], sampling, with_values=False)
                input_ids, attention, mask, old_lp = ro.input_ids, ro.attention_mask, ro.completion_mask, ro.logprobs
                T_b = ro.completion_ids.shape[1]
                lengths = mask.sum(1)
                texts, rows_of, n_rollout = generate_rollout_texts(rollout_model, policy, ro.prompt_ids,
                                                                   ro.prompt_mask, ro.completion_ids, lengths,
                                                                   cfg.rollout_num, cfg.temperature)
                generated["completions"] += len(ro.completions)
                generated["tokens"] += int(lengths.sum()) + n_rollout
                generated["rollout_tokens"] += n_rollout
            times["rollout"] += clock()
            # 4b. score: Q(t) = mean_n D(rollout_n of prefix t), D(whole sequence) at t = T (eq. 4)
            clock = _timer()
            if oracle_task:
                B = cfg.batch_size
                scores = prob_real(d, rolls.view(-1, T), cfg.score_batch_size).view(T - 1, cfg.rollout_num, B)
                final = prob_real(d, seqs, cfg.score_batch_size)
            else:
                B = len(batch_rows)
                final = torch.tensor(DiscriminatorReward(d, cfg.score_batch_size)(ro.prompts, ro.completions),
                                     device=device)
                scores = final[None, None].repeat(T_b - 1, cfg.rollout_num, 1)  # prefixes holding EOS are done
                for t, (tx, idx) in enumerate(zip(texts, rows_of)):
                    if tx:
                        scores[t][:, idx] = prob_real(d, tx, cfg.score_batch_size).view(len(idx), cfg.rollout_num).T
            q = core.monte_carlo_q_values(scores, final)  # [B, T]
            advantages = q - core.masked_mean(q, mask, dim=0) if cfg.baseline == "mean" else q
            if cfg.kl_coef > 0:
                ref_lp = policy.ref_logprobs(input_ids, attention, mask.shape[1], cfg.temperature)
                kl = core.kl_estimate(old_lp, ref_lp, "k1")
                advantages = advantages - cfg.kl_coef * core.discounted_returns(kl, mask)
                row["objective/kl"] = float(core.masked_sum(kl, mask) / B)
            times["score"] += clock()
            # 4c. policy-gradient update on the per-token rewards (eval mode, as the PPO stage: no dropout noise)
            clock = _timer()
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN's LSTM backward refuses eval mode
                logprobs, _, _ = policy(input_ids, attention, mask.shape[1], temperature=cfg.temperature,
                                        with_values=False)
            loss, stats = core.policy_gradient_loss(logprobs, advantages, mask)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt_g.step()
            if cfg.rollout_update_rate > 0:
                ema_update(rollout_model, policy.model, cfg.rollout_update_rate)
            times["update"] += clock()
            n_g += 1
            row.update({"loss/policy": float(loss.detach()), "objective/q_mean": float(core.masked_mean(q, mask)),
                        "objective/q_last": float(final.mean()), "policy/grad_norm": float(grad_norm),
                        "policy/logprob_mean": float(stats["logprob_mean"])})
        # 4d. D steps on fresh negatives
        clock = _timer()
        for _ in range(cfg.d_steps):
            row.update(train_discriminator(d, opt_d, positives(cfg.d_negatives), negatives(cfg.d_negatives),
                                           cfg.d_epochs, cfg.batch_size, cfg.d_l2, g))
            n_d += 1
        times["d_step"] += clock()
        clock = _timer()
        if oracle_task and ((cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.max_steps):
            last_eval = evaluate(epoch)
            row.update(last_eval)
            adv_curve.append((epoch, last_eval["eval/nll_oracle"]))
            held_out = torch.cat([test_ids[:1000], negatives(1000)])
            correct = torch.cat([prob_real(d, held_out[:1000]) > 0.5, prob_real(d, held_out[1000:]) <= 0.5])
            row["eval/d_accuracy_heldout"] = float(correct.float().mean())
        times["eval"] += clock()
        row["time/adv_epoch"] = adv_clock() / epoch
        writer.log(row, step=epoch)
        print(f"[seqgan] adv epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)

    # 5. final evaluation and save
    summary["s_adv_total"] = adv_clock()
    summary["s_per_adv_epoch"] = adv_clock() / max(cfg.max_steps, 1)
    summary["s_per_g_step"] = (times["rollout"] + times["score"] + times["update"]) / max(n_g, 1)
    summary["s_per_d_step"] = times["d_step"] / max(n_d, 1)
    summary["g_step_split"] = {k: times[k] / max(n_g, 1) for k in ("rollout", "score", "update")}
    summary["s_eval_total"] = times["eval"]
    if not oracle_task:
        summary["generated"] = dict(generated)  # training only: the evaluation below samples too
    if oracle_task:
        summary["adv"] = {**last_eval, "nll_oracle_curve": adv_curve}
    elif cfg.eval_num_prompts > 0:
        from rlgen.evaluation import evaluate_policy

        test_prompts = [r["prompt"] for r in test_rows[:cfg.eval_num_prompts]]
        summary["adv"] = evaluate_policy(policy, test_prompts, [("discriminator", DiscriminatorReward(d))], sampling,
                                         batch_size=cfg.batch_size, output_dir=out)
        real = [r["completion"] for r in test_rows[:cfg.eval_num_prompts]]
        fake = negatives(len(real))
        correct = torch.cat([prob_real(d, real) > 0.5, prob_real(d, fake) <= 0.5])
        summary["adv"]["eval/d_accuracy"] = float(correct.float().mean())
        writer.log(summary["adv"], step=cfg.max_steps)
    policy.save(out)
    d.save(out / "discriminator")
    summary["s_total"] = total()
    (out / "seqgan_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[seqgan] done in {summary['s_total'] / 60:.1f} min; summary in {out / 'seqgan_summary.json'}", flush=True)
    return SeqGANResult(policy, d, summary)
