#!/usr/bin/env bash
# One-shot GPU check for rlgen on a remote CUDA machine (no network there).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, with .devcarry carried
#   GPU_CHECK_QUICK=1 OUT=/tmp/gc_out bash benchmarks/gpu_check.sh   # here: every part shrunk to seconds, CPU
#   GPU_CHECK_ONLY='0_env|base' bash benchmarks/gpu_check.sh         # only the parts whose "name note" matches
#                                                                     # (here: issue 11's base-shape figures)
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
#   1_tests        pytest on core/policy/ppo/seqgan/discriminator/metrics and the TRL evaluation-hook test, listing which tests allocated CUDA memory
#   1_cuda_smoke   tiny policy on cuda: sample, ref log-probs, evaluate_policy, train_ppo, and `rlgen ppo` (CLI);
#                  then `rlgen sweep` with the GPU config shrunk (proxies, PPO, best-of-n, ensemble, report)
#   2_ppo_throughput  benchmarks/ppo_throughput.py with its defaults (tiny), then --model-size small, then issue 11's
#                  figures: the peer's base shape (88M-parameter Llama, 64 completions of 128 tokens, 2 PPO epochs)
#                  in float32 (the peer's precision) and in bfloat16 (all in the one log: at most 8 files come back)
#   3_seqgan_gpu_kernels  SeqGAN's pieces (sampling, rollouts, D scoring, MLE epoch, D epochs eager and as a CUDA
#                  graph: ms_per_d_step_graph, issue 15's target <= 1 ms) timed at cpu-preset shapes
#   3_seqgan_smoke SeqGAN oracle, smoke preset: seed 1 with 8 threads, then (last) seed 2 with 1 thread
#   3_seqgan_probe SeqGAN oracle, cpu preset shapes, a few epochs of each phase: per-phase timings to extrapolate
#   4_fsdp_ppo     sharded PPO (--fsdp full_shard, FSDP2, bf16 compute) on every GPU under torchrun at the peer's
#                  base shape: tokens/s and peak memory per GPU; then `rlgen sft` under experiments/accelerate/fsdp.yaml
#   5_vllm         --rollout_engine vllm (needs vLLM in the machine's Python; its wheels exceed what can be carried):
#                  benchmarks/engine_speed.py hf vs vllm rollouts in bf16 at the base shape and at ~0.5B (64 x 128
#                  tokens, tokens/s, weight-sync time), then ppo_throughput.py at the base shape in bf16 with vllm
#                  (s_per_update_steady against 2_ppo_throughput's hf figure and TRL 1.12's PPO)
#   6_estimators   every estimator preset of the RL loop (ppo grpo dr_grpo rloo reinforce_pp gspo cispo dapo), 3 updates
#                  each at the peer's base shape (88M-parameter Llama, 64 completions of 128 tokens, bf16) in one
#                  process: s_per_update_steady, peak CUDA memory, value head only for gae, finite metrics (issue 31)
#   3_seqgan_paper SeqGAN oracle, paper preset, until GPU_CHECK_PAPER_S (default 420 s) runs out (issue 15 item 3);
#                  GPU_CHECK_PAPER_RESUME=1 continues the checkpoint a previous call left in the work folder
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
# a paper-preset run to continue (GPU_CHECK_PAPER_RESUME=1) survives the clean-up
find "$WORK" -mindepth 1 -maxdepth 1 ! -name seqgan_paper -exec rm -rf {} + 2>/dev/null
[ -n "${GPU_CHECK_PAPER_RESUME:-}" ] || rm -rf "$WORK/seqgan_paper"
SUMMARY=$OUT/summary.json
: >"$SUMMARY"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg WANDB_DISABLED=true
export RLGEN_CACHE=$WORK/rlgen-cache
export GPU_CHECK_QUICK=$QUICK
# The remote python lacks trl/datasets/...: they come from $SITE. Here (quick mode) the local venv has them all,
# and the wheels are only installed as a dry run (for Python 3.12) into a folder that is never imported.
if [ "$QUICK" = 1 ]; then
  export PYTHONPATH=$ROOT/benchmarks/gpu_check:$ROOT
