#!/usr/bin/env bash
# Run m2dist/train.py on every task of a SLURM allocation: the generic launcher.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --requeue --signal=B:USR1@600 slurm/train.sh
#   CONFIG=m2-bert-110M sbatch --job-name=m2-110M ... slurm/train.sh train.duration=20000
#   salloc --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 slurm/train.sh train.duration=50
# slurm/pretrain_64gpu.sh is this script with the #SBATCH header of 8 nodes x 8 GPUs.
#
# Node and GPU counts are those of the allocation (sbatch/salloc options). Environment, all optional:
#   CONFIG           a config name in configs/ or a YAML path (default configs/debug.yaml)
#   RUNS_DIR         parent of the run folders (default <repository>/outputs)
#   OUTPUT_DIR       the run folder (default $RUNS_DIR/<job name>-<job id>: new for each submission,
#                    kept by a requeue); name an existing one (or pass train.output_dir=...) to resume it
#   PYTHON           interpreter with m2dist installed (default: python on PATH)
#   NNODES, NTASKS_PER_NODE   launch on part of the allocation (default: all of it)
#   TASK_EXIT_GRACE  seconds the other tasks get once one has exited, before srun kills them (120)
#   M2DIST_ROOT      the repository (default: found from this file or the submit directory)
# Arguments are key=value config overrides, passed on to m2dist/train.py.
#
# Design: ONE SRUN TASK PER GPU (ntasks-per-node = GPUs per node), not one launcher per node.
# - The engine reads its rank, world size and local rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID:
#   no second launcher (torchrun, deepspeed) with its own rendezvous, restarts and signal handling
#   sits between SLURM and the ranks.
# - srun delivers SIGUSR1/SIGTERM to every rank and returns the highest task exit status, so the
#   checkpoint-and-requeue status 85 of the trainer reaches this script unchanged.
# - SLURM places, accounts (sacct/sstat per rank) and cleans up every rank itself.
# Every task of a node sees all of the node's GPUs (no --gpus-per-task binding): the engine takes
# cuda:LOCAL_RANK, and NCCL needs to see its peers for NVLink/P2P transfers.
#
# Preemption: SIGUSR1 (sbatch --signal=B:USR1@SECONDS before the time limit, or scancel --batch
# --signal=USR1) and SIGTERM are forwarded to the tasks; the trainer finishes its step, writes a
# checkpoint and exits 85 (during start-up or resume, with nothing trained yet, it leaves with 85
# at once); this script then requeues the job, which starts again under the same job id, hence the
# same OUTPUT_DIR, and the trainer resumes from its newest complete checkpoint. A signal before
# the tasks start ends this script with 85 the same way. A job that SLURM is ending (scancel, time
# limit reached) also checkpoints but is not requeued.
set -euo pipefail

REQUEUE_EXIT_CODE=85  # m2dist.engine.trainer.REQUEUE_EXIT_CODE

log() { echo "[slurm/train.sh $(date +%H:%M:%S)] $*"; }

