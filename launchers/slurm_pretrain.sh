#!/bin/bash
# Multi-node pre-training under SLURM: one torchrun per node, all ranks of a node started by it.
#
#   sbatch --nodes 8 launchers/slurm_pretrain.sh configs/default.yaml ds_configs/zero3.json [--set k=v ...]
#
# A dead rank makes torchrun restart the node's workers (--max-restarts); every start passes
# --resume auto, so training continues from the newest complete checkpoint in output_dir.
#SBATCH --job-name=revcol-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: slurm_pretrain.sh CONFIG.yaml DEEPSPEED.json [--set key=value ...]}
DS_CONFIG=${2:?usage: slurm_pretrain.sh CONFIG.yaml DEEPSPEED.json [--set key=value ...]}
shift 2
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
cd "$(dirname "$0")/.."
srun --kill-on-bad-exit=1 bash -c "exec .venv/bin/torchrun \
  --nnodes $SLURM_NNODES --nproc_per_node $GPUS_PER_NODE \
  --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $SLURM_JOB_ID \
  --max-restarts 3 \
  launchers/pretrain.py --config $CONFIG --deepspeed_config $DS_CONFIG --resume auto $*"
