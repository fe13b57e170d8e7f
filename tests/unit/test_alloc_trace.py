"""learner/alloc_trace.py: the tensor-byte peaks the memory bench reports (its CP ratio is one of them)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import record_function

from learner.alloc_trace import MIB, trace_allocations


def test_peaks_count_what_is_alive_together_and_split_by_range() -> None:
    """Guards against a trace that sums every allocation instead of the live ones (a loop of freed tensors would
    read as their total), that misses allocations of a named range, or that counts what existed before it."""
    before = torch.ones(32 * MIB // 4)  # allocated before the trace: never counted
    with trace_allocations(("big", "loop")) as peaks:
        with record_function("big"):
            a = torch.ones(64 * MIB // 4)
            b = a * 2  # a and b alive together: 128 MiB
            del a, b
        with record_function("loop"):
            for _ in range(8):  # 16 MiB at a time, 128 MiB in all
                x = torch.ones(16 * MIB // 4)
                del x
        before.mul_(2)  # in place: no allocation
    assert peaks.range_peak_mb["big"] == pytest.approx(128, abs=1)
    assert peaks.range_peak_mb["loop"] == pytest.approx(16, abs=1)
    assert peaks.peak_mb == pytest.approx(128, abs=1)
    assert peaks.events >= 10


def test_a_range_that_never_ran_is_none_and_an_empty_trace_is_an_error() -> None:
    """Guards against a missing range reading as 0 MiB (a CP ratio of 0 would pass any target) and a trace that
    recorded nothing reading as "no memory used"."""
    with trace_allocations(("absent",)) as peaks:
        keep = torch.ones(MIB)
    assert peaks.range_peak_mb["absent"] is None and peaks.peak_mb is not None and keep.numel()
    with pytest.raises(RuntimeError, match="no allocation"), trace_allocations():
        pass
