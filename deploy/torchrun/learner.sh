#!/usr/bin/env bash
# One learner node: `torchrun` with c10d rendezvous, NPROC_PER_NODE ranks of `longtrace learner`.
# Run it on each of the NNODES learner nodes with that node's NODE_RANK (0 .. NNODES-1):
#
#   NODE_RANK=0 RDZV_ENDPOINT=node0:29400 deploy/torchrun/learner.sh     # on node 0 (hosts the rendezvous)
#   NODE_RANK=1 RDZV_ENDPOINT=node0:29400 deploy/torchrun/learner.sh     # on node 1, 2, 3
#
# Node 0 hosts the c10d store at RDZV_ENDPOINT. torchrun's c10d backend orders global ranks by node
# address, not by --node-rank, so any node may hold global rank 0 (the feeder and the broker I/O);
# each pipeline stage's leader hosts its weight-sync group on its own node's NODE_ADDR.
# Extra arguments are TrainConfig overrides: deploy/torchrun/learner.sh --max_steps 10
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$LT_DIR/nccl.sh"

NNODES="${NNODES:-4}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-${RUN_ID:-longtrace}}"
RDZV_JOIN_TIMEOUT_S="${RDZV_JOIN_TIMEOUT_S:-1800}"  # nodes of a cluster may start minutes apart
# torchrun restarts every node's ranks this many times after a failure (a collective timed out on a partition, a
# rank killed): they rendezvous again, as soon as all NNODES nodes are back, and resume from the last checkpoint.
MAX_RESTARTS="${MAX_RESTARTS:-0}"
lt_require NODE_RANK RDZV_ENDPOINT

if [[ "$NODE_RANK" == 0 ]]; then is_host=true; else is_host=false; fi

cmd=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
    --rdzv-conf "is_host=$is_host,join_timeout=$RDZV_JOIN_TIMEOUT_S"
    --max-restarts "$MAX_RESTARTS"
    -m deploy.cli learner --config "$LEARNER_CONFIG"
    --broker.redis_url "$REDIS_URL")
lt_opt cmd --broker.run_id "$RUN_ID"
lt_opt cmd --model.hf_path "$MODEL_PATH"
lt_opt cmd --data.dataset_path "$DATA_PATH"
lt_opt cmd --run_dir "$RUN_DIR"
if [[ -n "$RUN_DIR" && "${WEIGHT_SYNC_EXPORTS:-1}" == 1 ]]; then
    cmd+=(--weight_sync.export_dir "$RUN_DIR/exports")
fi
if [[ "${WEIGHT_SYNC_ADDR:-auto}" == auto ]]; then
    cmd+=(--weight_sync.master_address "$NODE_ADDR")
elif [[ -n "${WEIGHT_SYNC_ADDR}" ]]; then
    cmd+=(--weight_sync.master_address "$WEIGHT_SYNC_ADDR")
fi
lt_exec "${cmd[@]}" "$@"
