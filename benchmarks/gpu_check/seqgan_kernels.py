"""gpu_check.sh part 3: SeqGAN's pieces (LSTM sampling, MC rollouts, CNN D scoring, NLL, an MLE epoch and D
epochs, eager and as a CUDA graph) timed at the cpu preset's shapes; argument: the oracle .npz. Prints one JSON
line {"seqgan_kernels": ...}."""

import json
import os
import sys
import time

import torch
from torch import nn

from rlgen.discriminator import CNNDiscriminator, prob_real, train_discriminator
from rlgen.lstm import SeqGANLSTMConfig, SeqGANLSTMForCausalLM, build_oracle
from rlgen.seqgan_tasks import lstm_rollouts

quick = os.environ.get("GPU_CHECK_QUICK") == "1"
cuda = torch.cuda.is_available()
if not cuda and not quick:
    sys.exit("CUDA is not available")
dev = torch.device("cuda" if cuda else "cpu")
V, E, H, T, B = 5000, 32, 32, 20, 64
N, M = (2, 256) if quick else (16, 10000)  # rollouts per prefix; sequences per eval / D round
if quick:
    torch.set_num_threads(1)
res = {"device": str(dev), "rollout_num": N, "sequences": M}


def timed(name, fn):
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    res[name] = round(time.perf_counter() - t, 4)
    return out


torch.manual_seed(0)
oracle = build_oracle(V, E, H, 0, sys.argv[1] if len(sys.argv) > 1 else None).to(dev)
gen = SeqGANLSTMForCausalLM(SeqGANLSTMConfig(vocab_size=V, embedding_size=E, hidden_size=H)).to(dev)
g = torch.Generator(device=dev).manual_seed(0)
timed("s_warmup", lambda: gen.sample(256, T, 1.0, g))
train_ids = timed(f"s_sample_{M}", lambda: gen.sample(M, T, 1.0, g)[0])
timed(f"s_sample_{M}_rows_at_once", lambda: gen.sample(M, T, 1.0, g, batch_size=M))
timed(f"s_oracle_nll_{M}", lambda: oracle.nll(train_ids))

# one MLE epoch (teacher forcing, Adam, clip 5; as train_seqgan's oracle branch)
opt = torch.optim.Adam(gen.parameters(), lr=0.01)
starts = torch.full((B, 1), 0, dtype=torch.long, device=dev)


def mle_epoch():
    perm = torch.randperm(M, device=dev)
    for lo in range(0, M - B + 1, B):
        x = train_ids[perm[lo:lo + B]]
        logits = gen(torch.cat([starts, x[:, :-1]], 1)).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), x.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 5.0)
        opt.step()
    return float(loss.detach())


timed("s_mle_epoch", mle_epoch)
gen.eval()

# one generator step's rollout phase: [T-1, N, B, T] MC completions, library chunk (512 rows) and one big chunk
seqs = gen.sample(B, T, 1.0, g)[0]
rolls = timed("s_rollouts_chunk512", lambda: lstm_rollouts(gen, seqs, N, 1.0, g))
timed("s_rollouts_chunk_all", lambda: lstm_rollouts(gen, seqs, N, 1.0, g, chunk=(T - 1) * N * B))

d = CNNDiscriminator(V, 64, dropout=0.25, seq_len=T).to(dev)
timed("s_d_score_rollouts", lambda: prob_real(d, rolls.view(-1, T), 2048))

# one D epoch over M real + M generated sequences, batch 64, through the library's train_discriminator: eager
# (plain Adam) and, on CUDA, replaying one captured graph per minibatch (capturable Adam; the seqgan stage's choice)
neg = gen.sample(M, T, 1.0, g)[0]
steps = -(-2 * M // B)
for mode in ("eager", "graph") if cuda else ("eager",):
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4, capturable=mode == "graph")
    for attempt in (1, 2):  # the first call of each mode includes cuDNN autotuning / capture
        timed(f"s_d_epoch_{mode}_{attempt}", lambda opt=opt_d: train_discriminator(
            d, opt, train_ids, neg, 1, B, 0.2, torch.Generator().manual_seed(0)))
    res[f"ms_per_d_step_{mode}"] = round(1000 * res[f"s_d_epoch_{mode}_2"] / steps, 3)
res["d_steps_per_epoch"] = steps
res["s_g_step_estimate"] = round(res["s_rollouts_chunk512"] + res["s_d_score_rollouts"], 4)
if cuda:
    res["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
print(json.dumps({"seqgan_kernels": res}), flush=True)
