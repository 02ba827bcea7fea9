import pytest
import torch
from transformers import AutoModelForCausalLM

from rlgen.config import SamplingConfig
from rlgen.policy import Policy, completion_mask_from_ids

PROMPTS = ["hello there, how are you?", "what did you do this weekend", "i love dogs"]


@pytest.mark.parametrize("min_new_tokens", [0, 12])
def test_sampled_logprobs_and_values_match_a_separate_forward(tiny_policy, min_new_tokens):
    """fp32: the generation pass (KV cache, one step at a time) and one full forward agree to 1e-5, so the first
    PPO ratio is 1; also when min_new_tokens blocks EOS while sampling (both then block it)."""
    torch.manual_seed(0)
    tiny_policy.value_head.weight.data.normal_()  # non-zero so the values check means something
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=12, min_new_tokens=min_new_tokens, temperature=0.7))
    T = ro.completion_ids.shape[1]
    logprobs, values, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, T, temperature=0.7,
                                              min_new_tokens=min_new_tokens)
    m = ro.completion_mask.bool()
    assert ro.logprobs.shape == ro.completion_ids.shape == ro.values.shape
    torch.testing.assert_close(ro.logprobs[m], logprobs[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.values[m], values[m], atol=1e-5, rtol=1e-5)
    assert torch.all(ro.logprobs[~m] == 0) and torch.all(ro.values[~m] == 0)
    assert len(ro.completions) == len(PROMPTS) and ro.prompts == PROMPTS


@pytest.mark.parametrize("lora", [False, True])
def test_repeated_prompts_are_prefilled_once_and_sample_as_if_each_were(tiny_tokenizer, lora):
    """Best-of-n's batches repeat each prompt: the distinct prompts' KV cache (all but the last prompt token) is
    computed once and copied to the repeats. Same seed, same tokens, log-probs and values as prefilling every row,
    and the first forward sees the 3 distinct prompts, not the 12 rows."""
    from rlgen.models import build_tiny_model

    policy = Policy(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, reference=False)
    if lora:
        policy = Policy.from_pretrained("tiny", lora_r=4, reference=False)
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # an adapter that changes the model (B starts at zero)
    torch.nn.init.normal_(policy.value_head.weight)
    prompts = PROMPTS * 4  # draw j of prompt i is row 3 * j + i, as the evaluator repeats them
    rows_seen = []
    hook = policy.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    settings = SamplingConfig(max_new_tokens=10, temperature=0.8)
    torch.manual_seed(0)
    shared = policy.sample(prompts, settings)
    P = shared.prompt_ids.shape[1]
    assert rows_seen[0] == (3, P - 1) and rows_seen[1] == (12, 1)  # the shared prefill, then the last prompt token
    hook.remove()
    policy._shared_prompt_cache = lambda ids, mask: {}
    torch.manual_seed(0)
    each = policy.sample(prompts, settings)
    assert torch.equal(shared.completion_ids, each.completion_ids)
    torch.testing.assert_close(shared.logprobs, each.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.values, each.values, atol=1e-5, rtol=1e-5)
    m = shared.completion_mask.bool()
    logprobs, values, _ = policy.forward(shared.input_ids, shared.attention_mask, shared.completion_ids.shape[1],
                                         temperature=0.8)
    torch.testing.assert_close(shared.logprobs[m], logprobs[m], atol=1e-4, rtol=1e-4)  # LoRA merged vs not
    torch.testing.assert_close(shared.values[m], values[m], atol=1e-4, rtol=1e-4)


def test_min_new_tokens_logprobs_are_those_of_the_distribution_that_sampled(tiny_policy):
    """EOS is blocked before min_new_tokens in sampling, and so in the log-probs of generation, forward and
    reference alike: the first PPO ratio is 1 and the KL is that of the sampling policies."""
    eos = tiny_policy.eos_token_ids
    boost = torch.zeros(tiny_policy.model.get_output_embeddings().out_features)
    boost[eos] = 4.0  # make ending likely, so blocking it changes the distribution visibly
    for model in (tiny_policy.model, tiny_policy.ref_model):
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)
    torch.manual_seed(0)
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=8, min_new_tokens=4, temperature=0.9))
    T = ro.completion_ids.shape[1]
    assert (ro.completion_mask.sum(1) > 4).all()  # no completion ended inside the first 4 tokens
    m = ro.completion_mask.bool()
    blocked, _, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, T, temperature=0.9, min_new_tokens=4)
    plain, _, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, T, temperature=0.9)
    torch.testing.assert_close(ro.logprobs[m], blocked[m], atol=1e-4, rtol=1e-4)
    ref = tiny_policy.ref_logprobs(ro.input_ids, ro.attention_mask, T, 0.9, min_new_tokens=4)
    torch.testing.assert_close(ref[m], blocked[m], atol=1e-4, rtol=1e-4)  # the reference is the policy here
    assert (blocked[:, :4] - plain[:, :4] > 0.01).all()  # renormalised without EOS: log p - log(1 - p_eos)
    torch.testing.assert_close(blocked[:, 4:][m[:, 4:]], plain[:, 4:][m[:, 4:]])


