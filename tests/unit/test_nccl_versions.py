"""The NCCL release check before an NCCL weight-update group is built (weights/sglang_release.py nccl_mismatch)."""

from __future__ import annotations

from weights.sglang_release import ENGINE_IMAGE, ENGINE_NCCL_VERSION, nccl_mismatch


def test_a_release_mismatch_is_named_before_the_group_is_built() -> None:
    """Guards against the first broadcast failing with NCCL's bare "Mismatched NCCL version" (or hanging) after the
    whole group was built: both releases are named up front, the engine's from its own report (built-in engine)
    or from the pinned image (SGLang reports none); unknown releases (CPU torch) do not block."""
    assert nccl_mismatch("2.30.7", {"nccl_version": "2.30.7"}) is None
    problem = nccl_mismatch("2.27.3", {"nccl_version": "2.30.7"})
    assert problem is not None and "2.27.3 here" in problem and "2.30.7 reported by the engine" in problem
    sglang = nccl_mismatch("2.27.3", {"tp_size": 8})  # an SGLang /get_server_info: no nccl_version key
    assert sglang is not None and ENGINE_NCCL_VERSION in sglang and ENGINE_IMAGE in sglang
    assert nccl_mismatch(None, {"nccl_version": "2.30.7"}) is None  # this side unknown (CPU torch)
    assert nccl_mismatch("2.30.7", {"nccl_version": None}) is None  # the built-in engine on CPU
    assert nccl_mismatch(ENGINE_NCCL_VERSION, {}) is None
