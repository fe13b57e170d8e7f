"""experiments/gpu/smoke.sh: one JSON line; a clear "skipped" without CUDA; every check passing on a GPU."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers.dist import REPO_ROOT


def _run(*args: str, timeout_s: float) -> tuple[int, dict[str, object], str]:
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "experiments" / "gpu" / "smoke.sh"), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"smoke.sh must print exactly one JSON line, got:\n{out.stdout}\n{out.stderr[-3000:]}"
    return out.returncode, json.loads(lines[0]), out.stderr


def test_smoke_without_cuda_skips_with_a_clear_reason() -> None:
    """Guards against the GPU smoke test crashing with a CUDA traceback (or claiming success) on a machine without
    a GPU: it must say why it skipped, in its JSON line and on stderr, and exit 3 (neither pass nor fail)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_smoke_passes_on_gpu covers it")
    code, result, stderr = _run(timeout_s=120)
    assert code == 3
    assert result["status"] == "skipped" and result["ok"] is False
    assert "no CUDA device" in str(result["reason"]) and "no CUDA device" in stderr


@pytest.mark.gpu
def test_smoke_passes_on_gpu() -> None:
    """Guards against the CUDA paths (megatron on CUDA with NCCL, NCCL weight sync to the CUDA engine) breaking."""
    code, result, _ = _run(timeout_s=540)
    assert code == 0 and result["ok"] is True, result
    assert result["weight_sync_backend"] == "nccl" and result["engine_weight_version"] == "3"