else
  export PYTHONPATH=$SITE:$ROOT/benchmarks/gpu_check:$ROOT
fi
# e.g. a folder holding the remote's transformers 5.17 / huggingface_hub 1.33 to rehearse against them here
if [ -n "${GPU_CHECK_EXTRA_PYTHONPATH:-}" ]; then
  export PYTHONPATH=$GPU_CHECK_EXTRA_PYTHONPATH:$PYTHONPATH
fi

elapsed() { echo $(($(date +%s) - START)); }

# record PART RC SECONDS LIMIT LOG NOTE OFFSET: one summary line (the last JSON-object line that the part wrote to
# LOG after byte OFFSET goes in as "result")
record() {
  "$PY" "$ROOT/benchmarks/gpu_check/summary_line.py" "$@" >>"$SUMMARY" 2>/dev/null \
    || echo "{\"part\": \"$1\", \"rc\": $2, \"summary_error\": true}" >>"$SUMMARY"
}

# part NAME CAP_S MIN_S CMD...: run CMD under `timeout` (the smaller of CAP_S and the time left), tee'd to
# $OUT/NAME.log; skipped when less than MIN_S is left.
part() {
  local name=$1 cap=$2 min=$3
  shift 3
  local log=$OUT/$name.log left limit t0 t1 rc off
  if [ -n "${GPU_CHECK_ONLY:-}" ] && ! [[ "$name ${NOTE:-}" =~ $GPU_CHECK_ONLY ]]; then
    return
  fi
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
  "$PY" "$ROOT/benchmarks/gpu_check/env_info.py"
}

# ---------------------------------------------------------------------------------------------------------
# 1. pytest plugin: which tests allocated CUDA memory (in this process; subprocess tests are not seen)

TESTS=(tests/test_core.py tests/test_policy.py tests/test_ppo.py tests/test_seqgan.py tests/test_discriminator.py tests/test_metrics.py
       "tests/test_trl_methods.py::test_evaluations_along_training_leave_no_hooks_on_the_trained_model")
if [ "$QUICK" = 1 ]; then
  TESTS=(tests/test_metrics.py tests/test_core.py::test_logprobs_temperature_changes_result tests/test_policy.py)
fi

# ---------------------------------------------------------------------------------------------------------
# 1b. explicit CUDA smoke

# ---------------------------------------------------------------------------------------------------------
# 2. benchmarks/ppo_throughput.py (tiny and small shapes) on whatever device the machine has.

# ---------------------------------------------------------------------------------------------------------
# 3. SeqGAN's pieces (LSTM sampling, MC rollouts, CNN D scoring, NLL) and a hand-written MLE epoch and D epoch at
# the cpu preset's shapes, timed on cuda (on cpu in quick mode); then oracle runs through train_seqgan, which
# places its models on default_device().

# ---------------------------------------------------------------------------------------------------------
NPZ=$CARRY/oracle_lstm_params.npz
SEQGAN=(benchmarks/seqgan_oracle.py --oracle-params "$NPZ")
if [ "$QUICK" = 1 ]; then
  TINY_SEQGAN=(--num-train 256 --num-test 256 --eval-samples 256 --d-negatives 256 --mle-epochs 1 --max-steps 1
               --rollout-num 2)
  PPO_T=(--steps 2 --response-length 8)
  PPO_SMALL=(--model-size small --steps 2 --response-length 8)
  PPO_BASE=(--model-size small --steps 2 --response-length 8)
  HALF=auto  # bfloat16 where this CPU has the kernels, else float32
  PROBE=(--preset cpu --mle-epochs 1 --max-steps 1 --d-pretrain-rounds 1 --num-train 512 --num-test 512
         --eval-samples 512 --d-negatives 512 --rollout-num 2)
  PAPER=(--num_train 256 --num_test 256 --eval_samples 256 --d_negatives 256 --mle_epochs 1 --max_steps 2
         --rollout_num 2 --d_pretrain_rounds 1 --d_steps 1 --d_epochs 1 --eval_every 1)
  CAP_TESTS=120; CAP_SEQ=60; CAP_PROBE=60; CAP_PAPER=60
