"""SeqGAN's discriminator D (Yu et al. 2017): the paper's CNN over token ids or any sequence classifier over
text, its training on real (label 1) vs generated (label 0) sequences, and D as a reward callable.

`prob_real(d, batch)` is D's probability that each sequence is real; `DiscriminatorReward` wraps it in the
shared reward protocol, and the spec `rlgen.seqgan:discriminator(folder=...)` loads a saved D as a reward.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from rlgen.errors import UserError

# The paper's discriminator (authors' discriminator.py): window sizes and filter counts, 1720 features.
CNN_WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20]
CNN_FILTERS = [100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160]


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
        return l2_loss(self.out)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cnn_discriminator.json").write_text(json.dumps(self.spec))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return folder


def l2_loss(layer: nn.Linear) -> torch.Tensor:
    """tf.nn.l2_loss of a linear layer (the paper's penalty on D's output layer): sum(w^2) / 2 + sum(b^2) / 2
    (no bias: sum(w^2) / 2)."""
    total = layer.weight.square().sum()
    if layer.bias is not None:
        total = total + layer.bias.square().sum()
    return 0.5 * total


def output_layer_name(model: nn.Module, num_labels: int) -> str:
    """The name of a sequence classifier's output layer: its last Linear with `num_labels` outputs (BERT's
    `classifier`, RoBERTa's `classifier.out_proj`, a causal LM's `score`)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not names:
        raise UserError(f"discriminator {type(model).__name__}: no linear output layer with {num_labels} outputs")
    return names[-1]


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
        if self.tokenizer.pad_token is None:  # decoder tokenizers (GPT-2, Llama) may have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # a causal LM's classifier reads the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.head = output_layer_name(self.model, 2)
        self.max_length = max_length

    def logits(self, texts: list[str]) -> torch.Tensor:
        """texts (M) -> logits [M, 2]."""
        enc = self.tokenizer([t if t.strip() else "." for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return self.model(**enc.to(self.model.device)).logits.float()

    def l2_penalty(self) -> torch.Tensor:
        return l2_loss(self.model.get_submodule(self.head))

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
def _scored(d: nn.Module, batch, batch_size: int, head) -> torch.Tensor:
    """`head` of D's two-class logits for each sequence of `batch`, in chunks of `batch_size`, in eval mode."""
    was_training = d.training
    d.eval()
    try:
        out = [head(d.logits(batch[i:i + batch_size])) for i in range(0, len(batch), batch_size)]
    finally:
        d.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def prob_real(d: nn.Module, batch, batch_size: int = 2048) -> torch.Tensor:
    """D's probability that each sequence is real. batch: ids [M, L] (cnn) or M texts -> [M], in eval mode."""
    return _scored(d, batch, batch_size, lambda logits: torch.softmax(logits, dim=-1)[:, 1])


def real_logit(d: nn.Module, batch, batch_size: int = 2048) -> torch.Tensor:
    """D's logit that each sequence is real, l_real - l_fake of its two classes (prob_real = sigmoid of it, as
    softmax over two classes is, up to rounding), unsaturated where the probability rounds to 1. [M], in eval mode."""
    return _scored(d, batch, batch_size, lambda logits: torch.diff(logits, dim=-1)[:, 0])


def heldout_accuracy(d: nn.Module, real, fake) -> float:
    """Share of real (ids [M, L] or texts) that D calls real and of fake that it calls generated."""
    correct = torch.cat([prob_real(d, real) > 0.5, prob_real(d, fake) <= 0.5])
    return float(correct.float().mean())


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
    `batch_size`; cross-entropy + l2 * output-layer L2 (none at l2 = 0). pos/neg: ids [M, L] or lists of texts.
    Returns the last epoch's mean loss and accuracy.

    The shuffles come from the CPU `generator` on every device. Loss and accuracy are summed on D's device and
    read once per call. On CUDA, with ids and an optimiser built with `capturable=True`, every full minibatch
    replays one captured CUDA graph of gather, forward, backward and optimiser step: the same steps on the same
    data, without a kernel launch or host sync per operation."""
    data = _join(pos, neg)
    device = next(d.parameters()).device
    labels = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)]).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: as the Python float it replaced
    correct = torch.zeros((), dtype=torch.long, device=device)
    step = _DStep(d, optimizer, data, labels, l2, batch_size, loss_sum, correct)
    d.train()
    seen = 0
    for _ in range(epochs):
        loss_sum.zero_()
        correct.zero_()
        seen = 0
        perm = torch.randperm(len(labels), generator=generator)
        if isinstance(data, torch.Tensor):
            perm = perm.to(data.device)  # one copy per epoch, not one per minibatch
        for lo in range(0, len(perm), batch_size):
            idx = perm[lo:lo + batch_size]
            step(idx)
            seen += len(idx)
    d.eval()
    return {"loss/d": float(loss_sum) / max(seen, 1), "val/d_accuracy_train": int(correct) / max(seen, 1)}


def _d_update(d: nn.Module, optimizer, x, y: torch.Tensor, l2: float, loss_sum: torch.Tensor,
              correct: torch.Tensor) -> None:
    """Forward, backward and optimiser step of D on one minibatch (grads already cleared); adds the minibatch's
    summed loss and number of correct labels to the device accumulators."""
    logits = d.logits(x)
    loss = nn.functional.cross_entropy(logits, y)
    if l2 > 0:
        loss = loss + l2 * d.l2_penalty()
    loss.backward()
    optimizer.step()
    loss_sum += loss.detach().double() * len(y)
    correct += (logits.argmax(-1) == y).sum()


class _DStep:
    """One D minibatch step, `step(idx)` with idx the minibatch's rows of `data`.

    Eager by default. On CUDA with ids and a capturable optimiser, full minibatches follow PyTorch's
    whole-network capture recipe (torch.cuda.graphs docs): the first WARMUP steps run on a side stream, the next
    is captured once into a graph over a static index buffer and replayed for it and every later full
    minibatch. Warm-up steps are real steps and capture runs nothing, so the number of optimiser steps is
    unchanged. A last partial minibatch runs eagerly."""

    WARMUP = 3

    def __init__(self, d, optimizer, data, labels, l2, batch_size, loss_sum, correct):
        self.d, self.optimizer, self.data, self.labels, self.l2 = d, optimizer, data, labels, l2
        self.batch_size, self.loss_sum, self.correct = batch_size, loss_sum, correct
        self.graphable = (isinstance(data, torch.Tensor) and data.device.type == "cuda"
                          and all(group.get("capturable", False) for group in optimizer.param_groups))
        self.warm, self.side, self.graph, self.idx = 0, None, None, None

    def eager(self, idx: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        _d_update(self.d, self.optimizer, _take(self.data, idx), self.labels[idx], self.l2, self.loss_sum,
                  self.correct)

    def __call__(self, idx: torch.Tensor) -> None:
        if not self.graphable or len(idx) != self.batch_size:
            return self.eager(idx)
        if self.warm < self.WARMUP:
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.eager(idx)
            torch.cuda.current_stream().wait_stream(self.side)
            self.warm += 1
            return None
        if self.graph is None:
            self.idx = torch.empty_like(idx)
            self.optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes fresh grads each replay
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    _d_update(self.d, self.optimizer, self.data[self.idx], self.labels[self.idx], self.l2,
                              self.loss_sum, self.correct)
            except RuntimeError as err:  # capture ran nothing: the step is still to do, eagerly from here on
                warnings.warn(f"discriminator: CUDA graph capture failed, training D eagerly ({err})", stacklevel=2)
                self.graphable, self.graph = False, None
                return self.eager(idx)
        self.idx.copy_(idx)
        self.graph.replay()
        return None