# Trapped from the first line: a signal before the tasks run is remembered, not fatal.
srun_pid=""
early_signal=""
# shellcheck disable=SC2317  # called by the traps below
forward() {
    if [[ -z $srun_pid ]]; then
        log "got SIG$1 before the training tasks started: not starting them"
        early_signal=$1
        return
    fi
    log "got SIG$1: forwarding it to the training tasks"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "slurm/train.sh: run it inside a SLURM allocation (sbatch or salloc)" >&2
    exit 2
fi

# Under sbatch, a submitted script runs from a copy in slurmd's spool folder: look beside this
# file, then in the directory the job was submitted from.
if [[ -z ${M2DIST_ROOT:-} ]]; then
    for candidate in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
        if [[ -f $candidate/m2dist/train.py ]]; then
            M2DIST_ROOT=$(cd "$candidate" && pwd)
            break
        fi
    done
fi
if [[ ! -f ${M2DIST_ROOT:-}/m2dist/train.py ]]; then
    echo "slurm/train.sh: cannot find the m2dist repository; submit from its root or set M2DIST_ROOT" >&2
    exit 2
fi

CONFIG=${CONFIG:-configs/debug.yaml}
# A relative path that is not one from the submit directory is one in the repository.
if [[ $CONFIG == */* && $CONFIG != /* && ! -f $CONFIG ]]; then
    CONFIG=$M2DIST_ROOT/$CONFIG
fi
PYTHON=${PYTHON:-python}
RUNS_DIR=${RUNS_DIR:-$M2DIST_ROOT/outputs}
# A train.output_dir override names the run folder as OUTPUT_DIR does.
for arg in "$@"; do
    if [[ $arg == train.output_dir=* ]]; then
        OUTPUT_DIR=${arg#train.output_dir=}
    fi
done
# New for each submission (two jobs of one name never share a folder); a requeued job keeps its
# id, hence its folder, and resumes from its newest complete checkpoint.
OUTPUT_DIR=${OUTPUT_DIR:-$RUNS_DIR/${SLURM_JOB_NAME:-m2dist}-$SLURM_JOB_ID}
TASK_EXIT_GRACE=${TASK_EXIT_GRACE:-120}

# Rendezvous: the first node's address (the engine's TCPStore needs an address it can bind, and
# NodeAddr is the one SLURM itself reaches the node by) and a port derived from the job id, so
# that jobs sharing a first node do not collide. A requeued job keeps its id, hence its port.
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_line=$(scontrol --oneliner show node "${nodes[0]}")
master_addr=${nodes[0]}
if [[ $node_line =~ NodeAddr=([^[:space:]]+) ]]; then
    master_addr=${BASH_REMATCH[1]}
fi
if [[ ! $master_addr =~ ^[0-9.]+$ && ! $master_addr =~ : ]]; then
    master_addr=$(getent ahostsv4 "$master_addr" | awk 'NR == 1 { print $1 }')
fi
if [[ -z $master_addr ]]; then
    echo "slurm/train.sh: cannot resolve the address of ${nodes[0]}" >&2
    exit 2
fi
export MASTER_ADDR=$master_addr
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))

# NCCL for multi-node InfiniBand/RoCE: NCCL finds the HCAs, GID index and interfaces by itself,
# so NCCL_IB_* and NCCL_SOCKET_IFNAME are left to NCCL's defaults unless the user exported them
# (they pass through unchanged). NVLink SHARP (NVLS) needs multicast support (fabric manager/IMEX)
# that many clusters and containers lack and reserves GPU memory: off unless asked for.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# A failed or hung collective aborts the rank instead of blocking the other 63 until the job ends.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# One thread per rank unless asked for more (as torchrun does); data loading has its own workers.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

# Not --kill-on-bad-exit: ranks leave with status 85 nearly together after a signal, and rank 0
# must not be killed while it closes the MLflow run. --wait still ends the step when one rank
# died and the others would block in a collective.
srun_args=(--kill-on-bad-exit=0 --wait="$TASK_EXIT_GRACE")
[[ -n ${NNODES:-} ]] && srun_args+=(--nodes="$NNODES")
[[ -n ${NTASKS_PER_NODE:-} ]] && srun_args+=(--ntasks-per-node="$NTASKS_PER_NODE")
[[ -n ${NNODES:-} && -n ${NTASKS_PER_NODE:-} ]] && srun_args+=(--ntasks=$((NNODES * NTASKS_PER_NODE)))
# srun 22.05+ no longer inherits --cpus-per-task from the batch allocation.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

log "job ${SLURM_JOB_ID} '${SLURM_JOB_NAME:-}' restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}" \
    "(${SLURM_NTASKS:-?} tasks); rendezvous ${MASTER_ADDR}:${MASTER_PORT}; config ${CONFIG}; output ${OUTPUT_DIR}"

status=0
if [[ -n $early_signal ]]; then
    status=$REQUEUE_EXIT_CODE
else
    srun "${srun_args[@]}" "$PYTHON" -u "$M2DIST_ROOT/m2dist/train.py" --config "$CONFIG" \
        "train.output_dir=$OUTPUT_DIR" "$@" </dev/null &
    srun_pid=$!
    # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
    while true; do
        wait "$srun_pid" && status=0 || status=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
fi
trap - USR1 TERM

if ((status == REQUEUE_EXIT_CODE)); then
    # Requeue only a job that SLURM itself is not ending: after SIGUSR1 (the time-limit warning,
    # or scancel --signal=USR1 to preempt) it is still RUNNING. After `scancel`, the time limit
    # or a node failure it is COMPLETING: it stays ended (SLURM requeues preempted jobs itself
    # where the site's PreemptMode says so), and a job submitted with the same name resumes.
    job_line=$(scontrol --oneliner show job "$SLURM_JOB_ID" 2>/dev/null || true)
    job_state=UNKNOWN
    if [[ $job_line =~ JobState=([A-Z_]+) ]]; then
        job_state=${BASH_REMATCH[1]}
    fi
    if [[ $job_state == RUNNING ]]; then
        log "stopped on a signal, training state saved (status $status): requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        log "could not requeue (not a batch job?)"
    else
        log "stopped on a signal, training state saved (status $status) while the job is $job_state: not requeueing"
    fi
    log "to continue from the checkpoint in $OUTPUT_DIR, submit again with OUTPUT_DIR=$OUTPUT_DIR"
fi
log "training tasks exited with status $status"
exit "$status"
