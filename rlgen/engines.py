"""Rollout engines: what turns prompt token ids into sampled completions for `Policy.sample`.

- `hf` (default): transformers' `generate` in the trainer's process; the sampled tokens' log-probs and the values
  are read from the generation pass itself (`rlgen.policy`). Exact, and the fastest on a CPU for small batches.
- `vllm`: vLLM colocated in the trainer's process (TRL's colocate mode: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, no
  server, no extra process), fed the policy's own prompt token ids and pinned to pure sampling. `Policy.sample`
  then re-reads the log-probs and values with one forward of the trainer's model (the behaviour policy PPO
  corrects towards); the engine's own log-probs come back beside them (`Rollout.engine_logprobs`), for the
  truncated importance weights of `core.truncated_importance_weights`. The policy's weights are pushed into the
  running engine after every update (`VLLMEngine.sync`), in memory, without a restart.

vLLM-specific facts this module relies on (vLLM 0.32, CPU and CUDA builds):
- `logprobs_mode="processed_logprobs"` returns log-probs after temperature and `min_tokens` (EOS blocking), i.e.
  under the distribution that sampled, as `Policy.forward` computes them; the default (raw) ignores both.
- `generation_config="vllm"`: the model folder's generation_config.json does not change the sampling defaults.
- The worker's `reload_weights(weights_iterator=...)` loads checkpoint-format tensors in place and re-runs the
  kernel preparation (on CPU the weights are repacked for oneDNN, so `model.load_weights` alone breaks them). A
  fused parameter (q/k/v, gate/up) needs all its shards in one call: the whole model is sent every time.
- The prefix cache holds KV computed by the old weights: it is reset after every sync.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch

from rlgen.config import require_vllm
from rlgen.errors import UserError
from rlgen.models import check_head_size


def checkpoint_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's causal-LM weights under their checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...),
    one at a time, LoRA adapters merged: a LoRA layer's base weight comes as W + scaling * B @ A (PEFT's
    `get_delta_weight` for a Linear) and the adapter tensors are skipped. A sharded (FSDP2) tensor is all-gathered
    when it is reached and dropped once consumed, so at most one whole layer's weights are held beside the shards;
    every process must iterate, in the same order."""
    from torch.distributed.tensor import DTensor

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach()

    model = policy.base_model
    adapted = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        tensor = whole(tensor)
        module = adapted.get(name.removesuffix(".base_layer.weight"))
        if module is not None and name.endswith(".base_layer.weight"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = whole(module.lora_B[adapter].weight) @ whole(module.lora_A[adapter].weight)
                    tensor = tensor + (delta * module.scaling[adapter]).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


def check_mergeable(policy) -> None:
    """UserError for adapters that `checkpoint_weights` cannot merge (anything but plain LoRA on Linear layers)."""
    if not policy.is_peft:
        return
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in policy.model.named_modules():
        plain = type(module) is LoraLinear and not module.lora_variant and not any(module.lora_bias.values())
        if isinstance(module, ModulesToSaveWrapper) or (isinstance(module, LoraLayer) and not plain):
            raise UserError(f"rollout_engine vllm merges LoRA adapters into the engine's weights; {name} "
                            f"({type(module).__name__}) is not a plain LoRA Linear: use rollout_engine hf")


def _reload(worker, weights) -> None:
    """Runs on the (in-process) vLLM worker: load checkpoint-format weights in place."""
    worker.reload_weights(weights_iterator=weights)


class VLLMEngine:
    """vLLM in this process, for one policy. Start-up writes the policy's current weights once into a temporary
    Hugging Face folder (the engine's model), then every `sync` pushes them in memory.

    `max_model_len`: longest prompt + completion; `gpu_memory_utilization`: share of the GPU vLLM may take on CUDA
    (weights + KV cache; the trainer needs the rest); `kv_cache_gb`: KV-cache space on a CPU (vLLM's
    `kv_cache_memory_bytes`); `dtype`: the engine's precision (the policy's on CUDA; float32 on CPUs without native
    bfloat16, where vLLM's bf16 was ~5x slower).
    """

    def __init__(self, policy, *, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 kv_cache_gb: float = 1.0, dtype: torch.dtype = torch.float32, seed: int = 0):
        check_head_size(policy.base_config, policy.base_config.name_or_path or "in memory")
        require_vllm()  # also here: a policy given in Python skips the config's check
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process (colocate)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings repeat every sync
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")  # torch deprecations in vLLM
        from vllm import LLM

        from rlgen.checkpoint import preserved_rng

        check_mergeable(policy)
        self._folder = tempfile.TemporaryDirectory(prefix="rlgen-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        start = time.perf_counter()
        with torch.no_grad():
            # the base model's own folder layout (config.json + model.safetensors), LoRA merged, no adapter
            from safetensors.torch import save_file

            policy.base_config.save_pretrained(self._folder.name)
            tensors, seen = {}, set()
            for name, t in checkpoint_weights(policy):  # tied weights share memory, which safetensors refuses
                tensors[name] = t.to(dtype).clone() if t.data_ptr() in seen else t.contiguous().to(dtype)
                seen.add(t.data_ptr())
            save_file(tensors, os.path.join(self._folder.name, "model.safetensors"))
        policy.tokenizer.save_pretrained(self._folder.name)
        on_cuda = torch.cuda.is_available()
        memory = (dict(gpu_memory_utilization=gpu_memory_utilization) if on_cuda
                  else dict(kv_cache_memory_bytes=int(kv_cache_gb * 2**30)))
        self._owns_process_group = not torch.distributed.is_initialized()  # vLLM makes one (world 1) if none
        with preserved_rng():  # vLLM seeds the global generators while it starts; training's streams stay as they were
            self.llm = LLM(model=self._folder.name, dtype=dtype, seed=seed, max_model_len=max_model_len,
                           logprobs_mode="processed_logprobs", generation_config="vllm", enable_prefix_caching=True,
                           enforce_eager=not on_cuda, **memory)
        self.startup_s = time.perf_counter() - start
        self.dtype = dtype

    def generate(self, prompt_ids: list[list[int]], settings, eos_ids: list[int],
                 n: int = 1) -> tuple[list[list[int]], list[list[float]]]:
        """Sample `n` completions per prompt (token ids without padding; one request with vLLM's `n`, the prompt's
        KV cache computed once) -> (completion ids, their log-probs), prompt by prompt, each completion up to and
        including its EOS. Pure sampling at `settings.temperature` (no top-k/p, penalties or folder defaults), EOS
        blocked before `settings.min_new_tokens`. Each request gets a seed drawn from torch's generator, so a
        resumed run samples what the uninterrupted one did."""
        from vllm import SamplingParams

        from rlgen.checkpoint import preserved_rng

        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        params = [SamplingParams(n=n, temperature=settings.temperature, top_p=1.0, top_k=0, min_p=0.0,
                                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                 max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
                                 stop_token_ids=list(eos_ids), logprobs=0, seed=seed, detokenize=False)
                  for seed in seeds]
        with preserved_rng():
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                completions.append(ids)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)])
        return completions, logprobs

    @torch.no_grad()
    def sync(self, policy) -> float:
        """Push the policy's current weights (LoRA merged) into the engine; returns the seconds it took."""
        start = time.perf_counter()
        weights = ((name, t.to(self.dtype)) for name, t in checkpoint_weights(policy))
        self.llm.collective_rpc(_reload, args=(weights,))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the engine, its process groups and its temporary folder. The default process group goes too when
        the engine made it (one process): otherwise the next engine in this process would find vLLM's record of a
        group that something else (accelerate's `end_training`) destroyed. A launcher's group stays."""
        import gc

        from vllm.distributed import parallel_state

        self.llm = None
        gc.collect()
        parallel_state.destroy_model_parallel()
        if self._owns_process_group:
            parallel_state.destroy_distributed_environment()
        elif parallel_state._WORLD is not None:  # vLLM's world coordinator over the launcher's group; no public reset
            parallel_state._WORLD.destroy()
            parallel_state._WORLD = None
        self._folder.cleanup()


def engine_dtype(policy) -> torch.dtype:
    """The engine's precision: the policy's compute precision."""
    return policy.compute_dtype or policy.base_model.dtype


def start(policy, cfg) -> None:
    """Attach `cfg.rollout_engine`'s engine to `policy` (`hf`: none, `Policy.sample` generates itself); `stop` ends
    it. `cfg`: any config with `RolloutEngineMixin`'s and `SamplingConfig`'s fields."""
    if cfg.rollout_engine != "vllm":
        return
    import vllm

    policy.engine = VLLMEngine(policy, max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                               gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                               kv_cache_gb=cfg.vllm_kv_cache_gb, dtype=engine_dtype(policy), seed=cfg.seed)
    print(f"[rlgen] rollout engine: vLLM {vllm.__version__} in this process ({str(engine_dtype(policy))[6:]}), "
          f"started in {policy.engine.startup_s:.0f}s", flush=True)


def stop(policy) -> None:
    """Close the policy's engine, if any."""
    if policy.engine is not None:
        policy.engine.close()
        policy.engine = None
