"""The SeqGAN discriminator: the paper's CNN, training, P(real), held-out accuracy and D as a reward."""

import torch

from rlgen.discriminator import (
    CNNDiscriminator,
    DiscriminatorReward,
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
