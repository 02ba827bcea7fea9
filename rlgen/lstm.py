"""The SeqGAN LSTM (Yu et al. 2017, synthetic-data experiment) as a transformers causal LM.

`SeqGANLSTMForCausalLM` is a one-layer LSTM (embedding E, hidden H, vocabulary V) with a softmax output,
written as a `PreTrainedModel` + `GenerationMixin` so that `generate`, `save_pretrained`/`from_pretrained` and
the shared `Policy` wrapper work unchanged. The cache is the recurrent state `(h, c)`, each [B, H].
It serves as the oracle (parameters N(0, 1), or the authors' arrays) and as the generator.

The recurrence is the authors' (row vectors, x_0 = start token, h_0 = c_0 = 0):
    i = s(e Wi + h Ui + bi)  f = s(e Wf + h Uf + bf)  o = s(e Wog + h Uog + bog)  g = tanh(e Wc + h Uc + bc)
    c = f * c + i * g        h = o * tanh(c)          logits = h Wo + bo
held in `torch.nn.LSTM` (gate blocks i, f, g, o; bias_hh fixed at 0 for the oracle) so a teacher-forced pass
is one fused call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rlgen import core
from rlgen.errors import UserError

ORACLE_ARRAYS = ("emb", "Wi", "Wf", "Wog", "Wc", "Ui", "Uf", "Uog", "Uc", "bi", "bf", "bog", "bc", "Wo", "bo")


class SeqGANLSTMConfig(PreTrainedConfig):
    """vocab_size V, embedding_size E, hidden_size H; every sequence starts from `start_token_id`."""

    model_type = "rlgen_lstm"

    def __init__(self, vocab_size: int = 5000, embedding_size: int = 32, hidden_size: int = 32,
                 start_token_id: int = 0, initializer_range: float = 0.1, pad_token_id: int | None = None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id  # no padding inside the model's vocabulary (see build_token_tokenizer)
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.start_token_id = start_token_id
        self.initializer_range = initializer_range
        kwargs.setdefault("bos_token_id", start_token_id)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


@dataclass
class LSTMCausalLMOutput(ModelOutput):
    """logits [B, L', V] (L' = L or logits_to_keep); cache (h, c) each [B, H]; hidden_states (h_t [B, L, H],)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: tuple[torch.Tensor, torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class SeqGANLSTMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SeqGANLSTMConfig
    base_model_prefix = "lstm_lm"
    main_input_name = "input_ids"
    _is_stateful = True

    def __init__(self, config: SeqGANLSTMConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.lstm = nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # The authors' generator: every parameter ~ N(0, 0.1) (TextGAN's 1/sqrt(dim) init plateaus 0.23 higher).
        for p in module.parameters(recurse=False):
            p.normal_(0.0, self.config.initializer_range)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state (h, c), returned by forward

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
        """Consume one token per row. tokens [B] -> (h [B, H], (h, c))."""
        _, (h, c) = self.lstm(self.embedding(tokens)[:, None], None if state is None else
                              (state[0][None], state[1][None]))
        return h[0], (h[0], c[0])

    def states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) after each prefix, each [B, L, H]: position t holds the state after consuming input_ids[:, :t+1]."""
        hs, cs, state = [], [], None
        for t in range(input_ids.shape[1]):
            _, state = self.step(input_ids[:, t], state)
            hs.append(state[0])
            cs.append(state[1])
        return torch.stack(hs, 1), torch.stack(cs, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, output_hidden_states: bool | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> LSTMCausalLMOutput:
        """input_ids [B, L] continue from `cache` (or the zero state). Left padding (attention_mask 0) keeps
        the state unchanged, so a padded row equals its unpadded self. labels [B, L]: next-token loss."""
        state = None if cache is None else (cache[0][None].contiguous(), cache[1][None].contiguous())
        if attention_mask is None or bool(attention_mask.all()):
            hidden, (h, c) = self.lstm(self.embedding(input_ids), state)
            h, c = h[0], c[0]
        else:
            outs = []
            zeros = input_ids.new_zeros(input_ids.shape[0], self.config.hidden_size, dtype=self.dtype)
            h, c = (state[0][0], state[1][0]) if state is not None else (zeros, zeros)
            for t in range(input_ids.shape[1]):
                keep = attention_mask[:, t, None].bool()
                tokens = input_ids[:, t].masked_fill(~keep[:, 0], self.config.start_token_id)  # pad ids may be >= V
                _, (h_new, c_new) = self.step(tokens, (h, c))
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                outs.append(h)
            hidden = torch.stack(outs, 1)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return LSTMCausalLMOutput(loss=loss, logits=logits, cache=(h, c),
                                  hidden_states=(hidden,) if output_hidden_states else None)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        flags = {k: kwargs[k] for k in ("output_hidden_states", "use_cache") if k in kwargs}
        if cache is not None:  # the state already holds the prefix: feed the newest token only
            return {"input_ids": input_ids[:, -1:], "cache": cache, **flags}
        return {"input_ids": input_ids, "attention_mask": attention_mask, **flags}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs["cache"] = outputs.cache
        return model_kwargs

    @torch.no_grad()
    def sample(self, n: int, length: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences of `length` tokens from the start token by inverse-CDF sampling (cumsum + searchsorted,
        several times faster than torch.multinomial on CPU), `batch_size` rows at a time (small [rows, V] blocks
        stay in cache: 2x faster than 10k rows at once here). -> ids [n, length] and their log-probs [n, length]
        under the sampling distribution (at `temperature`)."""
        ids, logps = [], []
        for lo in range(0, n, batch_size):
            b = min(batch_size, n - lo)
            x = torch.full((b,), self.config.start_token_id, dtype=torch.long, device=self.device)
            state, toks, lps = None, [], []
            for _ in range(length):
                h, state = self.step(x, state)
                logits = self.lm_head(h)
                x = core.inverse_cdf_sample(logits, temperature, generator)
                toks.append(x)
                lps.append(core.logprobs_from_logits(logits, x, temperature))
            ids.append(torch.stack(toks, 1))
            logps.append(torch.stack(lps, 1))
        return torch.cat(ids), torch.cat(logps)

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, temperature: float = 1.0, batch_size: int = 256) -> float:
        """Mean per-token NLL (nats) of ids [n, L], teacher-forced from the start token (the paper's NLL),
        under softmax(logits / temperature)."""
        total = 0.0
        for lo in range(0, ids.shape[0], batch_size):
            x = ids[lo:lo + batch_size]
            inp = torch.cat([torch.full_like(x[:, :1], self.config.start_token_id), x[:, :-1]], 1)
            logits = self(inp).logits / temperature
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1),
                                                       reduction="sum"))
        return total / ids.numel()


