#!/usr/bin/env bash
# GPU smoke test of LongTrace against a real SGLang engine (experiments/gpu/sglang_smoke.py): the engine of the pinned
# release (weights/sglang_release.py) started by `longtrace engine launch --backend sglang`, a rollout worker, a
# reward worker and the megatron-core learner under torchrun for 3 GRPO steps, pushing weights over NCCL after each;
# one pause with abort mid-generation whose partial rollout is resumed, per-token versions and engine health through
# the pushes checked. One JSON line on stdout; exit 0 when every check passed, 1 when one failed, 3 skipped (no CUDA,
# or no SGLang in $SGLANG_PYTHON). Written, not run by this project yet. One GPU with ~40 GB free; no network.
#
#   MODEL=/models/Qwen3-0.6B bash deploy/gpu/sglang_smoke.sh | tee sglang_smoke.json
#
# MODEL: a local HF directory of a small Qwen3. SGLANG_PYTHON: the interpreter that has SGLang (default python3, as
# in the engine image). PYTHON: LongTrace's (default .venv/bin/python). Other arguments go to sglang_smoke.py
# (--steps N, --work-dir D, --engine-arg=--disable-cuda-graph, ...).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON=python3
fi
if [[ -z "${MODEL:-}" ]]; then
    echo "sglang_smoke: set MODEL to a local Qwen3 directory (e.g. MODEL=/models/Qwen3-0.6B)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$REPO"
exec timeout --kill-after=30 1800 "$PYTHON" -m experiments.gpu.sglang_smoke \
    --model "$MODEL" --sglang-python "${SGLANG_PYTHON:-python3}" "$@"
