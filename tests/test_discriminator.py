"""The SeqGAN discriminator: the paper's CNN, training, P(real), held-out accuracy and D as a reward."""

import pytest
import torch

from rlgen.discriminator import (
    CNNDiscriminator,
    DiscriminatorReward,
    TextDiscriminator,
    _DStep,
    heldout_accuracy,
    prob_real,
    train_discriminator,
)
from rlgen.rewards import score_rewards

torch.set_num_threads(1)


def toy_cnn_and_data():
    """A small CNN trained to tell all-ones sequences (real) from sequences of tokens 2..9 (generated)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d = CNNDiscriminator(10, 16, widths=(1, 2, 3), filters=(8, 8, 8), dropout=0.25, seq_len=6)
    pos = torch.ones(200, 6, dtype=torch.long)
    neg = torch.randint(2, 10, (200, 6), generator=g)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    stats = train_discriminator(d, opt, pos, neg, epochs=3, batch_size=32, l2=0.2, generator=g)
    return d, pos, neg, stats


def test_discriminator_learns_separable_toy_set():
    d, pos, neg, stats = toy_cnn_and_data()
    assert stats["val/d_accuracy_train"] > 0.95
    assert prob_real(d, pos[:20]).min() > 0.8 and prob_real(d, neg[:20]).max() < 0.2
    reward = DiscriminatorReward(d)
    totals, per_fn = score_rewards([("discriminator", reward)], ["", ""], ["1 1 1 1 1 1", "5 7 9 3 4 2"])
    assert totals[0] > 0.8 and totals[1] < 0.2


def test_heldout_accuracy_labels_each_side_whatever_the_sizes():
    """Real and fake sets of different sizes: each sequence is judged against its own label."""
    d, pos, neg, _ = toy_cnn_and_data()
    assert heldout_accuracy(d, pos[:30], neg[:100]) == 1.0
    assert heldout_accuracy(d, neg[:30], pos[:100]) == 0.0
    assert heldout_accuracy(d, pos[:30], pos[:90]) == 0.25


def save_tiny_classifier(folder, kind, tokenizer):
    """A tiny random sequence classifier (2 labels) of one head kind, built from a config (no download)."""
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=72, num_labels=2)
    if kind == "bert":  # classifier: one Linear with a bias
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(**common, pad_token_id=tokenizer.pad_token_id))
    elif kind == "roberta":  # classifier.dense, then classifier.out_proj
        model = transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(**common, pad_token_id=tokenizer.pad_token_id))
    else:  # a causal LM's score layer, no bias; no pad_token_id in the config
        model = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=None))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, head", [("bert", "classifier"), ("roberta", "classifier.out_proj"),
                                        ("llama", "score")])
def test_text_discriminator_trains_with_any_classifier_head(tmp_path, tiny_tokenizer, kind, head):
    torch.manual_seed(0)
    d = TextDiscriminator(str(save_tiny_classifier(tmp_path, kind, tiny_tokenizer)), max_length=16)
    layer = d.model.get_submodule(head)
    bias = 0.0 if layer.bias is None else float(layer.bias.detach().square().sum())
    assert float(d.l2_penalty().detach()) == pytest.approx(0.5 * (float(layer.weight.detach().square().sum()) + bias))
    real, fake = ["hello there", "how are you", "nice day"], ["ok", "the the the", ""]
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    before = layer.weight.detach().clone()
    stats = train_discriminator(d, opt, real, fake, epochs=1, batch_size=4, l2=0.2,
                                generator=torch.Generator().manual_seed(0))
    assert stats["loss/d"] > 0 and not torch.equal(before, layer.weight)
    assert prob_real(d, real + fake).shape == (6,)


class NoPenaltyD(torch.nn.Module):
    """A D whose output layer has no L2 penalty to give: train_discriminator must not ask at l2 = 0."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(3, 2)

    def logits(self, x):
        return self.out(x)

    def l2_penalty(self):
        raise AssertionError("l2_penalty called with l2 = 0")


def test_train_discriminator_skips_the_penalty_at_l2_zero():
    d = NoPenaltyD()
    pos, neg = torch.randn(8, 3), torch.randn(8, 3)
    stats = train_discriminator(d, torch.optim.SGD(d.parameters(), lr=0.1), pos, neg, epochs=1, batch_size=4, l2=0.0,
                                generator=torch.Generator().manual_seed(0))
    assert stats["loss/d"] > 0


def reference_train(d, optimizer, pos, neg, epochs, batch_size, l2, generator):
    """The naive loop: one minibatch at a time, the loss read to the host after every step."""
    data = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)]).to(pos.device)
    d.train()
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        perm = torch.randperm(len(labels), generator=generator)
        for lo in range(0, len(perm), batch_size):
            idx = perm[lo:lo + batch_size]
            logits = d.logits(data[idx])
            loss = torch.nn.functional.cross_entropy(logits, labels[idx]) + l2 * d.l2_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == labels[idx]).sum())
            seen += len(idx)
    d.eval()
    return {"loss/d": loss_sum / seen, "val/d_accuracy_train": correct / seen}


def two_toy_runs(device="cpu", capturable=False, dropout=0.25):
    """The same D, data and shuffles twice: (train_discriminator's stats, D) and (the naive loop's, D)."""
    runs = []
    for train in (train_discriminator, reference_train):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        d = CNNDiscriminator(10, 16, widths=(1, 2, 3), filters=(8, 8, 8), dropout=dropout, seq_len=6).to(device)
        pos = torch.randint(0, 5, (150, 6), generator=g).to(device)
        neg = torch.randint(3, 10, (150, 6), generator=g).to(device)
        kwargs = {"capturable": True} if capturable else {}
        opt = torch.optim.Adam(d.parameters(), lr=1e-2, **kwargs)
        runs.append((train(d, opt, pos, neg, epochs=2, batch_size=32, l2=0.2, generator=g), d, opt))
    return runs


