"""tests/helpers/dist.py itself: a failing rank must fail the test, with that rank's output in the message."""

from __future__ import annotations

import pytest

from tests.helpers.dist import free_port, run_torchrun


def _fail_on_rank_one() -> None:
    import torch
    import torch.distributed as dist

    from tests.helpers.dist import init_worker_process_group

    init_worker_process_group(timeout_s=30)
    value = torch.ones(1)
    dist.all_reduce(value)  # a real collective first: both ranks are up and talking
    print(f"rank {dist.get_rank()} sum {int(value.item())}", flush=True)
    if dist.get_rank() == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.destroy_process_group()


def test_run_torchrun_reports_the_failing_rank() -> None:
    """Guards the harness: a rank that raises must not be swallowed, and its traceback and every rank's
    prints must reach the assertion message (else distributed test failures are undebuggable)."""
    with pytest.raises(AssertionError) as info:
        run_torchrun(2, f"{__name__}:_fail_on_rank_one", timeout_s=120)
    message = str(info.value)
    assert "deliberate failure on rank 1" in message
    assert "rank 0 sum 2" in message and "rank 1 sum 2" in message
    assert 0 < free_port() < 65536
