"""SeqGAN: MC-rollout rewards against exact expectations, the LSTM model, the discriminator, tiny oracle runs."""

import dataclasses
import itertools
import json

import pytest
import torch

from rlgen import core
from rlgen.config import SamplingConfig, SeqGANConfig, apply_preset
from rlgen.errors import UserError
from rlgen.lstm import SeqGANLSTMConfig, SeqGANLSTMForCausalLM, build_oracle, build_token_tokenizer
from rlgen.policy import Policy
from rlgen.seqgan import train_seqgan
from rlgen.seqgan_tasks import generate_rollout_texts, lstm_rollouts

torch.set_num_threads(1)


def tiny_lstm(vocab=3, emb=4, hidden=5, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = SeqGANLSTMForCausalLM(SeqGANLSTMConfig(vocab_size=vocab, embedding_size=emb, hidden_size=hidden,
                                                   initializer_range=scale))
    return model.eval()


def token_score(ids):
    """A toy D whose score is a known function of the tokens: share of 1s, plus 0.5 if the last token is 2."""
    return (ids == 1).float().mean(-1) + 0.5 * (ids[..., -1] == 2).float()


@torch.no_grad()
def exact_q(model, seq, score):
    """E[score(full) | prefix y_1..t] for t < T by enumerating every completion (naive loop), score at t = T."""
    T, V = len(seq), model.config.vocab_size
    q = []
    for t in range(1, T):
        expected = 0.0
        for tail in itertools.product(range(V), repeat=T - t):
            full = torch.tensor(list(seq[:t]) + list(tail))
            logp = model.nll(full[None]) * -T  # sum of log-probs of the whole sequence ...
            prefix_logp = -model.nll(full[None, :t]) * t  # ... minus that of the fixed prefix
            expected += float(torch.exp(torch.tensor(logp - prefix_logp))) * float(score(full))
        q.append(expected)
    q.append(float(score(torch.tensor(seq))))
    return torch.tensor(q)


def test_rollouts_keep_prefixes_and_shapes():
    model = tiny_lstm(vocab=7)
    seqs = torch.randint(7, (3, 6), generator=torch.Generator().manual_seed(0))
    rolls = lstm_rollouts(model, seqs, n=5, generator=torch.Generator().manual_seed(1), chunk=7)
    assert rolls.shape == (5, 5, 3, 6)
    for t in range(1, 6):
        assert torch.equal(rolls[t - 1, :, :, :t], seqs[None, :, :t].expand(5, 3, t))
    assert rolls.min() >= 0 and rolls.max() < 7


def test_mc_q_matches_exact_expectation():
    """Q from batched rollouts + monte_carlo_q_values equals the enumerated expectation (within MC error)."""
    model = tiny_lstm(vocab=3, scale=1.0)
    seqs = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    n = 3000
    rolls = lstm_rollouts(model, seqs, n=n, generator=torch.Generator().manual_seed(2))  # [T-1, N, B, T]
    q = core.monte_carlo_q_values(token_score(rolls), token_score(seqs))  # [B, T]
    for b in range(2):
        expected = exact_q(model, seqs[b].tolist(), token_score)
        assert q[b, -1] == pytest.approx(float(expected[-1]), abs=1e-6)  # t = T: D of the whole sequence
        assert torch.allclose(q[b, :-1].double(), expected[:-1].double(), atol=0.03)


def test_mc_q_averages_rollouts_exactly_for_prefix_only_scores():
    """A D that reads only y_1 gives Q(t) = D for every t, whatever the rollouts."""
    model = tiny_lstm(vocab=5)
    seqs = torch.tensor([[1, 0, 0, 0, 0], [3, 4, 4, 4, 4]])
    rolls = lstm_rollouts(model, seqs, n=4)
    q = core.monte_carlo_q_values(rolls[..., 0].float() / 10, seqs[:, 0].float() / 10)
    assert torch.allclose(q, torch.tensor([[0.1] * 5, [0.3] * 5]))


def test_text_rollouts_run_to_max_new_tokens_with_the_run_sampling(tiny_policy, monkeypatch):
    """A batch whose longest completion has 3 tokens: a rollout of prefix t still continues up to
    max_new_tokens - t tokens, and samples as the run does (temperature, min_new_tokens)."""
    policy = tiny_policy
    eos, pad = policy.eos_token_ids[0], policy.tokenizer.pad_token_id
    completion_ids = torch.tensor([[5, 6, eos], [7, eos, pad]])
    prompt_ids, prompt_mask = policy.tokenize_prompts(["hi", "how are you"], 16)
    configs, generate = [], policy.model.generate

    def spy(**kwargs):
        configs.append(kwargs["generation_config"])
        return generate(**kwargs)

    monkeypatch.setattr(policy.model, "generate", spy)
    sampling = SamplingConfig(max_new_tokens=8, min_new_tokens=5, temperature=0.7)
    torch.manual_seed(0)
    texts, rows, n_tokens = generate_rollout_texts(policy.model, policy, prompt_ids, prompt_mask, completion_ids,
                                                   torch.tensor([3, 2]), 2, sampling)
    assert [(c.max_new_tokens, c.min_new_tokens, c.temperature) for c in configs] == [(7, 4, 0.7), (6, 3, 0.7)]
    assert [r.tolist() for r in rows] == [[0, 1], [0]]
    assert n_tokens >= 2 * 2 * 4 + 2 * 3  # EOS blocked before min_new_tokens: longer than the batch's 3 tokens
    prefix_1 = policy.tokenizer.decode([5], skip_special_tokens=True).strip()
    assert all(text.startswith(prefix_1) for text in texts[0][:2])


def test_lstm_generate_matches_manual_sampling_loop():
    model = tiny_lstm(vocab=11, emb=6, hidden=8, seed=3)
    policy = Policy(model, build_token_tokenizer(11), reference=False)
    torch.manual_seed(123)
    ro = policy.sample(["0"] * 4, SamplingConfig(max_new_tokens=6), with_values=False)
    torch.manual_seed(123)
    ids = torch.zeros(4, 1, dtype=torch.long)
    for _ in range(6):  # no cache: the whole sequence each step
        probs = torch.softmax(model(ids).logits[:, -1], dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
    assert torch.equal(ro.completion_ids, ids[:, 1:])
    assert ro.completions[0] == " ".join(str(i) for i in ids[0, 1:].tolist())
    logprobs, _, _ = policy(ro.input_ids, ro.attention_mask, 6, with_values=False)
    assert torch.allclose(logprobs, ro.logprobs, atol=1e-5)


def test_lstm_left_padding_and_step_match_full_forward():
    model = tiny_lstm(vocab=9, seed=4)
    x = torch.randint(9, (2, 5), generator=torch.Generator().manual_seed(0))
    full = model(x).logits
    h, _ = model.states(x)
    assert torch.allclose(model.lm_head(h), full, atol=1e-5)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(x)], 1)
    assert torch.allclose(model(padded, attention_mask=mask).logits[:, 3:], full, atol=1e-5)


