"""The one policy/value wrapper shared by SFT, PPO, SeqGAN and the evaluator.

`Policy` holds a causal LM (optionally wrapped in a PEFT LoRA adapter), a scalar value head on the
shared trunk (zero-initialised, so values start at 0) or a separate critic, and a reference: the same
model with the adapter disabled under LoRA, otherwise a frozen copy. Sampling returns a typed `Rollout`
whose log-probs and values come from the generation pass itself (no second forward): forward hooks read each
step's raw logits and final hidden state, keeping one step's logits at a time, never `[B, T, V]`.

Sequence layout used everywhere: `input_ids = [prompt (left-padded, P) | completion (right-padded, T)]`.
Completion token t is predicted by the hidden state at position P - 1 + t.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlgen import core
from rlgen.config import SamplingConfig
from rlgen.distributed import gathered
from rlgen.text import render_prompt

VALUE_HEAD_FILE = "value_head.safetensors"
# The generation-config fields that would otherwise change pure sampling, each at its neutral value: generate()
# fills a field left None from the model folder's generation_config.json, then from global defaults (top_k=50).
NEUTRAL_SAMPLING = dict(top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                        encoder_repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
                        encoder_no_repeat_ngram_size=0, renormalize_logits=False, remove_invalid_values=False)


@dataclass
class Rollout:
    """A batch of sampled completions. B = batch, P = prompt length (left-padded), T = completion length.

    prompt_ids [B, P] long, prompt_mask [B, P] long (0 on left padding)
    completion_ids [B, T] long (pad after the end), completion_mask [B, T] long (1 up to and including EOS)
    logprobs [B, T] float: log-probs of the sampled tokens at the sampling temperature (0 where masked)
    values [B, T] float or None: value estimates V(prefix) for each completion token (0 where masked)
    ended_with_eos [B] bool; prompts/completions: the raw prompts (texts or lists of messages) and decoded
    completions (B each)
    engine_logprobs [B, T] float or None: the sampling engine's own log-probs of the sampled tokens when an
    inference engine sampled (`rlgen.engines`; 0 where masked); `logprobs` are then the trainer's forward's
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor | None
    ended_with_eos: torch.Tensor
    prompts: list[str]
    completions: list[str]
    engine_logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P + T]"""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + T]"""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_id_lists(self) -> list[list[int]]:
        """Each completion's token ids up to and including EOS (TRL's `completion_ids` for reward functions)."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]


def peft_lora_config(lora_r: int, lora_alpha: int, lora_dropout: float, lora_target_modules: str):
    """PEFT's LoraConfig for a causal LM from rlgen's LoRA options (`rlgen.config.lora_kwargs`)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                      target_modules=lora_target_modules)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] -> (mask [B, T] with 1 up to and including the first EOS, ended_with_eos [B])."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).long(), ended


