"""Peak bytes of tensors allocated while a block runs, split by named ranges: the CPU analogue of CUDA's
`max_memory_allocated() - memory_allocated()`.

The resident set size (RSS) of a CPU process says what the machine must hold, but it also keeps what glibc's
allocator has not returned (its arenas, its dynamic mmap threshold), so a step that allocates less can show the
same RSS. The tensor allocations themselves are what a GPU's caching allocator counts and what context
parallelism or recompute change. torch's profiler with `profile_memory=True` records every allocation and free of
c10's CPU allocator, kernels' own scratch included, with the net bytes allocated since it started; the peak of
that net, overall and inside each `record_function` range (learner/train_step.py names `forward_backward` and
`optimizer_step`), is what this module reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

MIB = 2**20


@dataclass
class AllocationPeaks:
    """Filled when the `trace_allocations` block exits: MiB above what was allocated when it began."""

    ranges: tuple[str, ...]
    peak_mb: float | None = None
    range_peak_mb: dict[str, float | None] = field(default_factory=dict)
    events: int = 0


@contextmanager
def trace_allocations(ranges: tuple[str, ...] = ()) -> Iterator[AllocationPeaks]:
    """Trace the block's CPU tensor allocations; the peaks overall and inside each named range."""
    peaks = AllocationPeaks(ranges)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peaks
    allocations: list[tuple[int, int]] = []  # (time ns, net bytes allocated since the profiler started)
    windows: dict[str, list[tuple[int, int]]] = {name: [] for name in ranges}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated))
        elif event.name in windows:
            windows[event.name].append((event.start_time_ns, event.end_time_ns))
    if not allocations:  # nothing recorded means the trace failed, not that nothing was allocated
        raise RuntimeError("the profiler recorded no allocation: the allocation trace did not run")
    peaks.events = len(allocations)
    peaks.peak_mb = round(max(total for _, total in allocations) / MIB, 1)
    for name, spans in windows.items():
        inside = [total for t, total in allocations if any(start <= t <= end for start, end in spans)]
        peaks.range_peak_mb[name] = round(max(inside) / MIB, 1) if inside else None