def build_oracle(vocab_size: int, embedding_size: int, hidden_size: int, seed: int,
                 params: str | None = None) -> SeqGANLSTMForCausalLM:
    """The oracle: every parameter ~ N(0, 1) from `seed` (the paper), or the authors' arrays from `params` (.npz
    with `emb Wi Wf Wog Wc Ui Uf Uog Uc bi bf bog bc Wo bo`). Frozen, eval mode."""
    config = SeqGANLSTMConfig(vocab_size=vocab_size, embedding_size=embedding_size, hidden_size=hidden_size,
                              initializer_range=1.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        oracle = SeqGANLSTMForCausalLM(config)
    if params is None:
        with torch.no_grad():
            oracle.lstm.bias_hh_l0.zero_()  # the oracle has one bias per gate
        return oracle.eval().requires_grad_(False)
    try:
        arrays = np.load(params)
        a = {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in ORACLE_ARRAYS}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"oracle_params {params}: cannot read the oracle arrays ({type(e).__name__}: {e}); "
                        f"expected an .npz with {' '.join(ORACLE_ARRAYS)}") from e
    expect = {"emb": (vocab_size, embedding_size), "Wi": (embedding_size, hidden_size),
              "Ui": (hidden_size, hidden_size), "Wo": (hidden_size, vocab_size), "bo": (vocab_size,)}
    for k, shape in expect.items():
        if tuple(a[k].shape) != shape:
            raise UserError(f"oracle_params {params}: array {k} has shape {tuple(a[k].shape)}, expected {shape} "
                            f"(vocab_size {vocab_size}, embedding {embedding_size}, hidden {hidden_size})")
    with torch.no_grad():  # torch gate order is i, f, g, o; weights are stored transposed
        oracle.embedding.weight.copy_(a["emb"])
        oracle.lstm.weight_ih_l0.copy_(torch.cat([a["Wi"], a["Wf"], a["Wc"], a["Wog"]], 1).T)
        oracle.lstm.weight_hh_l0.copy_(torch.cat([a["Ui"], a["Uf"], a["Uc"], a["Uog"]], 1).T)
        oracle.lstm.bias_ih_l0.copy_(torch.cat([a["bi"], a["bf"], a["bc"], a["bog"]]))
        oracle.lstm.bias_hh_l0.zero_()
        oracle.lm_head.weight.copy_(a["Wo"].T)
        oracle.lm_head.bias.copy_(a["bo"])
    return oracle.eval().requires_grad_(False)


def build_token_tokenizer(vocab_size: int):
    """A word-level tokenizer whose tokens are the ids written in decimal ("17 4032 ..."), so token sequences
    go through the text-based reward protocol and the Policy wrapper (prompt: the start token, "0").
    `<pad>` and `<unk>` get ids V and V + 1, outside the model's vocabulary: the model never emits them and
    skips left padding, so decoding with skip_special_tokens keeps every real token, start token included."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(vocab_size)} | {"<pad>": vocab_size, "<unk>": vocab_size + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("rlgen_lstm", SeqGANLSTMConfig)
        AutoModelForCausalLM.register(SeqGANLSTMConfig, SeqGANLSTMForCausalLM)
    except ValueError:
        pass  # already registered (module reloaded)


_register()
