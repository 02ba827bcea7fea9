"""Adversarial rewards (rlgen.adversarial): discriminator losses and reward transforms against plain loops and
hand values, mask invariance."""

import math

import pytest
import torch

from rlgen import adversarial as adv
from tests.conftest import STOP_REWARD

torch.set_num_threads(1)
D = torch.float64


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def rand_mask(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(D)


def garbage_at_padding(x, mask, seed=1):
    """x with huge random values (and an inf) where mask is 0."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e4
    out = torch.where(mask.bool(), x, junk)
    padding = (mask == 0).nonzero()
    if len(padding):
        out[tuple(padding[0])] = float("inf")
    return out


# --- discriminator losses ----------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_a_loop_and_hand_values():
    real = torch.tensor([2.0, 0.0, -1.0, 0.5], dtype=D)
    fake = torch.tensor([1.0, 0.0, 1.0, 3.0], dtype=D)
    loss, stats = adv.bradley_terry_loss(real, fake)
    expected = sum(-math.log(sigmoid(r - f)) for r, f in zip(real.tolist(), fake.tolist())) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx((1 + 0.5 + 0 + 0) / 4)  # a tie counts half
    assert stats["margin"].item() == pytest.approx((1 + 0 - 2 - 2.5) / 4)
    assert adv.bradley_terry_loss(torch.zeros(3, dtype=D), torch.zeros(3, dtype=D))[0].item() == pytest.approx(
        math.log(2))


def test_bradley_terry_gradient_pushes_real_up_and_fake_down():
    real = torch.tensor([0.3, -0.2], dtype=D, requires_grad=True)
    fake = torch.tensor([0.1, 0.4], dtype=D, requires_grad=True)
    adv.bradley_terry_loss(real, fake)[0].backward()
    # d/dr -log sigmoid(r - f) = -(1 - sigmoid(r - f)), averaged over 2 pairs
    for i in range(2):
        g = -(1 - sigmoid(real[i].item() - fake[i].item())) / 2
        assert real.grad[i].item() == pytest.approx(g)
        assert fake.grad[i].item() == pytest.approx(-g)


def test_bradley_terry_loss_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="pairs"):
        adv.bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_bce_loss_on_sequences_matches_a_loop():
    real = torch.tensor([2.0, -0.5, 0.0], dtype=D)
    fake = torch.tensor([-1.0, 0.7], dtype=D)
    loss, stats = adv.bce_loss(real, fake)
    terms = [-math.log(sigmoid(x)) for x in real.tolist()] + [-math.log(1 - sigmoid(x)) for x in fake.tolist()]
    assert loss.item() == pytest.approx(sum(terms) / 5, rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(2 / 5)  # real 2.0 and fake -1.0; logit 0 counts as generated
    assert stats["real_score"].item() == pytest.approx(0.5)


def test_bce_loss_per_token_is_a_masked_mean_and_ignores_padding():
    torch.manual_seed(0)
    real, fake = torch.randn(3, 5, dtype=D), torch.randn(2, 4, dtype=D)
    real_mask, fake_mask = rand_mask(3, 5, seed=1), rand_mask(2, 4, seed=2)
    loss, stats = adv.bce_loss(real, fake, real_mask, fake_mask)
    terms, right = [], 0
    for x, m, label in ((real, real_mask, 1), (fake, fake_mask, 0)):
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if m[b, t]:
                    p = sigmoid(x[b, t].item())
                    terms.append(-math.log(p if label else 1 - p))
                    right += (x[b, t].item() > 0) == bool(label)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(right / len(terms))
    junk_loss, junk_stats = adv.bce_loss(garbage_at_padding(real, real_mask), garbage_at_padding(fake, fake_mask, 3),
                                         real_mask, fake_mask)
    assert junk_loss.item() == loss.item()
    assert all(junk_stats[k].item() == stats[k].item() for k in stats)
    with pytest.raises(ValueError, match="both masks"):
        adv.bce_loss(real, fake, real_mask)


# --- reward transforms -------------------------------------------------------------------------------------


def test_prob_and_bt_score_rewards_by_hand():
    scores = torch.tensor([0.0, math.log(3.0), -2.0], dtype=D)
    assert adv.prob_reward(scores).tolist() == pytest.approx([0.5, 0.75, sigmoid(-2.0)])
    assert adv.bt_score_reward(scores).tolist() == scores.tolist()


def test_maligan_reward_matches_the_source_formula():
    """TextGAN-PyTorch get_mali_reward: D / (1 - D), divided by its sum, minus its mean."""
    scores = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=D)
    d = [sigmoid(s) for s in scores.tolist()]
    r = [p / (1 - p) for p in d]
    r = [x / sum(r) for x in r]
    expected = [x - sum(r) / len(r) for x in r]
    got = adv.maligan_reward(scores)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert got.sum().item() == pytest.approx(0.0, abs=1e-12)
    assert got.dtype == D


def test_maligan_reward_stays_finite_where_d_is_one():
    got = adv.maligan_reward(torch.tensor([800.0, 0.0, 1.0]))  # sigmoid(800) == 1.0: D / (1 - D) = inf
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3], abs=1e-6)


def test_dense_reward_matches_scratchgan_loop():
    torch.manual_seed(0)
    logits, mask, gamma = torch.randn(4, 6, dtype=D) * 2, rand_mask(4, 6, seed=3), 0.23
    got = adv.dense_reward(logits, mask, gamma)
    for b in range(4):
        n = int(mask[b].sum())
        r = [2 * sigmoid(logits[b, t].item()) - 1 for t in range(n)]
        for t in range(6):
            expected = sum(gamma ** (s - t) * r[s] for s in range(t, n)) if t < n else 0.0
            assert got[b, t].item() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(adv.dense_reward(garbage_at_padding(logits, mask), mask, gamma), got)


@pytest.mark.parametrize("transform", adv.TRANSFORMS)
@pytest.mark.parametrize("prompt_tokens", [0, 3])
def test_sequence_reward_reads_the_reply_tokens_only(transform, prompt_tokens):
    """Replies right-padded, after `prompt_tokens` masked prompt positions (as the discriminator scores them)."""
    torch.manual_seed(1)
    reply = rand_mask(5, 7, seed=4)
    mask = torch.cat([torch.zeros(5, prompt_tokens, dtype=D), reply], dim=1)
    token_scores = torch.randn(5, 7 + prompt_tokens, dtype=D)
    got = adv.sequence_reward(transform, token_scores, mask, gamma=0.9)
    assert torch.equal(adv.sequence_reward(transform, garbage_at_padding(token_scores, mask), mask, gamma=0.9), got)
    real = [[token_scores[b, t].item() for t in range(7 + prompt_tokens) if mask[b, t]] for b in range(5)]
    last = torch.tensor([r[-1] for r in real], dtype=D)
    dense = [sum(0.9 ** s * (2 * sigmoid(x) - 1) for s, x in enumerate(r)) for r in real]
    expected = {"prob": torch.sigmoid(last).tolist(), "bt_score": last.tolist(),
                "maligan": adv.maligan_reward(last).tolist(), "dense": dense}[transform]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_sequence_reward_names_an_unknown_transform():
    with pytest.raises(ValueError, match="unknown reward transform 'rank'"):
        adv.sequence_reward("rank", torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="no real token"):
        adv.last_token_scores(torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]))


# --- the discriminator (tiny causal LM with a score head) ---------------------------------------------------

PROMPTS = ["how are you?", "what did you do today?", "do you like cats?", "where do you live?"]
REAL = ["i am happy to talk with you.", "i went to the park with my dog.", "yes, cats are lovely.",
        "i live in a small town by the sea."]
FAKE = ["no no no no", "the the the", "cat cat", "what what what what what"]


def tiny_d(**kw):
    from rlgen.adversarial import AdversarialReward

    return AdversarialReward(**{"model": "tiny", "learning_rate": 1e-3, "batch_size": 2, "device": "cpu", **kw})


def test_discriminator_scores_each_reply_at_its_appended_eos():
    d = tiny_d(transform="prob")
    scores, mask = d.token_scores(PROMPTS[:2], ["", REAL[1]])
    n_reply = len(d.tokenizer(REAL[1], add_special_tokens=False)["input_ids"])
    assert mask.sum(1).tolist() == [1, n_reply + 1]  # the empty reply is its EOS alone
    ids, attention, _ = d._encode(PROMPTS[:2], ["", REAL[1]])
    last = attention.sum(1) - 1
    assert ids[torch.arange(2), last].tolist() == [d.tokenizer.eos_token_id] * 2
    rewards = d(PROMPTS, REAL)
    assert len(rewards) == 4 and all(0 < r < 1 for r in rewards)
    # chunked scoring (batch_size 2) pads each chunk alike: the same values as one batch of 4
    assert rewards == pytest.approx(tiny_d(transform="prob", batch_size=4)(PROMPTS, REAL), abs=1e-6)


@pytest.mark.parametrize("loss,transform", [("bt", "bt_score"), ("bce", "prob"), ("bce", "dense"), ("bt", "maligan")])
def test_discriminator_learns_to_tell_real_from_fake(loss, transform):
    d = tiny_d(loss=loss, transform=transform)
    columns = {"reference_completion": REAL}
    first = d.update(PROMPTS, FAKE, columns)
    for _ in range(15):
        last = d.update(PROMPTS, FAKE, columns)
    assert set(last) == {"loss/discriminator", "val/d_accuracy", "val/d_accuracy_train", "val/d_real_score",
                         "val/d_fake_score", "val/d_reward_std", "time/d_update"}
    assert last["loss/discriminator"] < first["loss/discriminator"]
    assert last["val/d_accuracy"] == 1.0
    assert last["val/d_real_score"] > last["val/d_fake_score"]
    if transform == "maligan":  # normalised over the call: real and fake scored together
        rewards = d(PROMPTS + PROMPTS, REAL + FAKE)
        assert min(rewards[:4]) > 0 > max(rewards[4:])
    else:
        assert min(d(PROMPTS, REAL)) > max(d(PROMPTS, FAKE))
    assert d.updates == 16


def test_discriminator_state_resumes_bit_exactly():
    import io

    a = tiny_d(batch_size=3)
    columns = {"reference_completion": REAL}
    for _ in range(2):
        a.update(PROMPTS, FAKE, columns)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    after = [a.update(PROMPTS, FAKE, columns) for _ in range(2)]

    b = tiny_d(batch_size=3, seed=1)  # another start: everything must come from the state
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))  # tensors and plain containers only
    resumed = [b.update(PROMPTS, FAKE, columns) for _ in range(2)]
    drop_time = [{k: v for k, v in m.items() if k != "time/d_update"} for m in (*after, *resumed)]
    assert drop_time[:2] == drop_time[2:]
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert b.updates == 4 and torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a(PROMPTS, FAKE) == b(PROMPTS, FAKE)


def test_a_planted_pickle_in_the_discriminator_state_is_refused_not_run(tmp_path):
    """discriminator.pt is a checkpoint file: it was read with torch.load(weights_only=False), which ran a planted
    pickle's callable (issue 30, item 1)."""
    import os

    from rlgen.errors import UserError

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    d = tiny_d(batch_size=3)
    torch.save({"model": Planted()}, tmp_path / "discriminator.pt")
    with pytest.raises(UserError, match="is not a discriminator state rlgen wrote"):
        d.load_state(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_the_loop_finds_one_adversarial_reward_and_shares_it_with_its_evaluations():
    from rlgen.errors import UserError

    live, other, rule = tiny_d(), tiny_d(), (lambda prompts, completions, **kw: [0.0] * len(completions))
    assert adv.find_adversarial([("rule", rule)]) is None
    assert adv.find_adversarial([("rule", rule), ("adversarial", live)]) is live
    with pytest.raises(UserError, match="at most one adversarial reward"):
        adv.find_adversarial([("adversarial", live), ("adversarial_2", other)])
    shared = adv.share_live([("rule", rule), ("adversarial", other)], live)
    assert shared[0] == ("rule", rule) and shared[1][0] == "adversarial" and shared[1][1] is live
    assert adv.share_live([("adversarial", other)], None) == [("adversarial", other)]


def test_a_teacher_model_answers_each_prompt_once(tiny_folder):
    """teacher_model: replies sampled on first sight of a prompt and kept (in the state too), so later updates on
    the same prompts reuse them and a resumed run does not sample them again."""
    d = tiny_d(teacher_model=str(tiny_folder), teacher_max_new_tokens=4)
    torch.manual_seed(0)
    first = d.real_replies(PROMPTS[:3], FAKE[:3])
    assert len(d.teacher_replies) == 3
    state = torch.get_rng_state()
    assert d.real_replies(PROMPTS[2::-1], FAKE[2::-1]) == first[::-1]
    assert torch.equal(torch.get_rng_state(), state)  # nothing sampled again
    d.update(PROMPTS, FAKE)
    assert len(d.teacher_replies) == 4 and len(d.state_dict()["teacher_replies"]) == 4


def test_discriminator_refuses_bad_options_and_a_missing_teacher_column():
    from rlgen.errors import UserError

    with pytest.raises(UserError, match="unknown loss 'wgan'"):
        tiny_d(loss="wgan")
    with pytest.raises(UserError, match="unknown transform 'rank'"):
        tiny_d(transform="rank")
    with pytest.raises(UserError, match="d_every must be at least 1"):
        tiny_d(d_every=0)
    with pytest.raises(UserError, match="no column 'teacher_reply'.*columns: reference_completion"):
        tiny_d(teacher="teacher_reply").update(PROMPTS, FAKE, {"reference_completion": REAL, "completion_ids": []})
    d = tiny_d(teacher="teacher_reply")
    d(PROMPTS, FAKE, reference_completion=REAL)
    with pytest.raises(UserError, match="no column 'teacher_reply'.*columns: reference_completion"):
        d.update(PROMPTS, FAKE)


def test_the_teacher_column_is_matched_to_each_scored_reply():
    """Scored with the batch's columns, D later trains on any subset or order of those (prompt, reply) pairs
    without them (as a loop with dynamic sampling selects rows after scoring), each with its own teacher reply."""
    a, b = tiny_d(), tiny_d()
    a(PROMPTS, FAKE, reference_completion=REAL, other=[0] * 4)
    order = [2, 0, 3]
    assert a.real_replies([PROMPTS[i] for i in order], [FAKE[i] for i in order]) == [REAL[i] for i in order]
    got = a.update([PROMPTS[i] for i in order], [FAKE[i] for i in order])
    given = b.update([PROMPTS[i] for i in order], [FAKE[i] for i in order], {"reference_completion": [REAL[i] for i in order]})
    assert {k: v for k, v in got.items() if k not in ("time/d_update", "val/d_reward_std")} == \
        {k: v for k, v in given.items() if k not in ("time/d_update", "val/d_reward_std")}
    assert a.scored_with == {}


# --- in the RL loop -----------------------------------------------------------------------------------------


@pytest.fixture
def teacher_data(tmp_path):
    """Prompts whose teacher reply is always the same short sentence: a perfect, easy teacher signal."""
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(f'{{"prompt": "question {i}: how are you?", "teacher": "i am fine."}}\n'
                            for i in range(64)))
    return path


def rl_config(tiny_folder, data, out, spec, **overrides):
    from rlgen.config import PPOConfig

    values = dict(model=str(tiny_folder), output_dir=str(out), dataset=str(data), max_steps=30, batch_size=16,
                  mini_batch_size=8, ppo_epochs=4, max_new_tokens=4, learning_rate=1e-2, kl_coef=0.0,
                  missing_eos_penalty=0.0, save_steps=0, reward=[spec])
    return PPOConfig(**{**values, **overrides})


@pytest.mark.parametrize("d_options, rl_options, gain", [
    # GAD's discriminator under PPO (measured: +0.08) and under GRPO (measured: +0.085)
    ("loss='bt', transform='bt_score', learning_rate=1e-4, d_warmup=3", {}, 0.04),
    ("loss='bt', transform='bt_score', learning_rate=3e-4, d_warmup=2", dict(preset="grpo", kl_coef=0.0), 0.04),
    # ScratchGAN's per-token discriminator and dense reward (measured: +0.7)
    ("loss='bce', transform='dense', learning_rate=1e-3, d_warmup=10", {}, 0.3),
], ids=["gad_ppo", "gad_grpo", "scratchgan"])
def test_rl_on_a_warmed_up_discriminator_raises_its_reward(tiny_folder, teacher_data, tmp_path, d_options,
                                                           rl_options, gain):
    """D pre-trained on (teacher, starting policy) pairs (d_warmup), then held fixed (d_every beyond the run): RL
    raises D's reward of the policy's replies (mean of the last 3 updates over the first 3). D's own metrics
    appear only on updates where it trained."""
    from rlgen.files import read_jsonl
    from rlgen.ppo import train_ppo

    spec = f"adversarial(teacher='teacher', {d_options}, d_every=100, batch_size=16, device='cpu')"
    train_ppo(rl_config(tiny_folder, teacher_data, tmp_path / "run", spec, **rl_options))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/scores" in r]
    scores = [r["rewards/adversarial/mean"] for r in rows]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + gain, scores
    assert not any("loss/discriminator" in r for r in rows)
    assert (tmp_path / "run" / "discriminator" / "config.json").is_file()


def test_the_discriminator_trains_every_d_every_updates_and_resumes_exactly(tiny_folder, teacher_data, tmp_path,
                                                                          monkeypatch):
    """6 updates in one go == SIGINT after update 3, resume from checkpoint-2, 4 more: metrics (D's included),
    policy and D weights exactly equal."""
    from rlgen.checkpoint import TrainingInterrupted
    from rlgen.files import read_jsonl
    from rlgen.ppo import train_ppo

    stop = tmp_path / "stop.py"
    stop.write_text(STOP_REWARD)
    spec = ("adversarial(teacher='teacher', loss='bce', transform='prob', learning_rate=1e-3, d_every=2, "
            "batch_size=4, device='cpu')")
    common = dict(max_steps=6, save_steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=2, reward=[f"{stop}:vowels", spec], reward_weights=[0.0, 1.0])
    policy_a = train_ppo(rl_config(tiny_folder, teacher_data, tmp_path / "one_go", spec, **common))
    split = tmp_path / "split"
    monkeypatch.setenv("RLGEN_TEST_STOP_AT", "9")  # update 3 of the second run
    with pytest.raises(TrainingInterrupted):
        train_ppo(rl_config(tiny_folder, teacher_data, split, spec, **common))
    monkeypatch.delenv("RLGEN_TEST_STOP_AT")
    policy_b = train_ppo(rl_config(tiny_folder, teacher_data, split, spec, resume_from_checkpoint=str(split / "checkpoint-2"),
                                   **common))

    def rows(out):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(out / "metrics.jsonl")]

    rows_a = rows(tmp_path / "one_go")
    assert rows(split) == rows_a
    assert [r["step"] for r in rows_a if "loss/discriminator" in r] == [2, 4, 6]
    for (name, x), y in zip(policy_a.state_dict().items(), policy_b.state_dict().values()):
        assert torch.equal(x, y), name
    d_a = torch.load(tmp_path / "one_go" / "checkpoint-6" / "discriminator.pt", weights_only=True)
    d_b = torch.load(split / "checkpoint-6" / "discriminator.pt", weights_only=True)
    for name, x in d_a["model"].items():
        assert torch.equal(x, d_b["model"][name]), name
    assert d_a["updates"] == d_b["updates"] == 3


