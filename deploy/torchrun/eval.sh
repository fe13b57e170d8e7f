#!/usr/bin/env bash
# Held-out eval during training, on any node that reaches an engine and the reward API: `longtrace eval` with the
# paper's protocol (configs/eval.toml: avg@4 at T 0.6, top-p 0.95, top-k 20, judged by the reward API at eta 0) on
# the serving engine while rollouts go on, every EVAL_EVERY_S seconds (0: once). Each eval writes
# RUN_DIR/evals/<time>/ (summary.json with the policy versions its samples came from, samples.jsonl).
#
#   EVAL_DATA=/shared/data/heldout.jsonl EVAL_ENGINE_URL=http://engine0:30000 REWARD_URL=http://cpu0:7248 \
#   EVAL_EVERY_S=3600 deploy/torchrun/eval.sh --max_questions 200
#
# The engine serves training's newest weights, so the weights may advance during an eval (the summary says which
# versions answered). Extra arguments are EvalConfig overrides. Tokens: the reward API's through
# --reward_auth_token_env LONGTRACE_REWARD_API_KEY when that variable is set.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

EVAL_CONFIG="${EVAL_CONFIG:-$LT_REPO/configs/eval.toml}"
EVAL_DATA="${EVAL_DATA:-}"
EVAL_ENGINE_URL="${EVAL_ENGINE_URL:-}"
REWARD_URL="${REWARD_URL:-}"
EVAL_EVERY_S="${EVAL_EVERY_S:-0}"
lt_require EVAL_DATA EVAL_ENGINE_URL REWARD_URL

while true; do
    cmd=("$PYTHON" -m deploy.cli eval --config "$EVAL_CONFIG" --json
        --dataset_path "$EVAL_DATA" --engine_urls "[\"$EVAL_ENGINE_URL\"]" --reward_url "$REWARD_URL")
    lt_opt cmd --tokenizer_path "$MODEL_PATH"
    if [[ -n "$RUN_DIR" ]]; then
        cmd+=(--out_dir "$RUN_DIR/evals/$(date -u +%Y%m%dT%H%M%SZ)")
    fi
    if [[ -n "${LONGTRACE_REWARD_API_KEY:-}" ]]; then
        cmd+=(--reward_auth_token_env LONGTRACE_REWARD_API_KEY)
    fi
    if [[ "$EVAL_EVERY_S" == 0 || "$DRY_RUN" == 1 ]]; then
        lt_exec "${cmd[@]}" "$@"
    fi
    # One failed eval (an engine restarting, a slow judge) must not end the loop: say so and wait for the next.
    lt_run "${cmd[@]}" "$@" || echo "eval.sh: eval exited $? at $(date -u +%FT%TZ); next in ${EVAL_EVERY_S}s" >&2
    sleep "$EVAL_EVERY_S"
done