else
  TINY_SEQGAN=()
  PPO_T=()
  PPO_SMALL=(--model-size small)
  # the shape of issue 11's H200 figures; the first rollout compiles the static-cache decoding step (tens of s),
  # which s_per_update_steady leaves out and s_per_update counts
  PPO_BASE=(--model-size base --batch 64 --response-length 128 --prompt-length 32 --steps 5 --threads 4)
  HALF=bfloat16
  # cpu preset shapes (10k training sequences, 10k negatives per D round, 16 rollouts, batch 64) for 2 MLE
  # epochs, 1 D pre-training round and 1 adversarial epoch; evals on 2k samples instead of 10k (the 6 fixed
  # evals at 10k took ~130 s at 1 thread here). s_per_mle_epoch, s_per_d_pretrain_round, s_per_g_step and
  # s_per_d_step give the full cpu preset's time (50 MLE epochs, 5 D rounds, 33 adversarial epochs).
  PROBE=(--preset cpu --mle-epochs 2 --max-steps 1 --d-pretrain-rounds 1 --eval-samples 2000)
  PAPER=(--eval_every 10)  # issue 15: NLL-oracle after MLE and every 10 adversarial epochs
  CAP_TESTS=150; CAP_SEQ=110; CAP_PROBE=200; CAP_PAPER=${GPU_CHECK_PAPER_S:-420}
fi

export -f env_part
export QUICK CARRY SITE WORK PY BUDGET
part 0_env 90 20 bash -c env_part
part 1_tests "$CAP_TESTS" 30 "$PY" -m pytest -q -p no:cacheprovider -p cudaprobe -rfE --maxfail=15 \
  --durations=10 "${TESTS[@]}"
part 1_cuda_smoke 120 30 env GPU_CHECK_WORK="$WORK" "$PY" benchmarks/gpu_check/cuda_smoke.py
# `rlgen sweep --config experiments/overoptimization_sweep_gpu.yaml` (issue 22) shrunk: two proxies and a min
# ensemble trained on the device, PPO and best-of-n against each in two worker processes, the report. The tiny model
# for policy and proxies and VADER as labeller and gold: the default model's GGUF, MiniLM and TextBlob are not carried.
SWEEP=(--config experiments/overoptimization_sweep_gpu.yaml --output_dir "$WORK/sweep" --num_pairs 100 300
       --ensemble_seeds 1 --ensembles min --seeds 0 --bootstrap 50 --proxy.model tiny
       --proxy.gold_reward sentiment_positive --compare.model tiny --compare.gold_reward sentiment_positive
       --compare.max_steps 4 --compare.eval_steps 2 --compare.bon_n 16 --compare.evaluate.num_prompts 16)
[ "$QUICK" = 1 ] && SWEEP+=(--compare.dtype auto)
NOTE="rlgen sweep, GPU config shrunk, tiny models" part 1_cuda_smoke 150 60 "$PY" -m rlgen sweep "${SWEEP[@]}"
part 2_ppo_throughput 60 20 "$PY" benchmarks/ppo_throughput.py --peer-dir "$CARRY/bench" --workdir "$WORK/peer" \
  "${PPO_T[@]}"
# the small shape (about 20M parameters per model) is where a GPU should pay; appended to the same log
NOTE="model-size small" part 2_ppo_throughput 60 20 "$PY" benchmarks/ppo_throughput.py --peer-dir "$CARRY/bench" \
  --workdir "$WORK/peer" "${PPO_SMALL[@]}"
NOTE="model-size base, float32" part 2_ppo_throughput 150 60 "$PY" benchmarks/ppo_throughput.py \
  --peer-dir "$CARRY/bench" --workdir "$WORK/peer" "${PPO_BASE[@]}" --dtype float32
NOTE="model-size base, $HALF" part 2_ppo_throughput 150 60 "$PY" benchmarks/ppo_throughput.py \
  --peer-dir "$CARRY/bench" --workdir "$WORK/peer" "${PPO_BASE[@]}" --dtype "$HALF"