def test_the_gad_preset_runs_grpo_on_a_discriminator_trained_every_update(tiny_folder, tmp_path):
    """preset gad: GRPO groups, the adversarial reward from the run's own model, D warm-up and an update each step."""
    from rlgen.config import PPOConfig
    from rlgen.files import read_jsonl
    from rlgen.ppo import train_ppo

    cfg = PPOConfig(model=str(tiny_folder), output_dir=str(tmp_path / "run"), preset="gad", max_steps=2, batch_size=8,
                    mini_batch_size=8, max_new_tokens=4, save_steps=0)
    assert cfg.reward == [f"adversarial(model={str(tiny_folder)!r}, teacher='reference_completion', loss='bt', "
                          "transform='bt_score', d_every=1, d_warmup=1)"]
    assert (cfg.advantage, cfg.num_generations) == ("grpo", 4)
    train_ppo(cfg)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/d_accuracy" in r] == [0, 1, 2]
    assert all(0 <= r["val/d_accuracy"] <= 1 and math.isfinite(r["loss/discriminator"]) for r in rows)
    assert (tmp_path / "run" / "discriminator" / "model.safetensors").is_file()


def test_compare_method_gad_is_sft_then_grpo_on_the_discriminator_within_the_budget(tmp_path):
    """compare --methods sft gad: gad's SFT warm-up equals the sft run's recipe, its RL stage (preset gad from the
    warm-up model) has max_steps - d_warmup updates, and its completions stay within max_steps x batch_size."""
    import csv
    import json

    import yaml

    from rlgen.cli import main
    from rlgen.config import CompareConfig
    from rlgen.errors import UserError
    from rlgen.files import read_jsonl

    settings = {"model": "tiny", "output_dir": str(tmp_path / "cmp"), "methods": ["sft", "gad"], "seeds": [0],
                "max_steps": 3, "batch_size": 4, "num_generations": 2, "max_new_tokens": 6,
                "reward": ["target_length(target=3)"], "gold_reward": ["sentiment_positive"],
                "evaluate": {"num_prompts": 4, "batch_size": 4},
                "gad": {"discriminator": {"learning_rate": 1e-4, "device": "cpu"}}}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["compare", "--config", str(config)]) == 0
    run = tmp_path / "cmp" / "runs" / "gad" / "seed0"
    result = json.loads((run / "result.json").read_text())
    assert result["completions"] == 3 * 4
    lengths = [r["completions/mean_length"] for r in read_jsonl(run / "metrics.jsonl")]
    assert result["tokens"] == round(sum(lengths) * 4)  # the step-0 row: the D warm-up's replies
    assert [row["completions"] for row in result["curve"]] == [8, 12]  # after the D warm-up round of 4
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss/discriminator" in r] == [0, 1, 2]
    assert {"rewards/adversarial/mean", "rewards/target_length/mean", "rewards/sentiment_positive/mean"} <= set(rows[1])
    ppo = yaml.safe_load((run / "config.yaml").read_text())
    assert ppo["preset"] == "gad" and ppo["max_steps"] == 2 and ppo["model"].endswith("seed0_warmup_sft")
    assert ppo["reward_weights"] == [0.0, 0.0, 1.0]
    assert not (run.parent / "seed0_warmup_sft").exists() and (run / "discriminator" / "config.json").is_file()
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["start", "sft", "gad"]
    with pytest.raises(UserError, match="d_warmup 3 must be an integer in \\[0, max_steps\\)"):
        CompareConfig(**{**settings, "gad": {"discriminator": {"d_warmup": 3}}})
    with pytest.raises(UserError, match="key 'num_generations' would change this method's budget"):
        CompareConfig(**{**settings, "gad": {"num_generations": 4}})
    with pytest.raises(UserError, match="section 'gad': key 'preset' is the comparison's own"):
        CompareConfig(**{**settings, "gad": {"preset": "grpo"}})