def test_sampling_keeps_no_per_step_logits(tiny_policy):
    gen = tiny_policy.generation_config(SamplingConfig(max_new_tokens=4))
    assert not gen.output_logits and not gen.output_scores and not gen.output_hidden_states
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=4))
    recorder = tiny_policy._recorder
    assert recorder.temperature is None and recorder.last_logits is None  # idle outside sample
    kept = len(recorder.logprobs)
    tiny_policy.forward(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1])
    assert len(recorder.logprobs) == kept and recorder.last_logits is None


def _gpt2_policy(tokenizer):
    """GPT-2 has absolute position embeddings, so wrong positions under left padding would show."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return Policy(GPT2LMHeadModel(config).eval(), tokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_does_not_change_logprobs(arch, tiny_policy, tiny_tokenizer):
    policy = tiny_policy if arch == "llama" else _gpt2_policy(tiny_tokenizer)
    torch.manual_seed(1)
    ro = policy.sample(PROMPTS, SamplingConfig(max_new_tokens=8))
    T = ro.completion_ids.shape[1]
    batched, _, _ = policy.forward(ro.input_ids, ro.attention_mask, T)
    torch.testing.assert_close(ro.logprobs, batched * ro.completion_mask, atol=1e-4, rtol=1e-4)
    for i in range(len(PROMPTS)):
        keep = ro.prompt_mask[i].bool()
        ids = torch.cat([ro.prompt_ids[i][keep], ro.completion_ids[i]])[None]
        mask = torch.cat([ro.prompt_mask[i][keep], ro.completion_mask[i]])[None]
        alone, _, _ = policy.forward(ids, mask, T)
        m = ro.completion_mask[i].bool()
        torch.testing.assert_close(alone[0][m], batched[i][m], atol=1e-5, rtol=1e-5)
    assert (ro.prompt_mask == 0).any(), "prompts of different lengths must be left-padded"


def test_value_head_is_zero_at_init(tiny_policy):
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=4))
    assert torch.count_nonzero(tiny_policy.value_head.weight) == 0
    assert torch.all(ro.values == 0)


def test_reference_is_a_frozen_copy(tiny_policy):
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=6))
    T = ro.completion_ids.shape[1]
    before = tiny_policy.ref_logprobs(ro.input_ids, ro.attention_mask, T)
    with torch.no_grad():
        for p in tiny_policy.model.parameters():
            p.add_(0.1)
    now, _, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, T)
    torch.testing.assert_close(tiny_policy.ref_logprobs(ro.input_ids, ro.attention_mask, T), before)
    assert not torch.allclose(now, before)
    assert not any(p.requires_grad for p in tiny_policy.ref_model.parameters())


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, ended = completion_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_save_and_load_round_trip(tiny_policy, tmp_path):
    with torch.no_grad():
        tiny_policy.value_head.weight.normal_()
        tiny_policy.value_head.bias.fill_(0.5)
    tiny_policy.save(tmp_path / "p")
    loaded = Policy.from_pretrained(str(tmp_path / "p"))
    torch.testing.assert_close(loaded.value_head.weight, tiny_policy.value_head.weight)
    torch.testing.assert_close(loaded.value_head.bias, tiny_policy.value_head.bias)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    ids = torch.tensor([[3, 10, 20, 30, 40]])
    torch.testing.assert_close(plain(ids).logits, tiny_policy.model(ids).logits)
    assert loaded.tokenizer("hello world")["input_ids"] == tiny_policy.tokenizer("hello world")["input_ids"]


def test_lora_reference_disables_the_adapter_and_saves_merged(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rlgen.models import build_tiny_model

    base = build_tiny_model(tiny_tokenizer, seed=0)
    plain = build_tiny_model(tiny_tokenizer, seed=0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    policy = Policy(peft, tiny_tokenizer)
    assert policy.ref_model is None  # no frozen copy under LoRA
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ro = policy.sample(PROMPTS, SamplingConfig(max_new_tokens=6))
    T = ro.completion_ids.shape[1]
    ref = policy.ref_logprobs(ro.input_ids, ro.attention_mask, T)
    expected = Policy(plain, tiny_tokenizer, reference=False).forward(ro.input_ids, ro.attention_mask, T)[0]
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    lp, _, _ = policy.forward(ro.input_ids, ro.attention_mask, T)
    assert not torch.allclose(lp, ref)
    policy.save(tmp_path / "lora")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter").is_dir()
    reloaded = Policy(merged, tiny_tokenizer, reference=False).forward(ro.input_ids, ro.attention_mask, T)[0]
    torch.testing.assert_close(reloaded, lp, atol=1e-4, rtol=1e-4)


def test_separate_critic_gives_values_and_round_trips(tiny_tokenizer, tmp_path):
    import copy

    from rlgen.models import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, seed=0)
    policy = Policy(model, tiny_tokenizer, critic=copy.deepcopy(model.base_model))
    torch.manual_seed(0)
    with torch.no_grad():
        policy.value_head.weight.normal_()
        for p in policy.critic.parameters():  # no longer the policy's trunk: shared-trunk values would differ
            p.add_(0.05 * torch.randn_like(p))
    ro = policy.sample(PROMPTS, SamplingConfig(max_new_tokens=5))
    T = ro.completion_ids.shape[1]
    _, values, _ = policy.forward(ro.input_ids, ro.attention_mask, T)
    m = ro.completion_mask.bool()
    for i in range(len(PROMPTS)):  # by hand: the critic on the unpadded row, hidden state P - 1 + t values token t
        P = int(ro.prompt_mask[i].sum())
        ids = torch.cat([ro.prompt_ids[i][-P:], ro.completion_ids[i]])[None]
        with torch.no_grad():
            expected = policy.value_head(policy.critic(input_ids=ids).last_hidden_state[0, P - 1:P - 1 + T])[:, 0]
        torch.testing.assert_close(ro.values[i][m[i]], expected[m[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i][m[i]], expected[m[i]], atol=1e-5, rtol=1e-5)
    policy.save(tmp_path / "c")
    loaded = Policy.from_pretrained(str(tmp_path / "c"), separate_critic=True)
    _, values2, _ = loaded.forward(ro.input_ids, ro.attention_mask, T)
    torch.testing.assert_close(values2[m], values[m], atol=1e-5, rtol=1e-5)


def test_a_model_folders_generation_config_does_not_change_sampling(tiny_folder, tmp_path):
    """generate() fills every field rlgen leaves unset from the folder's generation_config.json; each of these
    would change the sampled tokens (and with them the log-probs). Same weights, same seed: same rollout."""
    from conftest import opinionated_copy

    folder = opinionated_copy(tiny_folder, tmp_path)
    settings = SamplingConfig(max_new_tokens=12, temperature=0.7)
    rollouts = []
    for path in (tiny_folder, folder):
        policy = Policy.from_pretrained(str(path), reference=False)
        torch.manual_seed(0)
        rollouts.append(policy.sample(PROMPTS * 3, settings, with_values=False))
    plain, opinionated = rollouts
    assert torch.equal(opinionated.completion_ids, plain.completion_ids)
    assert opinionated.completions == plain.completions
    torch.testing.assert_close(opinionated.logprobs, plain.logprobs, atol=0, rtol=0)
    # the stored log-probs are those of the distribution that sampled: a plain forward pass at the temperature
    T = opinionated.completion_ids.shape[1]
    forward, _, _ = policy.forward(opinionated.input_ids, opinionated.attention_mask, T, temperature=0.7)
    torch.testing.assert_close(opinionated.logprobs, forward * opinionated.completion_mask, atol=1e-4, rtol=1e-4)


def _lora_policy(tiny_tokenizer):
    """A tiny LoRA policy with a non-zero adapter and value head."""
    from peft import LoraConfig, get_peft_model

    from rlgen.models import build_tiny_model

    peft = get_peft_model(build_tiny_model(tiny_tokenizer, seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    policy = Policy(peft, tiny_tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        policy.value_head.weight.normal_()
    return policy


def test_merged_lora_sampling_equals_unmerged(tiny_tokenizer, monkeypatch):
    """Sampling folds the adapter into the weights: same tokens as through PEFT's adapter layers with the same
    seed, log-probs and values within 1e-5 (fp32), and the base weights (the reference) restored bit for bit."""
    from contextlib import nullcontext

    import rlgen.policy

    policy = _lora_policy(tiny_tokenizer)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    settings = SamplingConfig(max_new_tokens=10, temperature=0.8)
    torch.manual_seed(3)
    merged = policy.sample(PROMPTS, settings)
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.setattr(rlgen.policy, "merged_lora", lambda model: nullcontext())
    torch.manual_seed(3)
    unmerged = policy.sample(PROMPTS, settings)
    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    torch.testing.assert_close(merged.logprobs, unmerged.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.values, unmerged.values, atol=1e-5, rtol=1e-5)
    T = merged.completion_ids.shape[1]
    logprobs, _, _ = policy.forward(merged.input_ids, merged.attention_mask, T, temperature=0.8)
    m = merged.completion_mask.bool()
    torch.testing.assert_close(merged.logprobs[m], logprobs[m], atol=1e-5, rtol=1e-5)


def test_merged_lora_restores_the_weights_on_error(tiny_tokenizer):
    from rlgen.policy import merged_lora

    policy = _lora_policy(tiny_tokenizer)
    ids = torch.tensor([[3, 10, 20, 30]])
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    adapted = policy.model(ids).logits
    with pytest.raises(KeyboardInterrupt):
        with merged_lora(policy.model):
            assert any(not torch.equal(v, before[k]) for k, v in policy.model.state_dict().items())  # merged
            torch.testing.assert_close(policy.model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
            raise KeyboardInterrupt
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(policy.model(ids).logits, adapted)


def _cpu_bf16() -> bool:
    from rlgen.models import _cpu_runs

    return _cpu_runs(torch.bfloat16)


@pytest.mark.skipif(not _cpu_bf16(), reason="this CPU has no bfloat16 kernels")
def test_bfloat16_policy_keeps_float32_logprobs_and_values(tiny_tokenizer):
    """Weights in bf16, maths in fp32. The generation pass (KV cache) and one full forward round differently in
    bf16 (0.04 nats per token on average on the default model), so a bf16 rollout's log-probs and values are
    re-read with one forward pass: they equal `forward`'s, and the first PPO ratio is exactly 1."""
    from rlgen.models import build_tiny_model

    policy = Policy(build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16), tiny_tokenizer)
    torch.manual_seed(0)
    ro = policy.sample(PROMPTS, SamplingConfig(max_new_tokens=12))
    T = ro.completion_ids.shape[1]
    logprobs, values, entropy = policy.forward(ro.input_ids, ro.attention_mask, T, with_entropy=True)
    ref = policy.ref_logprobs(ro.input_ids, ro.attention_mask, T)
    assert {t.dtype for t in (ro.logprobs, ro.values, logprobs, values, entropy, ref)} == {torch.float32}
    m = ro.completion_mask.bool()
    torch.testing.assert_close(ro.logprobs[m], logprobs[m], atol=0, rtol=0)
    torch.testing.assert_close(ro.values[m], values[m], atol=0, rtol=0)
    torch.testing.assert_close(ref, logprobs)  # the frozen copy is the same bf16 model


