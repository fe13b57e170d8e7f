#!/usr/bin/env bash
# One rollout engine on this node: `longtrace engine launch` starts SGLang (engine.toml: TP8, memory
# fraction 0.7) and keeps it in the engine registry while it lives, so rollout workers and the learner's
# weight sync find it without a restart. Start or stop engines at any time; a late engine loads the newest
# HF export (RUN_DIR/exports). Several engines on one node: ENGINE_PORT and
# CUDA_VISIBLE_DEVICES per engine, e.g. two TP4 engines:
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3 ENGINE_PORT=30000 deploy/torchrun/engine.sh --tp_size 4
#   CUDA_VISIBLE_DEVICES=4,5,6,7 ENGINE_PORT=30001 deploy/torchrun/engine.sh --tp_size 4
#
# The engine binds ENGINE_HOST (0.0.0.0), so its control endpoints need a token: LONGTRACE_ENGINE_API_KEY (the
# built-in engine reads it; SGLang gets it as --admin-api-key in a private --config file, never on its command line),
# or ENGINE_ALLOW_UNAUTHENTICATED=1 on a network you trust; with neither the launch is refused, naming them.
# Extra arguments are LaunchConfig overrides (--tp_size 4, --extra_args '["--log-level","debug"]', ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# CleanUpOnly (nccl.sh explains the order): when the learner aborts a weight update because another engine died,
# this engine's watchdog aborts the group and the engine keeps serving, instead of tearing itself down.
TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-2}"
source "$LT_DIR/nccl.sh"

ENGINE_PORT="${ENGINE_PORT:-30000}"
ENGINE_HOST="${ENGINE_HOST:-0.0.0.0}"
ENGINE_ID="${ENGINE_ID:-$(hostname -s)-$ENGINE_PORT}"
# The recipes run 128K + 32K tokens, beyond the YaRN-derived 131072 of DeepSeek-R1-0528-Qwen3-8B.
export SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN="${SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN:-1}"
# /health without a generation (as slime launches SGLang): with one, a paused engine answers /health 503, and
# every probe during a weight push would take it for dead (`engine launch` sets it for its child as well).
export SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0

# An engine that joins a running training starts from the learner's newest HF export (RUN_DIR/exports/LATEST,
# written at every weight push), at that weight version, instead of serving the initial weights until the
# next push; from then on it is a member of the weight-update group like the others.
EXPORT_DIR="${EXPORT_DIR:-${RUN_DIR:+$RUN_DIR/exports}}"
weight_version=""
if [[ -n "$EXPORT_DIR" && -f "$EXPORT_DIR/LATEST" ]]; then
    mapfile -t latest < <("$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["path"]); print(d["version"])' "$EXPORT_DIR/LATEST")
    MODEL_PATH="${latest[0]}"
    weight_version="${latest[1]}"
fi

cmd=("$PYTHON" -m deploy.cli engine launch --config "$ENGINE_CONFIG"
    --host "$ENGINE_HOST" --port "$ENGINE_PORT"
    --engine_id "$ENGINE_ID" --advertise_url "http://$NODE_ADDR:$ENGINE_PORT"
    --broker.redis_url "$REDIS_URL")
lt_opt cmd --broker.run_id "$RUN_ID"
lt_opt cmd --model_path "$MODEL_PATH"
if [[ "${ENGINE_ALLOW_UNAUTHENTICATED:-0}" == 1 ]]; then
    cmd+=(--allow_unauthenticated true)
fi
if [[ -n "$weight_version" ]]; then
    cmd+=(--weight_version "\"$weight_version\"")  # a TOML string: the version stays text ("7", not 7)
fi
lt_exec "${cmd[@]}" "$@"