def _two_process_update(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        d = tiny_d(batch_size=4)
        fakes = FAKE if rank == 0 else list(reversed(REAL))  # each process its own batch
        d.update(PROMPTS, fakes, {"reference_completion": REAL})
        torch.save(d.model.state_dict(), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_discriminator_replicas_stay_equal_over_processes(tmp_path):
    """Under torch.distributed each process trains its D replica on its own batch with averaged gradients: the
    replicas stay equal, and differ from a D trained on one process's batch alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_update, args=(port, tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    alone = tiny_d(batch_size=4)
    alone.update(PROMPTS, FAKE, {"reference_completion": REAL})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in alone.model.state_dict().items())


def test_compare_with_a_teacher_model_trains_and_scores_on_its_replies(tmp_path, capsys):
    """compare --teacher_model: the teacher answers the first teacher_prompts training prompts and the evaluation
    prompts once (the comparison's sampling, seed 0); every method trains on those replies (gad's discriminator takes
    them as the real ones), the evaluator scores its held-out replies and the teacher scores the quality-diversity
    samples; a continued comparison reads them back. A teacher with another tokenizer is refused before anything."""
    import json

    import yaml

    from rlgen.cli import main
    from rlgen.config import CompareConfig, SamplingConfig
    from rlgen.data import load_rows
    from rlgen.files import read_jsonl
    from rlgen.models import minilm_folder
    from rlgen.policy import Policy

    teacher = tmp_path / "teacher"  # the tiny shape and tokenizer, other weights than the start (seed 0)
    Policy.from_pretrained("tiny", reference=False, seed=1).save(teacher, value_head=False)
    out = tmp_path / "cmp"
    settings = {"model": "tiny", "teacher_model": str(teacher), "teacher_prompts": 6, "output_dir": str(out),
                "methods": ["sft", "gad", "seqgan"], "seeds": [0], "max_steps": 3, "batch_size": 4,
                "num_generations": 2, "max_new_tokens": 6, "reward": ["target_length(target=3)"],
                "qd_temperatures": [1.5], "evaluate": {"num_prompts": 4, "batch_size": 4},
                "gad": {"discriminator": {"learning_rate": 1e-4, "device": "cpu"}}}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["compare", "--config", str(config)]) == 0

    data = out / "teacher_data"
    train, test = read_jsonl(data / "train.jsonl"), read_jsonl(data / "test.jsonl")
    rows = load_rows("chitchat", "train")[:6]
    assert [r["prompt"] for r in train] == [r["prompt"] for r in rows] and len(test) == 4
    assert [r["dataset_completion"] for r in train] == [r["completion"] for r in rows]
    policy = Policy.from_pretrained(str(teacher), reference=False, seed=0)
    torch.manual_seed(0)
    again = policy.sample_completions([r["prompt"] for r in train], SamplingConfig.of(CompareConfig(**settings)), 4)
    assert [r["completion"] for r in train] == again != [r["completion"] for r in rows]
    for method in ("sft", "gad", "seqgan"):
        saved = yaml.safe_load((out / "runs" / method / "seed0" / "config.yaml").read_text())
        assert saved["dataset"] == str(data), method
    gad = yaml.safe_load((out / "runs" / "gad" / "seed0" / "config.yaml").read_text())
    assert "teacher='reference_completion'" in gad["reward"][-1]  # the dataset's completion column: the teacher's
    samples = json.loads((out / "runs" / "start" / "result.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in test]
    assert json.loads((out / "quality_diversity.json").read_text())["scorer"] == str(teacher)
    assert "teacher&#x27;s (" in (out / "report.html").read_text()

    made = (data / "teacher.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", "--config", str(config)]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out and (data / "teacher.json").stat().st_mtime_ns == made

    other = str(minilm_folder())  # a BERT WordPiece vocabulary
    assert main(["compare", "--config", str(config), "--teacher_model", other, "--output_dir",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlgen: error: teacher_model {other}: its tokenizer (") and len(err.splitlines()) == 1
    assert main(["compare", "--config", str(config), "--evaluate.split", "all", "--output_dir",
                 str(tmp_path / "other")]) == 2
    assert "the evaluation's split must be train, validation or test (got 'all')" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