def test_oracle_params_round_trip(tmp_path):
    """An .npz in the authors' layout reproduces the oracle it was written from (gate order, transposes)."""
    import numpy as np

    src = build_oracle(13, 4, 6, seed=5)
    W, U, b = src.lstm.weight_ih_l0.T, src.lstm.weight_hh_l0.T, src.lstm.bias_ih_l0
    names = {"i": 0, "f": 1, "c": 2, "og": 3}
    arrays = {"emb": src.embedding.weight, "Wo": src.lm_head.weight.T, "bo": src.lm_head.bias}
    for gate, k in names.items():
        arrays[f"W{gate}"], arrays[f"U{gate}"], arrays[f"b{gate}"] = W[:, 6 * k:6 * k + 6], U[:, 6 * k:6 * k + 6], b[6 * k:6 * k + 6]
    np.savez(tmp_path / "o.npz", **{k: v.detach().numpy() for k, v in arrays.items()})
    loaded = build_oracle(13, 4, 6, seed=99, params=str(tmp_path / "o.npz"))
    x = torch.randint(13, (3, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded(x).logits, src(x).logits, atol=1e-5)
    with pytest.raises(UserError, match="shape"):
        build_oracle(14, 4, 6, seed=0, params=str(tmp_path / "o.npz"))


def test_oracle_sanity_n01_own_samples_beat_uniform():
    oracle = build_oracle(5000, 32, 32, seed=0)
    g = torch.Generator().manual_seed(0)
    own, logps = oracle.sample(300, 20, generator=g)
    uniform = torch.randint(5000, (300, 20), generator=g)
    own_nll, uniform_nll = oracle.nll(own), oracle.nll(uniform)
    assert own_nll == pytest.approx(float(-logps.mean()), abs=1e-4)
    assert own_nll < uniform_nll - 3.0
    assert 10.5 < uniform_nll < 12.5


def tiny_oracle_config(tmp_path, **kw):
    base = dict(task="oracle", model="lstm", discriminator="cnn", output_dir=str(tmp_path / "run"),
                vocab_size=12, seq_len=6, embedding_size=8, hidden_size=8, num_train=640, num_test=500,
                eval_samples=2000, batch_size=64, mle_epochs=1, mle_eval_every=0, d_pretrain_rounds=2,
                d_pretrain_epochs=2, d_negatives=640, d_embedding_size=16, max_steps=12, g_steps=2,
                rollout_num=8, d_steps=1, d_epochs=1, eval_every=0, eval_temperatures=[1.0, 0.8], oracle_seed=1,
                seed=0)
    return SeqGANConfig(**{**base, **kw})


def test_tiny_oracle_adversarial_training_lowers_nll_oracle(tmp_path):
    result = train_seqgan(tiny_oracle_config(tmp_path))
    s = result.summary
    assert s["adv"]["eval/nll_oracle"] < s["mle"]["eval/nll_oracle"] - 0.05
    assert [row["temperature"] for row in s["temperature_sweep_mle"]] == [1.0, 0.8]
    assert s["g_step_split"]["rollout"] > 0 and s["s_per_d_step"] > 0
    assert (tmp_path / "run" / "config.json").is_file()
    assert not (tmp_path / "run" / "value_head.safetensors").exists()  # SeqGAN trains no value head
    assert (tmp_path / "run" / "discriminator" / "cnn_discriminator.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/mle" in r for r in rows) and rows[-1]["step"] == 12 and "eval/nll_oracle" in rows[-1]
    reloaded = Policy.from_pretrained(str(tmp_path / "run"), reference=False)  # AutoModelForCausalLM round trip
    x = torch.randint(12, (2, 6))
    assert isinstance(reloaded.base_model, SeqGANLSTMForCausalLM)
    assert torch.allclose(reloaded.base_model(x).logits, result.policy.base_model(x).logits, atol=1e-6)


def test_tiny_oracle_run_gives_pinned_numbers(tmp_path, monkeypatch, capsys):
    """The same seed gives the same numbers: a refactor of the stage must leave them unchanged (CPU). The last
    line states the result; the summary's settings are only those the oracle task reads."""
    monkeypatch.setattr("rlgen.seqgan.default_device", lambda: torch.device("cpu"))
    cfg = tiny_oracle_config(tmp_path, max_steps=2, eval_every=1, kl_coef=0.05, baseline="mean")
    s = train_seqgan(cfg).summary
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[seqgan] NLL-oracle after MLE 2.869 -> after SeqGAN 2.711 (change -0.158; lower is better)")
    assert {"vocab_size", "seq_len", "d_embedding_size", "kl_coef", "mle_epochs"} <= set(s["settings"])
    assert not {"dataset", "max_new_tokens", "lora_r", "mle_steps", "eval_num_prompts", "d_max_length"} & set(
        s["settings"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "loss/policy" in r]
    assert s["mle"]["eval/nll_oracle"] == pytest.approx(2.868752705891927, rel=1e-5)
    assert s["adv"]["eval/nll_oracle"] == pytest.approx(2.710649393717448, rel=1e-5)
    assert s["adv"]["eval/nll_self"] == pytest.approx(2.393767833709717, rel=1e-5)
    assert [r["loss/policy"] for r in epochs] == pytest.approx([-0.019052302464842796, -0.022585293278098106], rel=1e-4)
    assert [r["objective/kl"] for r in epochs] == pytest.approx([0.006042212247848511, 0.032341599464416504], rel=1e-4)
    assert [r["loss/d"] for r in epochs] == pytest.approx([0.6173773676156997, 0.6575187563896179], rel=1e-5)
    assert [r["eval/d_accuracy_heldout"] for r in epochs] == pytest.approx([0.694, 0.61])


def test_presets_fill_only_default_fields():
    cfg = apply_preset(SeqGANConfig(task="oracle", model="lstm", preset="cpu", max_steps=7))
    assert (cfg.mle_epochs, cfg.d_pretrain_rounds, cfg.d_epochs, cfg.max_steps) == (50, 5, 1, 7)
    with pytest.raises(UserError, match="preset"):
        apply_preset(SeqGANConfig(preset="fast"))


def test_text_task_has_its_own_defaults():
    """Before, `--task text` ran the paper's oracle schedule (50 D pre-training rounds of 10,000 negatives, the
    LSTM's learning rate 0.01). Given options win; the oracle's defaults stay; --help names each text default."""
    from rlgen.config.stages import TEXT_DEFAULTS

    cfg = apply_preset(SeqGANConfig(task="text", model="tiny", d_steps=2))
    assert (cfg.d_pretrain_rounds, cfg.d_negatives, cfg.learning_rate, cfg.rollout_num, cfg.d_steps) == (3, 256, 1e-5,
                                                                                                        4, 2)
    assert {k: getattr(cfg, k) for k in TEXT_DEFAULTS if k != "d_steps"} == {k: v for k, v in TEXT_DEFAULTS.items()
                                                                           if k != "d_steps"}
    oracle = apply_preset(SeqGANConfig(task="oracle", model="lstm"))
    assert (oracle.d_pretrain_rounds, oracle.d_negatives, oracle.learning_rate) == (50, 10000, 0.01)
    fields = {f.name: f for f in dataclasses.fields(SeqGANConfig)}
    for name, value in TEXT_DEFAULTS.items():
        assert f"task text: {value}" in fields[name].metadata["help"], name
    with pytest.raises(UserError, match="preset cpu is an oracle schedule"):
        SeqGANConfig(task="text", preset="cpu")
    assert apply_preset(SeqGANConfig(task="text", preset="none")) == SeqGANConfig(task="text", preset="none")


def test_compare_keeps_its_seqgan_values_equal_to_the_oracle_defaults():
    """A comparison's values are its own, even where they equal a default the text task replaces."""
    from pathlib import Path

    from rlgen.config import CompareConfig

    compare = CompareConfig(model="tiny", methods=["seqgan"], seeds=[0], max_steps=5, batch_size=64,
                            max_new_tokens=48)
    stage = apply_preset(compare.method_config("seqgan", "tiny", Path("o"), 0))
    assert (stage.batch_size, stage.max_new_tokens, stage.d_pretrain_rounds) == (64, 48, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(task="oracle", model="default"), "model: lstm"),
    (dict(task="images"), "task"),
    (dict(task="oracle", model="lstm", oracle_params="/nonexistent/o.npz"), "oracle_params"),
    (dict(task="oracle", model="lstm", baseline="critic"), "baseline"),
    (dict(task="oracle", model="lstm", rollout_update_rate=1.0), "rollout_update_rate"),
    (dict(task="oracle", model="lstm", discriminator="minilm"), "discriminator: cnn"),
    (dict(task="text", model="tiny", discriminator="cnn"), "minilm"),
    (dict(task="text", model="tiny", discriminator="/nonexistent/d"), "does not exist"),
])
def test_bad_config_raises_user_error(tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        train_seqgan(SeqGANConfig(output_dir=str(tmp_path / "run"), **kw))


def test_text_task_runs_with_rollouts_and_evaluator(tmp_path, tiny_classifier, monkeypatch):
    """The final evaluation scores the first 4 test prompts' samples with D (eval/rewards/discriminator/mean is
    D's mean P(real) on the saved samples), and eval/d_accuracy is D's accuracy on exactly those prompts' real
    replies (label real) and the 4 fresh replies sampled for it (label generated)."""
    from rlgen.data import load_rows
    from rlgen.discriminator import prob_real
    from rlgen.files import read_jsonl
    from rlgen.metrics import distinct_n
    from rlgen.seqgan import discriminator
    from rlgen.seqgan_tasks import TextTask

    drawn, negatives = [], TextTask.negatives  # every call's generated replies: the last are eval/d_accuracy's

    def recorded(self, policy, n):
        drawn.append(negatives(self, policy, n))
        return drawn[-1]

    monkeypatch.setattr(TextTask, "negatives", recorded)
    cfg = SeqGANConfig(task="text", model="tiny", discriminator=tiny_classifier, output_dir=str(tmp_path / "run"),
                       max_new_tokens=4, batch_size=4, max_steps=1, rollout_num=2, rollout_update_rate=0.8,
                       learning_rate=1e-4, max_grad_norm=1.0, baseline="mean", kl_coef=0.05, d_pretrain_rounds=2,
                       d_pretrain_epochs=8, d_negatives=8, d_learning_rate=3e-3, d_max_length=16, eval_num_prompts=4)
    result = train_seqgan(cfg)
    s, d = result.summary, result.discriminator
    assert s["g_step_split"]["rollout"] > 0
    assert "d_max_length" in s["settings"] and not {"vocab_size", "oracle_seed", "d_embedding_size"} & set(s["settings"])
    rows = load_rows(cfg.dataset, "test", columns=("prompt", "completion"))[:4]
    samples = read_jsonl(tmp_path / "run" / "eval_samples.jsonl")
    assert [x["prompt"] for x in samples] == [r["prompt"] for r in rows]
    completions = [x["completion"] for x in samples]
    d_scores = prob_real(d, completions)
    assert [x["reward"] for x in samples] == pytest.approx(d_scores.tolist(), abs=1e-6)
    assert s["adv"]["eval/rewards/discriminator/mean"] == pytest.approx(float(d_scores.mean()), abs=1e-6)
    assert s["adv"]["eval/distinct_1"] == pytest.approx(distinct_n(completions, 1))
    # [2 pre-training rounds, the epoch's D step, eval/d_accuracy's fakes]: 8, 8, 8 and 4 fresh replies
    assert [len(texts) for texts in drawn] == [8, 8, 8, 4]
    real_right = int((prob_real(d, [r["completion"] for r in rows]) > 0.5).sum())
    fake_right = int((prob_real(d, drawn[-1]) <= 0.5).sum())
    assert real_right + fake_right > 4  # D tells them apart, so swapped labels or sets would show
    assert s["adv"]["eval/d_accuracy"] == (real_right + fake_right) / 8
    # the saved D as a reward: the same P(real) as the trained one (texts shorter than d_max_length)
    values = discriminator(["hi", "hi"], ["hello there", "ok"], folder=str(tmp_path / "run" / "discriminator"))
    assert values == pytest.approx(prob_real(d, ["hello there", "ok"]).tolist(), abs=1e-6)


def test_temperature_sweep_any_policy(tiny_policy):
    from rlgen.oracle import temperature_sweep

    rows = temperature_sweep(tiny_policy, [1.0, 0.5], prompts=["hi", "how are you"],
                             sampling=SamplingConfig(max_new_tokens=4))
    assert [r["temperature"] for r in rows] == [1.0, 0.5]
    assert all("eval/distinct_1" in r and "eval/perplexity_ref" in r for r in rows)


def test_nll_oracle_at_entropy_interpolates_between_bracketing_temperatures():
    from rlgen.oracle import nll_oracle_at_entropy

    sweep = [{"temperature": t, "eval/nll_self": h, "eval/nll_oracle": o}  # order of the rows does not matter
             for t, h, o in [(0.9, 6.0, 9.1), (1.0, 6.4, 9.3), (0.95, 6.2, 9.2)]]
    assert nll_oracle_at_entropy(sweep, 6.1) == pytest.approx(9.15)
    assert nll_oracle_at_entropy(sweep, 6.35) == pytest.approx(9.2 + 0.1 * 0.15 / 0.2)
    assert nll_oracle_at_entropy(sweep, 6.4) == pytest.approx(9.3)
    assert nll_oracle_at_entropy(sweep, 5.99) is None and nll_oracle_at_entropy(sweep, 6.41) is None


@pytest.mark.parametrize("name", ["seqgan_oracle.yaml", "seqgan_chitchat.yaml"])
def test_experiment_files_are_valid_configs(name, tmp_path):
    from pathlib import Path

    from conftest import load_shipped_yaml

    from rlgen.config import build_config

    path = Path(__file__).resolve().parents[1] / "experiments" / name
    cfg = apply_preset(build_config(SeqGANConfig, load_shipped_yaml(path, tmp_path), str(path)))
    assert cfg.task in ("oracle", "text")
    if cfg.task == "oracle":
        assert (cfg.mle_epochs, cfg.d_pretrain_rounds, cfg.max_steps, cfg.rollout_num) == (50, 5, 33, 16)
        assert cfg.oracle_params is None  # issue 30, item 7: it named ../shared, outside the repository


def test_oracle_params_empty_or_none(capsys):
    """Issue 30, item 7: `--oracle_params ""` said "oracle_params  does not exist"; `none` is the seeded oracle."""
    from rlgen.cli import main

    assert main(["seqgan", "--task", "oracle", "--model", "lstm", "--oracle_params", ""]) == 2
    assert capsys.readouterr().err == ("rlgen: error: command line and flags: oracle_params is empty: give an .npz file "
                                       "of the oracle's arrays, or none (the default) for an N(0, 1) oracle drawn from "
                                       "oracle_seed\n")
    from rlgen.config import build_config

    cfg = build_config(SeqGANConfig, {"task": "oracle", "model": "lstm", "oracle_params": "none"}, "x.yaml")
    assert cfg.oracle_params is None


def test_compare_refuses_a_seqgan_budget_below_three_steps():
    from rlgen.config import CompareConfig

    with pytest.raises(UserError, match="seqgan needs max_steps >= 3"):
        CompareConfig(model="tiny", methods=["ppo", "seqgan"], seeds=[0], max_steps=2, batch_size=4)
    CompareConfig(model="tiny", methods=["ppo"], seeds=[0], max_steps=2, batch_size=4)


@pytest.mark.parametrize("max_steps", [3, 4])
def test_compare_seqgan_run_keeps_the_budget_and_counts_every_token(tmp_path, tiny_folder, tiny_classifier,
                                                                    monkeypatch, max_steps):
    """At most max_steps x batch_size completions; every sequence `generate` makes is a completion or a rollout,
    and `tokens` counts the tokens of both."""
    from rlgen.config import CompareConfig
    from rlgen.policy import completion_mask_from_ids

    cfg = CompareConfig(model=str(tiny_folder), methods=["seqgan"], seeds=[0], max_steps=max_steps, batch_size=4,
                        max_new_tokens=4, seqgan={"discriminator": tiny_classifier, "d_max_length": 16})
    stage = cfg.method_config("seqgan", str(tiny_folder), tmp_path / "run", 0)
    policy = Policy.from_pretrained(str(tiny_folder), reference=True)
    made, generate = {"sequences": 0, "tokens": 0}, policy.model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        new = out.sequences[:, kwargs["input_ids"].shape[1]:]
        made["sequences"] += len(new)
        made["tokens"] += int(completion_mask_from_ids(new, policy.eos_token_ids)[0].sum())
        return out

    monkeypatch.setattr(policy.model, "generate", spy)
    generated = train_seqgan(stage, policy).summary["generated"]
    assert generated["completions"] <= max_steps * cfg.batch_size
    assert generated["completions"] + generated["rollouts"] == made["sequences"]
    assert generated["tokens"] == made["tokens"] and generated["rollout_tokens"] > 0


def test_lora_kl_reference_is_the_mle_generator(tmp_path, tiny_folder, tiny_classifier, monkeypatch):
    """Text task, LoRA, SFT as MLE pre-training: the KL reference is the SFT'd generator (the adapter at the end
    of MLE, merged), not the base model under the disabled adapter (what it was before the fix)."""
    from safetensors.torch import load_file

    monkeypatch.setattr("rlgen.seqgan.default_device", lambda: torch.device("cpu"))
    cfg = SeqGANConfig(task="text", model=str(tiny_folder), discriminator=tiny_classifier, lora_r=4,
                       output_dir=str(tmp_path / "run"), mle_steps=2, max_new_tokens=4, batch_size=4, max_steps=1,
                       rollout_num=2, learning_rate=1e-3, kl_coef=0.05, d_pretrain_rounds=1, d_pretrain_epochs=1,
                       d_negatives=8, d_max_length=16, eval_num_prompts=0)
    policy = train_seqgan(cfg).policy
    mle = load_file(str(tmp_path / "run" / "sft" / "model.safetensors"))  # SFT saves its generator merged
    base = load_file(str(tiny_folder / "model.safetensors"))
    assert policy.is_peft and policy.ref_model is not None
    reference = policy.ref_model.state_dict()
    assert any(not torch.equal(mle[k], base[k]) for k in mle)  # MLE moved the merged weights
    for name, weight in mle.items():
        assert torch.equal(reference[name], weight), name
    ro = policy.sample(["hi", "how are you"], SamplingConfig(max_new_tokens=4), with_values=False)
    sft = Policy.from_pretrained(str(tmp_path / "run" / "sft"), reference=False)
    expected, _, _ = sft(ro.input_ids, ro.attention_mask, 4, with_values=False)
    assert torch.allclose(policy.ref_logprobs(ro.input_ids, ro.attention_mask, 4), expected, atol=1e-6)
