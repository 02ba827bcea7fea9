#!/usr/bin/env bash
# One-shot GPU check for rlgen on a remote CUDA machine (no network there).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, with .devcarry carried
#   GPU_CHECK_QUICK=1 OUT=/tmp/gc_out bash benchmarks/gpu_check.sh   # here: every part shrunk to seconds, CPU
#
# Needs, beside the working tree, the ignored folder .devcarry/ (carried):
#   .devcarry/whl/*.whl                   packages the remote image lacks (trl, datasets, dill, multiprocess,
#                                         vaderSentiment, chitchat-dataset), installed with --target $GPU_CHECK_SITE
#   .devcarry/oracle_lstm_params.npz      the SeqGAN paper's oracle (copy of ../shared/seqgan/)
#   .devcarry/bench/peer_common.py        the PPO throughput work definition (copy of ../shared/bench/)
#
# Parts (each time-boxed with `timeout`, each log tee'd to $OUT/<part>.log, a failure moves on to the next part;
# all parts together stay within GPU_CHECK_BUDGET seconds, default 500):
#   0_env          nvidia-smi, wheel install, versions, torch.cuda.is_available(), carried sizes
#   1_tests        pytest on core/policy/ppo/seqgan/metrics, listing which tests allocated CUDA memory
#   1_cuda_smoke   tiny policy on cuda: sample, ref log-probs, evaluate_policy, train_ppo, and `rlgen ppo` (CLI)
#   2_ppo_throughput  benchmarks/ppo_throughput.py with its defaults (tiny), then --model-size small
#   3_seqgan_gpu_kernels  SeqGAN's pieces (sampling, rollouts, D scoring, MLE and D epochs) timed at cpu-preset shapes
#   3_seqgan_smoke SeqGAN oracle, smoke preset: seed 1 with 8 threads, then (last) seed 2 with 1 thread
#   3_seqgan_probe SeqGAN oracle, cpu preset shapes, a few epochs of each phase: per-phase timings to extrapolate
# $OUT/summary.json: one JSON object per line per part (rc, seconds, limit, timed_out, last JSON line of the part).
# At most 8 files land in $OUT (the remote returns no more).
set -u

cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=${GPU_CHECK_QUICK:-0}
OUT=${OUT:-$ROOT/.devcarry/out}
PY=${GPU_CHECK_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-500}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
CARRY=$ROOT/.devcarry
START=$(date +%s)

