#!/usr/bin/env bash
# Slurm training, mmseg's tools/slurm_train.sh:
#   [GPUS=8] [GPUS_PER_NODE=8] tools/slurm_train.sh PARTITION JOB_NAME CONFIG [tools/train.py options...]
# On CPU-only partitions set GPUS_PER_NODE=0 (no --gres request); the tasks then
# train with gloo on CPUs. PYTHON selects the interpreter (default: python).

set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}
PY_ARGS=${@:4}
if [ "${GPUS_PER_NODE}" -gt 0 ]; then
    GRES="--gres=gpu:${GPUS_PER_NODE}"
    TASKS_PER_NODE=${TASKS_PER_NODE:-${GPUS_PER_NODE}}
else
    GRES=""  # CPU partition: GPUS tasks, all on one node unless TASKS_PER_NODE says otherwise
    TASKS_PER_NODE=${TASKS_PER_NODE:-${GPUS}}
fi

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    ${GRES} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${TASKS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    ${PYTHON} -u $(dirname "$0")/train.py ${CONFIG} --launcher="slurm" ${PY_ARGS}