NOTE="library pieces at cpu-preset shapes on cuda" part 3_seqgan_gpu_kernels 90 20 "$PY" \
  benchmarks/gpu_check/seqgan_kernels.py "$NPZ"
NOTE="smoke preset, seed 1, 8 threads" part 3_seqgan_smoke "$CAP_SEQ" 30 "$PY" "${SEQGAN[@]}" --preset smoke --seed 1 \
  --threads 8 --output-dir "$WORK/seqgan_s1" "${TINY_SEQGAN[@]}"
NOTE="cpu preset shapes, shortened schedule, seed 1, 8 threads" part 3_seqgan_probe "$CAP_PROBE" 60 "$PY" \
  "${SEQGAN[@]}" --seed 1 --threads 8 --output-dir "$WORK/seqgan_probe" "${PROBE[@]}"
NOTE="smoke preset, seed 2, 1 thread" part 3_seqgan_smoke "$CAP_SEQ" 30 "$PY" "${SEQGAN[@]}" --preset smoke --seed 2 \
  --threads 1 --output-dir "$WORK/seqgan_s2" "${TINY_SEQGAN[@]}"

NOTE="FSDP2 PPO on all GPUs, base shape, bf16" part 4_fsdp_ppo 150 40 "$PY" benchmarks/gpu_check/fsdp_ppo.py \
  --work "$WORK/fsdp" --peer-dir "$CARRY/bench"

if [ "$QUICK" = 1 ]; then
  VLLM_SPEED=(--shape base --large 8x16 --repeats 1 --lora-r 0)
  VLLM_BIG=(--shape base --large 8x16 --repeats 1 --lora-r 0)
  VLLM_PPO=(--model-size small --steps 2 --response-length 8)
else
  VLLM_SPEED=(--shape base --dtype bfloat16 --lora-r 0 --large 64x128 --threads 4)
  VLLM_BIG=(--shape 0.5b --dtype bfloat16 --lora-r 0 --large 64x128 --threads 4)
  VLLM_PPO=("${PPO_BASE[@]}" --dtype bfloat16)
fi
NOTE="vllm vs hf rollouts, base shape" part 5_vllm 150 60 "$PY" benchmarks/engine_speed.py "${VLLM_SPEED[@]}"
NOTE="vllm vs hf rollouts, ~0.5B" part 5_vllm 150 60 "$PY" benchmarks/engine_speed.py "${VLLM_BIG[@]}"
NOTE="ppo with vllm rollouts, base shape" part 5_vllm 150 60 "$PY" benchmarks/ppo_throughput.py \
  --peer-dir "$CARRY/bench" --workdir "$WORK/peer" "${VLLM_PPO[@]}" --rollout-engine vllm

# issue 31: one short run per estimator preset, the first compiling generate's static-cache step (tens of s)
NOTE="every estimator preset, base shape, bf16" part 6_estimators 300 60 "$PY" benchmarks/gpu_check/estimators.py \
  --work "$WORK/estimators" --peer-dir "$CARRY/bench"

# the paper's schedule as far as CAP_PAPER allows: `timeout` sends SIGTERM, the run finishes the epoch under way,
# saves a checkpoint and exits 143; the log holds NLL-oracle after MLE and every 10 adversarial epochs. The
# checkpoint stays in $WORK (a second call on the same warm machine can continue it with
# --resume_from_checkpoint latest; it is too large to come back).
NOTE="paper preset, seed 1, as far as the time allows" part 3_seqgan_paper "$CAP_PAPER" 60 "$PY" -m rlgen seqgan \
  --config experiments/seqgan_oracle.yaml --preset paper --oracle_params "$NPZ" --seed 1 --threads 8 \
  --output_dir "$WORK/seqgan_paper" --save_steps 10 "${PAPER[@]}" ${GPU_CHECK_PAPER_RESUME:+--resume_from_checkpoint latest}

echo "[gpu_check] done in $(elapsed)s; summary:"
cat "$SUMMARY" | cut -c1-400
ls -la "$OUT"
