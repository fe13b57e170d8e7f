#!/usr/bin/env bash
# The reward service on this (CPU) node: NUM_REWARD_WORKERS stream workers (`rollouts` -> `scored` in one
# consumer group: add replicas on any node at any time) and, with REWARD_API=1, the HTTP API on
# REWARD_PORT (POST /evaluate for other RL frameworks). The judge: JUDGE_URL (an OpenAI-compatible base
# URL, e.g. http://judge:8000/v1) with its key in the environment variable JUDGE_API_KEY.
# The API binds 0.0.0.0, so it needs a token: LONGTRACE_REWARD_API_KEY (passed as --auth_token_env), or
# REWARD_ALLOW_UNAUTHENTICATED=1 on a network you trust; with neither it refuses to start, naming both.
# Extra arguments are RewardConfig overrides (--eta 0.3, --judge.model NAME, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

NUM_REWARD_WORKERS="${NUM_REWARD_WORKERS:-2}"
REWARD_API="${REWARD_API:-1}"
REWARD_PORT="${REWARD_PORT:-7248}"
JUDGE_URL="${JUDGE_URL:-}"
WORKER_PREFIX="${WORKER_PREFIX:-$(hostname -s)}"

common=(--config "$REWARD_CONFIG" --broker.redis_url "$REDIS_URL")
lt_opt common --broker.run_id "$RUN_ID"
lt_opt common --judge.base_url "$JUDGE_URL"

api=(--host 0.0.0.0 --port "$REWARD_PORT")
if [[ -n "${LONGTRACE_REWARD_API_KEY:-}" ]]; then
    api+=(--auth_token_env LONGTRACE_REWARD_API_KEY)  # the name, never the token, goes on the command line
fi
if [[ "${REWARD_ALLOW_UNAUTHENTICATED:-0}" == 1 ]]; then
    api+=(--allow_unauthenticated true)
fi
if [[ "$REWARD_API" == 1 ]]; then
    lt_spawn "$PYTHON" -m deploy.cli reward serve "${common[@]}" "${api[@]}" "$@"
fi
for ((i = 0; i < NUM_REWARD_WORKERS; i++)); do
    lt_spawn "$PYTHON" -m deploy.cli reward worker "${common[@]}" --worker.consumer "$WORKER_PREFIX-$i" "$@"
done
lt_wait_all
