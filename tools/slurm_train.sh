#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads SLURM's environment (no code changes).
#   sbatch --nodes 4 tools/slurm_train.sh recipes/dav2_student_vitl.yaml
#SBATCH --job-name=depthkit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
# SIGUSR1 two minutes before the time limit: depthkit's Preemption callback saves `preempted.ckpt`, requeues the
# job and stops; the requeued job resumes from the newest checkpoint of the run (`--ckpt_path last`: preempted.ckpt
# or a later last.ckpt) with model, optimizer, scheduler, step and data position.
set -euo pipefail
case "${1:-}" in -h | --help) grep '^# ' "$0" | cut -c3-; exit 0 ;; esac
RECIPE=${1:?usage: sbatch tools/slurm_train.sh RECIPE.yaml [TRAINER.yaml]}
TRAINER=${2:-configs/trainer/gpu_ddp.yaml}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
RESUME=()
if compgen -G "$RUN_DIR/preempted.ckpt" > /dev/null || compgen -G "$RUN_DIR/*/*/checkpoints/last*.ckpt" > /dev/null; then
  RESUME=(--ckpt_path last)
fi
# srun does not pass --cpus-per-task on to its tasks since Slurm 22.05 (the DataLoader workers would share one
# core); a task that fails ends the step rather than leaving the others waiting in a collective.
srun --cpus-per-task "$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 depthkit fit --trainer "$TRAINER" --config "$RECIPE" \
  --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --trainer.default_root_dir "$RUN_DIR" "${RESUME[@]}"
