#!/usr/bin/env bash
# Pretrain M2-BERT-80M on 8 nodes x 8 GPUs: 64 ranks, one srun task per GPU (see slurm/train.sh).
#
#   sbatch slurm/pretrain_64gpu.sh data.train=s3://b/c4/train data.val=s3://b/c4/val   # from the repository root
#   sbatch --partition=gpu --account=myproject slurm/pretrain_64gpu.sh data.train=... data.val=... train.duration=20000
#   CONFIG=m2-bert-110M sbatch --job-name=m2-bert-110M slurm/pretrain_64gpu.sh data.train=... data.val=...
# The recipe configs need their data (MDS shards from tools/prepare_mds.py); only debug has it built in.
#
# Every #SBATCH value below can be overridden on the sbatch command line; the same script runs
# scaled down, e.g. 2 nodes x 1 CPU rank with the debug config over gloo (as tests/test_slurm.py does):
#   CONFIG=debug sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#       --mem-per-cpu=1G --time=00:30:00 slurm/pretrain_64gpu.sh train.device=cpu
# Each submission gets its own run folder, outputs/<job name>-<job id> (a requeue keeps it); to
# continue a run in a new job, name its folder: OUTPUT_DIR=outputs/m2-bert-80M-1234 sbatch ...
# --signal=B:USR1@600 sends SIGUSR1 to this batch shell 600 s before the time limit; train.sh
# forwards it to the ranks once, they checkpoint, and train.sh requeues the job. The lead time must
# cover finishing a step and writing a checkpoint, and be shorter than --time. Logs go to
# slurm/logs/<job name>-<job id>.out, appended across requeues; the run (checkpoints, MLflow
# store, config) to outputs/<job name>-<job id>/ (RUNS_DIR or OUTPUT_DIR to change it).
#SBATCH --job-name=m2-bert-80M
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem-per-cpu=8G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

# Under sbatch this file runs from a copy in slurmd's spool folder: find the repository beside
# the original or in the directory the job was submitted from.
if [[ -z ${M2DIST_ROOT:-} ]]; then
    for candidate in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
        if [[ -f $candidate/slurm/train.sh ]]; then
            M2DIST_ROOT=$(cd "$candidate" && pwd)
            break
        fi
    done
fi
if [[ ! -f ${M2DIST_ROOT:-}/slurm/train.sh ]]; then
    echo "slurm/pretrain_64gpu.sh: cannot find the m2dist repository; submit from its root or set M2DIST_ROOT" >&2
    exit 2
fi
export M2DIST_ROOT
export CONFIG=${CONFIG:-m2-bert-80M}

# exec: train.sh becomes the batch shell and receives SIGUSR1/SIGTERM itself.
exec bash "$M2DIST_ROOT/slurm/train.sh" "$@"
