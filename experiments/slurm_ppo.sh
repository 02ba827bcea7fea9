#!/usr/bin/env bash
# Sharded PPO (torch FSDP2) on several nodes under SLURM: one torchrun per node, one process per GPU.
#   sbatch --nodes 2 --gpus-per-node 8 experiments/slurm_ppo.sh --config experiments/ppo_sentiment.yaml
# Arguments after the script name go to `rlgen ppo`. output_dir must be on a filesystem every node sees:
# every process writes its shards of each checkpoint there. batch_size and mini_batch_size are per process
# (README, "Several GPUs and nodes"). Not run on a cluster yet.
#SBATCH --job-name=rlgen-ppo
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${RLGEN_RDZV_PORT:-29500}

# srun starts one torchrun per node; the c10d rendezvous on the first node assigns the ranks.
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
  -m rlgen ppo --fsdp full_shard "$@"