class _StepRecorder:
    """Forward hooks that keep, while `Policy.sample` generates, what a rollout needs from each step: the sampled
    token's log-prob and the final hidden state [B, H] of the last position (the value's input).

    Generate's forward at step t + 1 is fed the token sampled at step t, so that token's log-prob is read from the
    previous step's raw logits (kept for one step only: [B, V], never [B, T, V]); the last token's after generate
    returns. Like `Policy.forward`, it divides by the temperature and blocks EOS before `min_new_tokens`
    (`core.block_tokens`), so the first PPO ratio is 1. The hooks stay registered and idle outside `sample`
    (torch.compile skips hook guards, so a hook added after compiling would never run), and are excluded from
    compiled graphs so that what they keep is copied out of a CUDA graph's reused output buffers.
    """

    def __init__(self):
        self.temperature: float | None = None  # None: idle
        self.eos_ids: list[int] = []
        self.min_new_tokens = 0
        self.keep_hidden = False
        self.last_logits: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []

    def start(self, temperature: float, keep_hidden: bool, eos_ids: list[int], min_new_tokens: int) -> None:
        self.temperature, self.keep_hidden, self.last_logits, self.logprobs, self.hidden = (
            temperature, keep_hidden, None, [], [])
        self.eos_ids, self.min_new_tokens = eos_ids, min_new_tokens

    def stop(self) -> None:
        self.temperature, self.last_logits = None, None

    def _take(self, tokens: torch.Tensor) -> None:
        """Log-prob [B] of `tokens` [B] under the previous step's logits (step t = len(self.logprobs))."""
        blocked = len(self.logprobs) < self.min_new_tokens
        logits = core.block_tokens(self.last_logits[:, None], self.eos_ids, 1 if blocked else 0)
        self.logprobs.append(core.logprobs_from_logits(logits, tokens[:, None], self.temperature)[:, 0])

    @torch.compiler.disable
    def on_logits(self, module, args, kwargs, output) -> None:
        if self.temperature is None:
            return
        if self.last_logits is not None:
            self._take(kwargs["input_ids"][:, -1])
        self.last_logits = output.logits[:, -1].to(torch.float32, copy=True)  # [B, V]

    @torch.compiler.disable
    def on_hidden(self, module, args, output) -> None:
        if self.temperature is not None and self.keep_hidden:
            self.hidden.append(output[0][:, -1].clone())  # [B, H]

    def finish(self, completion_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """completion_ids [B, T] -> (log-probs [B, T], last hidden states [B, T, H] or None if not recorded)."""
        self._take(completion_ids[:, -1])
        T = completion_ids.shape[1]
        logprobs = torch.stack(self.logprobs[:T], dim=1)
        hidden = torch.stack(self.hidden[:T], dim=1) if self.hidden else None
        return logprobs, hidden


def _contiguous_input(module, args):
    """Forward pre-hook: the module's first input made contiguous."""
    return (args[0].contiguous(), *args[1:])


@contextmanager
def merged_lora(model):
    """Fold the active LoRA adapters of a PEFT `model` into its base weights for the duration of the block (the
    adapters disabled, so each layer runs its base layer only), then put the exact base weights back.

    PEFT's per-layer adapter calls made a CPU rollout of the default model 1.1-1.4x slower (the more so the busier
    the machine). The base weights are copied and restored rather than merged and unmerged (PEFT's
    `unmerge_adapter` subtracts the delta again): in floating point W + d - d drifts from W, and under LoRA the
    base model is the reference. In place, so that compiled graphs keep their weights' addresses. Models with
    other adapter kinds (DoRA, LoRA biases, embeddings, modules_to_save) run unmerged.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    modules = list(model.modules())
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    mergeable = layers and not any(isinstance(m, ModulesToSaveWrapper) for m in modules) and all(
        type(m) is LoraLinear and not m.lora_variant and not any(m.lora_bias.values()) for m in layers)
    if not mergeable:
        yield
        return
    saved = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if active:
                saved.append((weight, weight.clone()))
                for adapter in active:
                    weight.add_(layer.get_delta_weight(adapter).to(weight.dtype))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


class Policy(nn.Module):
    """Causal LM + value head (or critic) + reference. See the module docstring for the layout."""

    def __init__(self, model, tokenizer, critic=None, reference: bool = True, ref_model=None, value_head: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        hidden = self.base_config.hidden_size
        self.critic = critic
        # None for an estimator without a critic (rlgen.estimators.needs_critic): no parameters, none saved
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.ref_model = ref_model.eval().requires_grad_(False) if ref_model is not None else None
        # Set by rlgen.distributed.shard_policy: rollouts then gather the whole policy, computing in compute_dtype.
        self.sharded, self.compute_dtype = False, None
        # An inference engine that samples instead of generate() (rlgen.engines.VLLMEngine; None: generate()).
        self.engine = None
        if reference and ref_model is None and not self.is_peft:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        forward_args = inspect.signature(self.base_model.forward).parameters
        self._takes_position_ids = "position_ids" in forward_args
        # the KV cache argument: cache in transformers 5.24 (past_key_values deprecated), past_key_values before
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        # After the reference copy above, which must not carry the hooks.
        self._recorder = _StepRecorder()
        self._hidden_hooked = self.base_model.base_model is not self.base_model
        self._hooks = []
        self.add_hooks()

    def add_hooks(self) -> None:
        """Register the forward hooks `sample` reads log-probs and values through (construction does), unless they
        are on. Always this Policy's one recorder: a decoding step compiled earlier keeps calling the hooks it was
        compiled with (torch.compile skips hook guards)."""
        if self._hooks:
            return
        self._hooks.append(self.base_model.register_forward_hook(self._recorder.on_logits, with_kwargs=True))
        if self._hidden_hooked:  # the transformer under the LM head
            self._hooks.append(self.base_model.base_model.register_forward_hook(self._recorder.on_hidden))
        # generate's prefill hands the LM head the [B, 1, H] slice of [B, P, H]; torch's CPU matmul does not fold
        # that strided input into one matrix product but multiplies B broadcast copies of the head's weight
        # (measured: 1 s of a 5 s bf16 rollout of the default model, 0.1 s in fp32)
        head = self.base_model.get_output_embeddings()
        if head is not None:
            self._hooks.append(head.register_forward_pre_hook(_contiguous_input))

    def remove_hooks(self) -> None:
        """Take this Policy's forward hooks off its model, for a model that something else goes on training (TRL's
        trainers): their forward passes then run no hook. `sample` needs them back (`add_hooks`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name: str, *, lora_r: int = 0, lora_alpha: int = 16, lora_dropout: float = 0.0,
                        lora_target_modules: str = "all-linear", separate_critic: bool = False,
                        reference: bool = True, ref_name: str | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32, value_head: bool = True) -> Policy:
        """Load `default`, `tiny`, a folder (an rlgen policy folder restores its value head) or a Hub id.

        The reference is the model itself (adapter disabled under LoRA, else a frozen copy), or the model
        `ref_name` when given (e.g. the base model when evaluating a fine-tuned folder). Models, reference and
        critic load in `dtype`; a LoRA adapter and the value head stay float32 (PEFT upcasts adapters).
        """
        from rlgen.models import load_model

        model, tokenizer = load_model(name, seed=seed, dtype=dtype)
        ref_model = (load_model(ref_name, seed=seed, dtype=dtype)[0] if reference and ref_name not in (None, name)
                     else None)
        critic = None
        if separate_critic:
            saved = Path(name) / "critic"
            if saved.is_dir():
                from transformers import AutoModel

                critic = AutoModel.from_pretrained(saved, dtype=dtype)
            else:
                critic = copy.deepcopy(model.base_model)
        if lora_r > 0:
            from peft import get_peft_model

            model = get_peft_model(model, peft_lora_config(lora_r, lora_alpha, lora_dropout, lora_target_modules))
        policy = cls(model, tokenizer, critic=critic, reference=reference, ref_model=ref_model, value_head=value_head)
        head = Path(name) / VALUE_HEAD_FILE
        if head.is_file() and value_head:
            from safetensors.torch import load_file

            policy.value_head.load_state_dict(load_file(str(head)))
        return policy

    @property
    def base_model(self):
        """The plain transformers causal LM (under LoRA: the wrapped model, with adapter layers)."""
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def base_config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.base_model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def checkpoint_in_eval(self) -> None:
        """Gradient checkpointing for the policy (and critic) trunk while it stays in eval mode (dropout off, as
        PPO needs). transformers checkpoints a layer only while that layer is training, so the checkpointed layers
        themselves, not their submodules (dropout, attention), are marked as training. `eval()` and `sample`
        clear the mark: call this before each optimisation phase."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        for model in (self.base_model, self.critic):
            if model is None:
                continue
            if not model.is_gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for module in model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True

    # ---- forwards -----------------------------------------------------------------------------------------

    def _lm_forward(self, model, input_ids, attention_mask, n_completion: int, hidden: bool):
        """The model's output and, with `hidden`, the final hidden states of the kept positions (as the logits): the
        LM head's input, read by a hook. Not `output_hidden_states`: its first entry is, under FSDP2, the view that
        FSDP makes of the first decoder layer's input, and a sharded root returning a view warns on every forward
        with grad ("returned a view tensor ... wrong gradients")."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_completion + 1)
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        if not hidden:
            return model(**kwargs), None
        seen = []
        handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            return model(**kwargs), seen[-1]
        finally:
            handle.remove()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                temperature: float = 1.0, with_values: bool = True, with_entropy: bool = False,
                min_new_tokens: int = 0):
        """Log-probs (and values, entropy) of the last `n_completion` tokens of `input_ids`, under the sampling
        distribution: logits / temperature, EOS blocked before `min_new_tokens` (as generate() samples).

        input_ids, attention_mask: [B, P + T] with T = n_completion.
        Returns logprobs [B, T], values [B, T] or None (also without a value head), entropy [B, T] or None.
        """
        with_values = with_values and self.value_head is not None
        shared_values = with_values and self.critic is None
        out, last_hidden = self._lm_forward(self.model, input_ids, attention_mask, n_completion, hidden=shared_values)
        # position P-1+t predicts completion token t; core upcasts half-precision logits to fp32 row by row
        logits = core.block_tokens(out.logits[:, -(n_completion + 1):-1], self.eos_token_ids, min_new_tokens)
        targets = input_ids[:, -n_completion:]
        logprobs = core.logprobs_from_logits(logits, targets, temperature)
        entropy = core.entropy_from_logits(logits, temperature) if with_entropy else None
        values = None
        if shared_values:
            values = self.value_head(last_hidden[:, -(n_completion + 1):-1].float()).squeeze(-1)
        elif with_values:
            values = self.critic_values(input_ids, attention_mask, n_completion)
        return logprobs, values, entropy

    def critic_values(self, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
        """Values [B, T] from the separate critic trunk."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = self.critic(**kwargs).last_hidden_state[:, -(n_completion + 1):-1]
        return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                     temperature: float = 1.0, min_new_tokens: int = 0) -> torch.Tensor:
        """Reference-policy log-probs [B, T] (the frozen reference model, else the adapter disabled under LoRA),
        under the same sampling distribution as `forward`."""
        if self.ref_model is not None:
            context, model = nullcontext(), self.ref_model
        elif self.is_peft:
            context, model = self.model.disable_adapter(), self.model
        else:
            raise RuntimeError("this Policy was built with reference=False")
        with context:
            out, _ = self._lm_forward(model, input_ids, attention_mask, n_completion, hidden=False)
        logits = core.block_tokens(out.logits[:, -(n_completion + 1):-1], self.eos_token_ids, min_new_tokens)
        return core.logprobs_from_logits(logits, input_ids[:, -n_completion:], temperature)

    # ---- sampling -----------------------------------------------------------------------------------------

    def tokenize_prompts(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Render with the chat template, left-pad, keep the last `max_length` tokens. -> ids, mask [B, P]."""
        tok = self.tokenizer
        side, tside = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            enc = tok([render_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
                      truncation=True, max_length=max_length, add_special_tokens=False)
        finally:
            tok.padding_side, tok.truncation_side = side, tside
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generation_config(self, s: SamplingConfig):
        """Pure sampling at `s.temperature`, EOS blocked before `s.min_new_tokens`, nothing else.

        Every field with a neutral value is set (`NEUTRAL_SAMPLING`). Fields that are off only when None (min_p,
        suppress_tokens, bad_words_ids, forced_eos_token_id, ...) need the model's config hidden too: generate
        through `model_generation_defaults_hidden()`, as `sample` does."""
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=True, num_beams=1, num_return_sequences=1, temperature=s.temperature,
                                **NEUTRAL_SAMPLING, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                                eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                                return_dict_in_generate=True)

    @contextmanager
    def model_generation_defaults_hidden(self, model=None):
        """While open, generate() of `model` (default: the policy's) sees an empty model generation_config, so
        nothing from the model folder fills the fields `generation_config` leaves None; only transformers'
        neutral global defaults do."""
        from transformers import GenerationConfig

        model = self.base_model if model is None else getattr(model, "get_base_model", lambda: model)()
        saved, model.generation_config = model.generation_config, GenerationConfig()
        try:
            yield
        finally:
            model.generation_config = saved

    def _cache_settings(self, s: SamplingConfig) -> dict:
        """On CUDA, a static KV cache (generate then compiles the decoding step) sized for the longest prompt, so
        that every rollout reuses one cache and one compiled graph; elsewhere, or for a model that cannot compile
        in one graph, the dynamic cache. Generation-config fields."""
        # A sharded policy keeps the dynamic cache: compiling generate around FSDP's per-module hooks is untested.
        if self.device.type != "cuda" or self.sharded or not getattr(self.base_model, "_can_compile_fullgraph", False):
            return {}
        return {"cache_implementation": "static", "max_cache_len": s.max_prompt_length + s.max_new_tokens}

    @torch.no_grad()
    def sample(self, prompts: list[str], settings: SamplingConfig, with_values: bool = True,
               group_size: int = 1) -> Rollout:
        """Sample one completion per prompt; `group_size` > 1: `prompts` is made of groups of that many consecutive
        copies of a prompt, which an inference engine samples as one request of n completions (generate() shares
        the repeated prompts' prefill, `_shared_prompt_cache`). A policy without a value head gives values None.
        Log-probs and shared-trunk values come from the generation pass
        (in float32 LoRA merged into the weights meanwhile; see `merged_lora`), in half precision or when an
        inference engine samples (`self.engine`) from one forward pass. A sharded policy generates on whole
        weights (`rlgen.distributed.gathered`), resharded afterwards."""
        prompt_ids, prompt_mask = self.tokenize_prompts(prompts, settings.max_prompt_length)
        # In half precision the cached generation and a full forward round differently (default model, bf16: 0.04
        # nats per token on average, benchmarks/rollout_speed.py): one forward re-reads the log-probs and values,
        # so that they are `forward`'s (the first PPO ratio 1, eval/kl unbiased), as generation's are in float32.
        # An engine's kernels differ from the trainer's in any precision: its log-probs are kept beside.
        reread = self.engine is not None or (self.compute_dtype or self.base_model.dtype) != torch.float32
        with_values = with_values and self.value_head is not None
        shared_values = with_values and self.critic is None and not reread
        engine_logprobs = hidden = None
        if self.engine is not None:
            completion_ids, engine_logprobs = self._engine_sample(prompt_ids, prompt_mask, settings, group_size)
        else:
            completion_ids, logprobs, hidden = self._generate(prompt_ids, prompt_mask, settings, shared_values, reread)
        mask, ended = completion_mask_from_ids(completion_ids, self.eos_token_ids)
        completion_ids = completion_ids.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1)
        T = completion_ids.shape[1]
        values = None
        if reread:
            logprobs, values, _ = self.forward(input_ids, attention_mask, T, settings.temperature, with_values,
                                               min_new_tokens=settings.min_new_tokens)
        elif shared_values and self._hidden_hooked:
            values = self.value_head(hidden.float()).squeeze(-1)
        elif with_values:  # a separate critic, or a model without a trunk to hook: one forward for the values
            values = (self.critic_values(input_ids, attention_mask, T) if self.critic is not None
                      else self.forward(input_ids, attention_mask, T)[1])
        logprobs = logprobs * mask
        values = values * mask if values is not None else None
        engine_logprobs = engine_logprobs * mask if engine_logprobs is not None else None
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # pad after the end
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, logprobs, values, ended,
                       list(prompts), [t.strip() for t in texts], engine_logprobs)

    def _generate(self, prompt_ids, prompt_mask, settings: SamplingConfig, shared_values: bool, reread: bool):
        """transformers' generate on [B, P] prompts -> completion ids [B, T] (EOS not yet masked), their log-probs
        [B, T] and last hidden states [B, T, H] (or None) as the hooks recorded them."""
        was_training = self.model.training
        self.model.eval()
        generation_config = self.generation_config(settings)
        generation_config.update(**self._cache_settings(settings))
        try:
            # Half precision samples through the adapter layers: merging would round W + BA to bf16, so the sampling
            # policy would differ from the one whose log-probs the forward pass re-reads.
            merge = self.is_peft and not reread
            with (self.model_generation_defaults_hidden(), gathered(self.base_model) if self.sharded else nullcontext(),
                  merged_lora(self.model) if merge else nullcontext()):
                prefilled = ({} if generation_config.cache_implementation == "static"
                             else self._shared_prompt_cache(prompt_ids, prompt_mask))
                self._recorder.start(settings.temperature, shared_values, self.eos_token_ids, settings.min_new_tokens)
                out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                          generation_config=generation_config, **prefilled)
            completion_ids = out.sequences[:, prompt_ids.shape[1]:]
            logprobs, hidden = self._recorder.finish(completion_ids)
        finally:
            self._recorder.stop()
            self.model.train(was_training)
        return completion_ids, logprobs, hidden

    def _shared_prompt_cache(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        """Prompts repeated in a batch (best-of-n's draws, a group of samples per prompt) prefilled once: the KV
        cache of all but the last prompt token, computed for each distinct row of [B, P] and copied to its repeats,
        as generate's keyword ({} when no row repeats or the model keeps no transformers cache). Generate then starts
        from the last prompt token. The prefill is most of a short rollout's work on a CPU: the sweep's best-of-n
        (default model, 16 prompts drawn 8 times, 64 rows a call, 16 new tokens) samples 1.76x faster with it, the
        same tokens (benchmarks/bon_sampling.py)."""
        from transformers import DynamicCache

        P = prompt_ids.shape[1]
        if P < 2 or not self.base_model._supports_default_dynamic_cache():
            return {}
        rows = torch.cat([prompt_ids, prompt_mask], 1)  # a row's padding is part of what must repeat
        distinct, copies = torch.unique(rows, dim=0, return_inverse=True)  # distinct [U, 2P], copies [B] -> U
        if len(distinct) == len(rows):
            return {}
        ids, mask = distinct[:, :P - 1], distinct[:, P:2 * P - 1]  # [U, P - 1]
        cache = DynamicCache(config=self.base_config)
        kwargs = {"position_ids": position_ids_from_mask(mask)} if self._takes_position_ids else {}
        self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache},
                   **kwargs)
        cache.batch_select_indices(copies)  # [U, ...] -> [B, ...]
        return {self._cache_arg: cache}

    def _engine_sample(self, prompt_ids, prompt_mask, settings: SamplingConfig, group_size: int = 1):
        """The inference engine on the same prompt tokens (a group's first row, n = `group_size` completions each)
        -> completion ids [B, T] right-padded (EOS not yet masked; T the longest completion) and the engine's
        log-probs [B, T] (0 on padding)."""
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]  # without left padding
        completions, engine_lps = self.engine.generate(prompts[::group_size], settings, self.eos_token_ids,
                                                       n=group_size)
        T = max(1, max(len(c) for c in completions))
        completion_ids = torch.full((len(prompts), T), self.tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), T)
        for i, (ids, lps) in enumerate(zip(completions, engine_lps)):
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(lps)] = torch.tensor(lps)
        return completion_ids.to(self.device), logprobs.to(self.device)

    def sample_batches(self, prompts: list[str], settings: SamplingConfig, batch_size: int):
        """Rollouts (no values) of `prompts`, `batch_size` prompts at a time, in order."""
        for i in range(0, len(prompts), batch_size):
            yield self.sample(prompts[i:i + batch_size], settings, with_values=False)

    def sample_completions(self, prompts: list[str], settings: SamplingConfig, batch_size: int) -> list[str]:
        """One decoded completion per prompt, sampled `batch_size` prompts at a time."""
        return [c for ro in self.sample_batches(prompts, settings, batch_size) for c in ro.completions]

    # ---- persistence --------------------------------------------------------------------------------------

    def save(self, folder: str | Path, value_head: bool = True) -> Path:
        """Write a Hugging Face model folder (LoRA merged; the adapter also in `adapter/`), the tokenizer,
        the value head (`value_head.safetensors`; `value_head=False` for a stage that never trained it, whose
        head is the untrained zeros) and the critic trunk (`critic/`) if any.
        `AutoModelForCausalLM.from_pretrained(folder)` loads the policy."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            self.model.save_pretrained(folder / "adapter")
            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(folder)
        else:
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        if value_head and self.value_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
            save_file(state, str(folder / VALUE_HEAD_FILE))
        if self.critic is not None:
            self.critic.save_pretrained(folder / "critic")
        return folder
