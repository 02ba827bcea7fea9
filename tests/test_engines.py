"""What `rlgen.engines` computes without vLLM: the weights it hands an engine (checkpoint names, LoRA merged)."""

import copy

import pytest
import torch

from rlgen.engines import check_mergeable, checkpoint_weights
from rlgen.errors import UserError
from rlgen.models import build_tiny_model
from rlgen.policy import Policy

torch.set_num_threads(1)


def _lora_policy(tokenizer, use_dora=False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear", use_dora=use_dora)
    model = get_peft_model(build_tiny_model(tokenizer, seed=0), config)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at 0: make the adapter change something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return Policy(model, tokenizer, reference=False)


def test_checkpoint_weights_are_the_merged_models_under_checkpoint_names(tiny_tokenizer):
    """Names and values equal PEFT's merge_and_unload() state dict (W + scaling * B @ A), within float32 rounding;
    without LoRA they are the model's own state dict."""
    policy = _lora_policy(tiny_tokenizer)
    merged = copy.deepcopy(policy.model).merge_and_unload().state_dict()
    got = dict(checkpoint_weights(policy))
    assert got.keys() == merged.keys()
    assert max((got[k] - merged[k]).abs().max().item() for k in merged) < 1e-6
    base = policy.base_model.state_dict()
    assert all((got[k] - base[k.replace(".weight", ".base_layer.weight")]).abs().max() > 1e-3
               for k in got if "q_proj" in k)  # the adapter is in there
    plain = Policy(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, reference=False)
    state = plain.model.state_dict()
    assert {k: v for k, v in checkpoint_weights(plain)}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in checkpoint_weights(plain))


def test_adapters_that_cannot_be_merged_are_refused(tiny_tokenizer):
    check_mergeable(_lora_policy(tiny_tokenizer))
    with pytest.raises(UserError, match="is not a plain LoRA Linear: use rollout_engine hf"):
        check_mergeable(_lora_policy(tiny_tokenizer, use_dora=True))


def test_heads_smaller_than_vllm_takes_are_refused_before_it_starts(tiny_folder):
    """A model folder given as a policy (no config check): refused before vLLM is imported or started (it failed
    ~40 s into start-up with ~60 lines ending "Unsupported CPU attention configuration: head_dim=16")."""
    from rlgen.engines import VLLMEngine

    policy = Policy.from_pretrained(str(tiny_folder), reference=False)
    with pytest.raises(UserError, match=rf"^rollout_engine vllm: model {tiny_folder} has attention heads of size 16,"):
        VLLMEngine(policy, max_model_len=64)
