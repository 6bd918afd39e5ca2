#!/usr/bin/env bash
# Multi-process training, mmseg's tools/dist_train.sh with torchrun:
#   tools/dist_train.sh CONFIG NPROC [tools/train.py options...]
# NPROC processes per node: one per GPU, or CPU processes (gloo) when no GPU is
# visible. Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT as in mmseg.
# PYTHON selects the interpreter (default: python).
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
${PYTHON} -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    $(dirname "$0")/train.py \
    $CONFIG \
    --launcher pytorch ${@:3}
