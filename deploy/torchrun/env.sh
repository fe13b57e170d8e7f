# shellcheck shell=bash
# Settings shared by the 4-node scripts: sourced by learner.sh, engine.sh, rollout.sh, reward.sh, redis.sh.
# Every variable can be set in the environment or in the file named by LT_ENV_FILE (default: cluster.env
# next to this file, see cluster.env.example), which is read first. DRY_RUN=1 prints each command
# line (shell-quoted, one per line) instead of running it: CI parses them with the project's CLI.

LT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LT_REPO="$(cd "$LT_DIR/../.." && pwd)"
LT_ENV_FILE="${LT_ENV_FILE:-$LT_DIR/cluster.env}"
if [[ -f "$LT_ENV_FILE" ]]; then
    # Exported (set -a): the tokens it holds are read by the services from their environment.
    set -a
    # shellcheck source=/dev/null
    source "$LT_ENV_FILE"
    set +a
fi

# The model recipe: a directory of configs/models/ (learner.toml, engine.toml, rollout.toml).
MODEL="${MODEL:-qwen3-4b-thinking-2507}"
CONFIG_DIR="${CONFIG_DIR:-$LT_REPO/configs/models/$MODEL}"
LEARNER_CONFIG="${LEARNER_CONFIG:-$CONFIG_DIR/learner.toml}"
ENGINE_CONFIG="${ENGINE_CONFIG:-$CONFIG_DIR/engine.toml}"
ROLLOUT_CONFIG="${ROLLOUT_CONFIG:-$CONFIG_DIR/rollout.toml}"
REWARD_CONFIG="${REWARD_CONFIG:-$LT_REPO/configs/models/reward.toml}"

# Paths on the shared filesystem (every node sees the same path); empty keeps the config's value.
MODEL_PATH="${MODEL_PATH:-}"   # HF model directory (learner and engines)
DATA_PATH="${DATA_PATH:-}"     # LongTraceRL JSONL (learner rank 0 feeds it)
RUN_DIR="${RUN_DIR:-}"         # checkpoints, metrics, HF exports (late engines load the newest)

# Redis: the only shared service. The password travels inside the URL (visible in `ps` on the nodes).
RUN_ID="${RUN_ID:-}"           # empty keeps the config's broker.run_id
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_PASSWORD="${REDIS_PASSWORD:-}"
if [[ -z "${REDIS_URL:-}" ]]; then
    REDIS_URL="redis://${REDIS_PASSWORD:+:$REDIS_PASSWORD@}$REDIS_HOST:$REDIS_PORT/0"
fi

# This node's address as the other nodes reach it (weight-sync rendezvous, engine URLs).
NODE_ADDR="${NODE_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
NODE_ADDR="${NODE_ADDR:-127.0.0.1}"

PYTHON="${PYTHON:-python3}"    # the interpreter that has longtrace installed
DRY_RUN="${DRY_RUN:-0}"

# Run (or, with DRY_RUN=1, print) one command line; `lt_exec` replaces the shell with it.
lt_run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\n' "${*@Q}"
    else
        "$@"
    fi
}

lt_exec() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\n' "${*@Q}"
        exit 0
    fi
    exec "$@"
}

# `--key value` pairs for the overrides whose variable is set: lt_opt ARRAY --flag "$VALUE"
lt_opt() {
    local -n _args="$1"
    if [[ -n "$3" ]]; then
        _args+=("$2" "$3")
    fi
}

lt_require() {
    local name
    for name in "$@"; do
        if [[ -z "${!name:-}" ]]; then
            echo "$(basename "$0"): set $name (in the environment or $LT_ENV_FILE)" >&2
            exit 2
        fi
    done
}

# Several long-running processes from one script: lt_spawn CMD... starts one in the background (prints
# it with DRY_RUN=1); lt_wait_all waits until the first one exits, stops the others (SIGTERM, then a
# grace period) and exits with that first status, so a supervisor (systemd, slurm) restarts the set whole.
LT_PIDS=()
lt_spawn() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\n' "${*@Q}"
        return
    fi
    "$@" &
    LT_PIDS+=("$!")
}

lt_wait_all() {
    if [[ "$DRY_RUN" == 1 || ${#LT_PIDS[@]} == 0 ]]; then
        exit 0
    fi
    trap 'kill -TERM "${LT_PIDS[@]}" 2>/dev/null || true' TERM INT
    local status=0
    wait -n || status=$?
    kill -TERM "${LT_PIDS[@]}" 2>/dev/null || true
    wait || true
    exit "$status"
}