mkdir -p "$OUT" "$WORK"
rm -rf "$WORK"/* 2>/dev/null
SUMMARY=$OUT/summary.json
: >"$SUMMARY"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg WANDB_DISABLED=true
export RLGEN_CACHE=$WORK/rlgen-cache
export GPU_CHECK_QUICK=$QUICK
# The remote python lacks trl/datasets/...: they come from $SITE. Here (quick mode) the local venv has them all,
# and the wheels are only installed as a dry run (for Python 3.12) into a folder that is never imported.
if [ "$QUICK" = 1 ]; then
  export PYTHONPATH=$WORK:$ROOT
else
  export PYTHONPATH=$SITE:$WORK:$ROOT
fi
# e.g. a folder holding the remote's transformers 5.17 / huggingface_hub 1.33 to rehearse against them here
if [ -n "${GPU_CHECK_EXTRA_PYTHONPATH:-}" ]; then
  export PYTHONPATH=$GPU_CHECK_EXTRA_PYTHONPATH:$PYTHONPATH
fi

elapsed() { echo $(($(date +%s) - START)); }

# record PART RC SECONDS LIMIT LOG NOTE OFFSET: one summary line (the last JSON-object line that the part wrote to
# LOG after byte OFFSET goes in as "result")
record() {
  "$PY" - "$@" >>"$SUMMARY" 2>/dev/null <<'EOF' || echo "{\"part\": \"$1\", \"rc\": $2, \"summary_error\": true}" >>"$SUMMARY"
import json, sys
part, rc, secs, limit, log, note, offset = sys.argv[1:8]
result = tail = None
try:
    f = open(log, errors="replace")
    f.seek(int(offset))  # only this run's lines (two runs may share a log)
    tail = None
    for line in f:
        line = line.strip()
        if line and not line.startswith("[gpu_check]"):
            tail = line[-300:]
        if line.startswith("{") and line.endswith("}"):
            try:
                result = json.loads(line)
            except ValueError:
                pass
except OSError:
    pass
rc = int(rc)
print(json.dumps({"part": part, "rc": rc, "ok": rc == 0, "timed_out": rc in (124, 137), "s": float(secs),
                  "limit_s": int(limit), "note": note, "result": result,
                  "last_line": tail if result is None else None}))
EOF
}

# part NAME CAP_S MIN_S CMD...: run CMD under `timeout` (the smaller of CAP_S and the time left), tee'd to
# $OUT/NAME.log; skipped when less than MIN_S is left.
part() {
  local name=$1 cap=$2 min=$3
  shift 3
  local log=$OUT/$name.log left limit t0 t1 rc off
  off=$(stat -c %s "$log" 2>/dev/null || echo 0)
  left=$((BUDGET - $(elapsed) - 5))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$min" ]; then
    echo "[gpu_check] $name skipped: ${left}s left, needs ${min}s" | tee -a "$log"
    record "$name" 125 0 0 "$log" "skipped: budget; ${NOTE:-}" "$off"
    return
  fi
  echo "[gpu_check] === $name (limit ${limit}s, elapsed $(elapsed)s) === $*" | tee -a "$log"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  local secs
  secs=$(awk "BEGIN {printf \"%.1f\", $t1 - $t0}")
  echo "[gpu_check] === $name rc=$rc in ${secs}s ===" | tee -a "$log"
  record "$name" "$rc" "$secs" "$limit" "$log" "${NOTE:-}" "$off"
}

# ---------------------------------------------------------------------------------------------------------
# 0. environment
env_part() {
  echo "host $(hostname) nproc $(nproc) quick=$QUICK budget=${BUDGET}s"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi
  else
    echo "no nvidia-smi"
  fi
  echo "--- carried sizes"
  du -sh "$CARRY"/* "$CARRY" 2>/dev/null
  ls -la "$CARRY"/whl
  echo "--- wheel install into $SITE"
  local extra=()
  if [ "$QUICK" = 1 ]; then
    SITE=$WORK/site-dryrun  # never on PYTHONPATH here
    extra=(--python-version 3.12 --implementation cp --only-binary=:all:)
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${extra[@]}" "$CARRY"/whl/*.whl || { echo "WHEEL INSTALL FAILED"; return 1; }
  ls "$SITE" | head -40
  echo "--- versions"
  "$PY" - <<'EOF'
import importlib, importlib.util, json, os, sys
print("python", sys.version.split()[0], sys.executable)
import torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads()}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
for name in ("transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "huggingface_hub",
             "safetensors", "numpy", "pyarrow", "fsspec", "dill", "multiprocess", "sacrebleu", "matplotlib",
             "yaml", "tqdm", "vaderSentiment.vaderSentiment", "rlgen"):
    try:
        m = importlib.import_module(name)
        info[name] = getattr(m, "__version__", "ok") + "  " + os.path.dirname(m.__file__)
    except Exception as e:  # noqa: BLE001
        info[name] = f"IMPORT FAILED: {type(e).__name__}: {e}"
spec = importlib.util.find_spec("chitchat_dataset")
info["chitchat_dataset"] = spec.origin if spec else "MISSING"
for k, v in info.items():
    print(f"{k:24s} {v}")
print(json.dumps({"env": {k: info[k] for k in ("torch", "cuda_available", "transformers", "trl", "accelerate")}}))
if os.environ.get("GPU_CHECK_QUICK") != "1" and not torch.cuda.is_available():
    sys.exit("CUDA NOT AVAILABLE")
EOF
}

# ---------------------------------------------------------------------------------------------------------
# 1. pytest plugin: which tests allocated CUDA memory (in this process; subprocess tests are not seen)
cat >"$WORK/gpu_check_cudaprobe.py" <<'EOF'
import pytest
import torch

_used = []


def _allocs():
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if torch.cuda.is_available() else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _allocs()
    yield
    n = _allocs() - before
    if n:
        _used.append((item.nodeid, n))


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("CUDA use per test (allocations in setup+call+teardown)")
    if not torch.cuda.is_available():
        tr.write_line("no CUDA device: nothing can be counted")
        return
    for nodeid, n in _used:
        tr.write_line(f"{n:8d}  {nodeid}")
    tr.write_line(f"{len(_used)} tests allocated CUDA memory; peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
EOF

TESTS=(tests/test_core.py tests/test_policy.py tests/test_ppo.py tests/test_seqgan.py tests/test_metrics.py)
if [ "$QUICK" = 1 ]; then
  TESTS=(tests/test_metrics.py tests/test_core.py::test_logprobs_temperature_changes_result tests/test_policy.py)
fi

# ---------------------------------------------------------------------------------------------------------
# 1b. explicit CUDA smoke
cat >"$WORK/gpu_check_smoke.py" <<'EOF'
import json
import os
import subprocess
import sys
import time

import torch

from rlgen.data import load_rows
from rlgen.evaluation import evaluate_policy
from rlgen.policy import Policy
from rlgen.config import SamplingConfig
from rlgen.config import PPOConfig
from rlgen.ppo import train_ppo
from rlgen.rewards import load_reward

quick = os.environ.get("GPU_CHECK_QUICK") == "1"
cuda = torch.cuda.is_available()
if not cuda and not quick:
    sys.exit("CUDA is not available")
dev = torch.device("cuda" if cuda else "cpu")
work = os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check")
res = {"device": str(dev)}


def sync():
    if cuda:
        torch.cuda.synchronize()


def on_dev(module):
    return sorted({p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()})


t = time.perf_counter()
policy = Policy.from_pretrained("tiny").to(dev)
res["s_build"] = time.perf_counter() - t
assert on_dev(policy) == [dev.type], on_dev(policy)
assert policy.ref_model is not None and on_dev(policy.ref_model) == [dev.type]
prompts = [str(r["prompt"]) for r in load_rows("chitchat", "validation")[:8]]
s = SamplingConfig(max_new_tokens=8 if quick else 32)

torch.manual_seed(0)
sync(); t = time.perf_counter()
ro = policy.sample(prompts, s)
sync(); res["s_sample_8"] = time.perf_counter() - t
T = ro.completion_ids.shape[1]
assert ro.completion_ids.device.type == dev.type and ro.values.device.type == dev.type
mask = ro.completion_mask.float()
sync(); t = time.perf_counter()
ref = policy.ref_logprobs(ro.input_ids, ro.attention_mask, T, s.temperature)
sync(); res["s_ref_logprobs"] = time.perf_counter() - t
with torch.no_grad():
    lp, values, _ = policy(ro.input_ids, ro.attention_mask, T, s.temperature)
# policy == reference at the start: generation-pass log-probs vs a separate forward (policy and reference)
res["max_abs_gen_vs_forward_logprob"] = float(((ro.logprobs - lp).abs() * mask).max())
res["max_abs_gen_vs_ref_logprob"] = float(((ro.logprobs - ref).abs() * mask).max())
res["max_abs_gen_vs_forward_value"] = float(((ro.values - values).abs() * mask).max())
res["completions"] = ro.completions[:3]

reward = [load_reward("target_length")]
sync(); t = time.perf_counter()
ev = evaluate_policy(policy, prompts, reward, s, batch_size=8)
sync(); res["s_evaluate_8"] = time.perf_counter() - t
res["eval"] = {k: ev[k] for k in ("eval/reward/mean", "eval/kl", "eval/perplexity_ref", "eval/mean_length")}
assert abs(ev["eval/kl"]) < 1e-3, ev["eval/kl"]  # policy == reference

steps = 2 if quick else 3
cfg = PPOConfig(model="tiny", output_dir=f"{work}/ppo_inproc", max_steps=steps, batch_size=8, mini_batch_size=4,
                reward=["target_length"], max_new_tokens=8 if quick else 32, overwrite_output_dir=True)
t = time.perf_counter()
trained = train_ppo(cfg)
sync(); res["s_train_ppo_inproc"] = time.perf_counter() - t
res["train_ppo_param_devices"] = on_dev(trained)
assert res["train_ppo_param_devices"] == [dev.type], res["train_ppo_param_devices"]
rows = [json.loads(line) for line in open(f"{work}/ppo_inproc/metrics.jsonl")]
assert len(rows) == steps, len(rows)
res["ppo_inproc_last"] = {k: rows[-1].get(k) for k in ("objective/scores", "objective/kl", "time/rollout",
                                                        "time/score", "time/update")}

cmd = [sys.executable, "-m", "rlgen.cli", "ppo", "--model", "tiny", "--max_steps", str(steps), "--batch_size", "8",
       "--mini_batch_size", "4", "--reward", "target_length", "--output_dir", f"{work}/ppo_cli",
       "--overwrite_output_dir"]
print("+", " ".join(cmd), flush=True)
t = time.perf_counter()
proc = subprocess.run(cmd, timeout=300)
res["s_cli_ppo"] = time.perf_counter() - t
res["cli_rc"] = proc.returncode
cli_rows = [json.loads(line) for line in open(f"{work}/ppo_cli/metrics.jsonl")] if proc.returncode == 0 else []
res["cli_updates"] = len(cli_rows)
if cuda:
    res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
ok = proc.returncode == 0 and len(cli_rows) == steps
res["ok"] = ok
print(json.dumps({"cuda_smoke": res}), flush=True)
sys.exit(0 if ok else 1)
EOF

# ---------------------------------------------------------------------------------------------------------
# 2. benchmarks/ppo_throughput.py (tiny and small shapes) on whatever device the machine has.

# ---------------------------------------------------------------------------------------------------------
# 3. SeqGAN's pieces (LSTM sampling, MC rollouts, CNN D scoring, NLL) and a hand-written MLE epoch and D epoch at
# the cpu preset's shapes, timed on cuda (on cpu in quick mode); then oracle runs through train_seqgan, which
# places its models on default_device().
cat >"$WORK/gpu_check_seqgan_kernels.py" <<'EOF'
import json
import os
import sys
import time

import torch
from torch import nn

from rlgen.lstm import SeqGANLSTMConfig, SeqGANLSTMForCausalLM, build_oracle
from rlgen.seqgan import CNNDiscriminator, lstm_rollouts, prob_real

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

# one D epoch over M real + M generated sequences, batch 64 (as train_discriminator, labels on the device)
neg = gen.sample(M, T, 1.0, g)[0]
opt_d = torch.optim.Adam(d.parameters(), lr=1e-4)


def d_epoch():
    data = torch.cat([train_ids, neg])
    labels = torch.cat([torch.ones(M, dtype=torch.long, device=dev), torch.zeros(M, dtype=torch.long, device=dev)])
    d.train()
    perm = torch.randperm(2 * M, device=dev)
    for lo in range(0, 2 * M, B):
        idx = perm[lo:lo + B]
        loss = nn.functional.cross_entropy(d.logits(data[idx]), labels[idx]) + 0.2 * d.l2_penalty()
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
    d.eval()
    return float(loss.detach())


timed("s_d_epoch", d_epoch)
res["s_g_step_estimate"] = round(res["s_rollouts_chunk512"] + res["s_d_score_rollouts"], 4)
if cuda:
    res["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
print(json.dumps({"seqgan_kernels": res}), flush=True)
EOF

# ---------------------------------------------------------------------------------------------------------
NPZ=$CARRY/oracle_lstm_params.npz
SEQGAN=(benchmarks/seqgan_oracle.py --oracle-params "$NPZ")
if [ "$QUICK" = 1 ]; then
  TINY_SEQGAN=(--num-train 256 --num-test 256 --eval-samples 256 --d-negatives 256 --mle-epochs 1 --max-steps 1
               --rollout-num 2)
  PPO_T=(--steps 2 --response-length 8)
  PPO_SMALL=(--model-size small --steps 2 --response-length 8)
  PROBE=(--preset cpu --mle-epochs 1 --max-steps 1 --d-pretrain-rounds 1 --num-train 512 --num-test 512
         --eval-samples 512 --d-negatives 512 --rollout-num 2)
  CAP_TESTS=120; CAP_SEQ=60; CAP_PROBE=60
else
  TINY_SEQGAN=()
  PPO_T=()
  PPO_SMALL=(--model-size small)
  # cpu preset shapes (10k training sequences, 10k negatives per D round, 16 rollouts, batch 64) for 2 MLE
  # epochs, 1 D pre-training round and 1 adversarial epoch; evals on 2k samples instead of 10k (the 6 fixed
  # evals at 10k took ~130 s at 1 thread here). s_per_mle_epoch, s_per_d_pretrain_round, s_per_g_step and
  # s_per_d_step give the full cpu preset's time (50 MLE epochs, 5 D rounds, 33 adversarial epochs).
  PROBE=(--preset cpu --mle-epochs 2 --max-steps 1 --d-pretrain-rounds 1 --eval-samples 2000)
  CAP_TESTS=150; CAP_SEQ=110; CAP_PROBE=200
fi

export -f env_part
export QUICK CARRY SITE WORK PY BUDGET
part 0_env 90 20 bash -c env_part
part 1_tests "$CAP_TESTS" 30 "$PY" -m pytest -q -p no:cacheprovider -p gpu_check_cudaprobe -rfE --maxfail=15 \
  --durations=10 "${TESTS[@]}"
part 1_cuda_smoke 120 30 env GPU_CHECK_WORK="$WORK" "$PY" "$WORK/gpu_check_smoke.py"
part 2_ppo_throughput 60 20 "$PY" benchmarks/ppo_throughput.py --peer-dir "$CARRY/bench" --workdir "$WORK/peer" \
  "${PPO_T[@]}"
# the small shape (about 20M parameters per model) is where a GPU should pay; appended to the same log
NOTE="model-size small" part 2_ppo_throughput 60 20 "$PY" benchmarks/ppo_throughput.py --peer-dir "$CARRY/bench" \
  --workdir "$WORK/peer" "${PPO_SMALL[@]}"
NOTE="library pieces at cpu-preset shapes on cuda" part 3_seqgan_gpu_kernels 90 20 "$PY" \
  "$WORK/gpu_check_seqgan_kernels.py" "$NPZ"
NOTE="smoke preset, seed 1, 8 threads" part 3_seqgan_smoke "$CAP_SEQ" 30 "$PY" "${SEQGAN[@]}" --preset smoke --seed 1 \
  --threads 8 --output-dir "$WORK/seqgan_s1" "${TINY_SEQGAN[@]}"
NOTE="cpu preset shapes, shortened schedule, seed 1, 8 threads" part 3_seqgan_probe "$CAP_PROBE" 60 "$PY" \
  "${SEQGAN[@]}" --seed 1 --threads 8 --output-dir "$WORK/seqgan_probe" "${PROBE[@]}"
NOTE="smoke preset, seed 2, 1 thread" part 3_seqgan_smoke "$CAP_SEQ" 30 "$PY" "${SEQGAN[@]}" --preset smoke --seed 2 \
  --threads 1 --output-dir "$WORK/seqgan_s2" "${TINY_SEQGAN[@]}"

echo "[gpu_check] done in $(elapsed)s; summary:"
cat "$SUMMARY" | cut -c1-400
ls -la "$OUT"