def test_gradient_checkpointing_in_eval_mode_gives_the_same_gradients(tiny_tokenizer):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rlgen.models import build_tiny_model

    ids = torch.tensor([[3, 10, 20, 30, 40, 50], [0, 3, 11, 21, 31, 41]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    grads, calls = [], []
    for checkpoint in (False, True):
        policy = Policy(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, reference=False).eval()
        with torch.no_grad():
            policy.value_head.weight.fill_(0.1)
        if checkpoint:
            policy.checkpoint_in_eval()
            layers = [m for m in policy.modules() if isinstance(m, GradientCheckpointingLayer)]
            assert layers and all(m.training for m in layers) and policy.base_model.is_gradient_checkpointing
            assert not any(m.training for m in policy.modules() if not isinstance(m, GradientCheckpointingLayer))
            for m in layers:  # count the checkpointed layer calls
                m._gradient_checkpointing_func = lambda *a, f=m._gradient_checkpointing_func, **k: (
                    calls.append(1), f(*a, **k))[1]
        logprobs, values, _ = policy(ids, mask, 3)
        (logprobs.sum() + values.sum()).backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert len(calls) == len(layers)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_static_cache_sampling_matches_a_forward(tiny_policy):
    """The CUDA path (static KV cache, generate compiles the decoding step), forced on the CPU: the hooks registered
    before compilation still read every step, across a recompilation for a new batch size and a cached graph."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default")  # no CUDA graphs on the CPU
    compile_config._compile_all_devices = True
    tiny_policy._cache_settings = lambda s: {"cache_implementation": "static", "compile_config": compile_config,
                                             "max_cache_len": s.max_prompt_length + s.max_new_tokens}
    tiny_policy.value_head.weight.data.normal_()
    for prompts in (PROMPTS, PROMPTS[:2], PROMPTS[:2]):
        ro = tiny_policy.sample(prompts, SamplingConfig(max_new_tokens=12, max_prompt_length=32))
        logprobs, values, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1])
        m = ro.completion_mask.bool()
        torch.testing.assert_close(ro.logprobs[m], logprobs[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.values[m], values[m], atol=1e-5, rtol=1e-5)
    assert hasattr(tiny_policy.base_model, "_compiled_call")  # generate did compile the decoding step


@pytest.mark.skipif(not _cpu_bf16(), reason="this CPU has no bfloat16 kernels")
def test_half_precision_lora_samples_through_the_adapter_unmerged(tiny_tokenizer, monkeypatch):
    """Merging the adapter into bf16 weights rounds W + BA, so the policy that sampled would differ from the one
    whose log-probs the forward pass re-reads: in half precision generate runs on the untouched base weights."""
    from peft import LoraConfig, get_peft_model

    from rlgen.models import build_tiny_model

    peft = get_peft_model(build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    policy = Policy(peft, tiny_tokenizer)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    generate, untouched = peft.generate, []

    def spy(*args, **kwargs):
        untouched.append(all(torch.equal(v, before[k]) for k, v in peft.state_dict().items()))
        return generate(*args, **kwargs)

    monkeypatch.setattr(peft, "generate", spy)
    torch.manual_seed(0)
    ro = policy.sample(PROMPTS, SamplingConfig(max_new_tokens=6))
    assert untouched == [True]
    T = ro.completion_ids.shape[1]
    logprobs, _, _ = policy.forward(ro.input_ids, ro.attention_mask, T)
    assert torch.equal(ro.logprobs, logprobs * ro.completion_mask)


def test_hooks_come_off_for_someone_elses_training_and_back_for_sampling(tiny_policy):
    """remove_hooks leaves the model without the Policy's forward hooks (TRL trains it meanwhile); add_hooks puts
    the same recorder back once, and sampling reads its log-probs through it again."""
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_policy.model.modules())

    on = hooks()
    tiny_policy.remove_hooks()
    assert on == 3 and hooks() == 0
    tiny_policy.add_hooks()
    tiny_policy.add_hooks()
    assert hooks() == on
    torch.manual_seed(0)
    ro = tiny_policy.sample(PROMPTS, SamplingConfig(max_new_tokens=6), with_values=False)
    logprobs, _, _ = tiny_policy.forward(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1])
    torch.testing.assert_close(ro.logprobs, logprobs * ro.completion_mask, atol=1e-5, rtol=1e-5)