def test_train_discriminator_matches_the_naive_loop_bit_for_bit_on_cpu():
    """Device-side loss/accuracy sums and one index copy per epoch change nothing on the CPU: same parameters,
    same statistics (300 sequences in minibatches of 32: the last one is partial)."""
    (stats, d, _), (ref_stats, ref_d, _) = two_toy_runs()
    assert stats == ref_stats
    for (name, p), q in zip(d.state_dict().items(), ref_d.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_discriminator_replays_a_cuda_graph_for_the_same_steps(monkeypatch):
    """On CUDA with a capturable Adam, full minibatches replay one captured graph: the same number of optimiser
    steps and (without dropout, whose random stream differs) the eager loop's parameters and statistics."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    (stats, d, opt), (ref_stats, ref_d, _) = two_toy_runs("cuda", capturable=True, dropout=0.0)
    steps = 2 * 10  # 2 epochs of 300 / 32 -> 10 minibatches, the last partial
    assert len(replays) == steps - 2 * 1 - _DStep.WARMUP
    assert all(int(s["step"]) == steps for s in opt.state.values())
    assert stats["val/d_accuracy_train"] == pytest.approx(ref_stats["val/d_accuracy_train"], abs=1 / 300)
    assert stats["loss/d"] == pytest.approx(ref_stats["loss/d"], rel=1e-4)
    for (name, p), q in zip(d.state_dict().items(), ref_d.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def _saved_optimizer(tmp_path, d, **kwargs):
    """An Adam state file after one step of D on toy data (what a checkpoint's optimizer_d.pt holds)."""
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, **kwargs)
    train_discriminator(d, opt, torch.ones(4, 6, dtype=torch.long, device=next(d.parameters()).device),
                        torch.full((4, 6), 3, dtype=torch.long, device=next(d.parameters()).device), epochs=1,
                        batch_size=8, l2=0.2, generator=torch.Generator().manual_seed(0))
    torch.save(opt.state_dict(), tmp_path / "optimizer_d.pt")
    return tmp_path / "optimizer_d.pt"


def test_optimizer_state_keeps_the_device_flags_the_run_built(tmp_path):
    """Both directions on the CPU: a capturable state (as CUDA writes it) loads into a plain Adam as a plain one,
    and a plain state into a capturable Adam (as SeqGAN builds D's on CUDA) as a capturable one, its step counters
    then float32 on the parameters' device."""
    from rlgen.checkpoint import load_optimizer_state

    d = CNNDiscriminator(10, 8, widths=(1, 2), filters=(4, 4), seq_len=6)
    path = _saved_optimizer(tmp_path, d)
    state = torch.load(path, weights_only=True)
    state["param_groups"][0]["capturable"] = True
    torch.save(state, path)
    plain = torch.optim.Adam(d.parameters(), lr=1e-2)
    load_optimizer_state(plain, path)
    assert plain.param_groups[0]["capturable"] is False
    plain.step()  # with capturable=True, Adam refuses to step on the CPU
    assert all(int(s["step"]) == 2 for s in plain.state.values())

    state["param_groups"][0]["capturable"] = False
    torch.save(state, path)
    capturable = torch.optim.Adam(d.parameters(), lr=1e-2, capturable=True)
    load_optimizer_state(capturable, path)
    assert capturable.param_groups[0]["capturable"] is True
    assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device
               for p, s in capturable.state.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimizer_state_moves_between_cpu_and_cuda_runs(tmp_path, monkeypatch):
    """A CPU checkpoint's D optimiser resumed on CUDA takes the graphed step (capturable, counters on the GPU); a
    CUDA one resumed on the CPU steps there. Before the fix the first went eager and the second failed."""
    from rlgen.checkpoint import load_optimizer_state

    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    torch.manual_seed(0)
    d_cpu = CNNDiscriminator(10, 8, widths=(1, 2), filters=(4, 4), dropout=0.0, seq_len=6)
    cpu_file = _saved_optimizer(tmp_path, d_cpu)
    d_cuda = CNNDiscriminator(10, 8, widths=(1, 2), filters=(4, 4), dropout=0.0, seq_len=6).cuda()
    d_cuda.load_state_dict(d_cpu.state_dict())
    opt = torch.optim.Adam(d_cuda.parameters(), lr=1e-2, capturable=True)
    load_optimizer_state(opt, cpu_file)
    assert all(s["step"].is_cuda for s in opt.state.values())
    pos = torch.ones(64, 6, dtype=torch.long, device="cuda")
    neg = torch.full((64, 6), 3, dtype=torch.long, device="cuda")
    train_discriminator(d_cuda, opt, pos, neg, epochs=2, batch_size=16, l2=0.2,
                        generator=torch.Generator().manual_seed(0))
    assert len(replays) == 2 * 8 - _DStep.WARMUP  # every full minibatch after warm-up replays the graph
    torch.save(opt.state_dict(), tmp_path / "cuda.pt")
    d_back = CNNDiscriminator(10, 8, widths=(1, 2), filters=(4, 4), dropout=0.0, seq_len=6)
    d_back.load_state_dict({k: v.cpu() for k, v in d_cuda.state_dict().items()})
    back = torch.optim.Adam(d_back.parameters(), lr=1e-2)
    load_optimizer_state(back, tmp_path / "cuda.pt")
    train_discriminator(d_back, back, pos.cpu(), neg.cpu(), epochs=1, batch_size=16, l2=0.2,
                        generator=torch.Generator().manual_seed(0))
    assert all(int(s["step"]) == 1 + 16 + 8 for s in back.state.values())
