#!/usr/bin/env bash
# GPU smoke test of LongTrace's CUDA paths (experiments/gpu/smoke.py): megatron-core learner on CUDA with NCCL, weight
# sync over NCCL to the built-in engine on CUDA, a few GRPO steps; one JSON line on stdout, exit 0 when every
# check passed, 1 when one failed, 3 when there is no CUDA device. Self-contained: no network, no model hub;
# under 8 minutes on one H100. Arguments go to smoke.py (--steps N, --learner-ranks 2, --work-dir D, --cpu).
#
#   bash experiments/gpu/smoke.sh | tee smoke.json
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON=python3
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$REPO"
exec timeout --kill-after=30 480 "$PYTHON" -m experiments.gpu.smoke "$@"
