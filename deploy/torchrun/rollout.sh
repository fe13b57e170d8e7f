#!/usr/bin/env bash
# NUM_WORKERS rollout workers on this (CPU) node: tasks in, generated groups out, engines from the
# registry. Workers scale freely: start more on any node at any time (they share the `tasks` consumer
# group); a stopped worker's unfinished groups are reclaimed by the others. Worker ids are stable
# (<host>-<i>), so a restarted worker gets its own pending entries back first.
# Extra arguments are RolloutConfig overrides (--max_groups_in_flight 32, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

NUM_WORKERS="${NUM_WORKERS:-1}"
WORKER_PREFIX="${WORKER_PREFIX:-$(hostname -s)}"

for ((i = 0; i < NUM_WORKERS; i++)); do
    cmd=("$PYTHON" -m deploy.cli rollout worker --config "$ROLLOUT_CONFIG"
        --worker_id "$WORKER_PREFIX-$i" --broker.redis_url "$REDIS_URL")
    lt_opt cmd --broker.run_id "$RUN_ID"
    lt_spawn "${cmd[@]}" "$@"
done
lt_wait_all
