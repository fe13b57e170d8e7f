"""The learner's message when a collective times out (learner/parallel.py: collective_timeout)."""

from __future__ import annotations

import pytest

from learner.parallel import CollectiveTimeout, collective_timeout

GLOO = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 100000ms "
    "for recv operation to complete"
)
NCCL = "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 600000 ms"


@pytest.mark.parametrize("raw", [GLOO, NCCL])
def test_a_timed_out_collective_names_the_flag_the_step_and_the_way_back(raw: str) -> None:
    """Guards against a partitioned learner node ending the job with only gloo's or NCCL's own line (a buffer file and
    a millisecond count): the error names the timeout flag, the step reached, what to do (start the learner again on
    every node once they reach each other) and how far back the resume goes, and keeps the original text."""
    err = collective_timeout(RuntimeError(raw), 100.0, 2, 1)
    assert isinstance(err, CollectiveTimeout)
    msg = str(err)
    assert "100 s (--model.dist_timeout_s) after step 2" in msg and "deploy/torchrun/learner.sh" in msg
    assert "one every 1 steps, --checkpoint.interval_steps" in msg and raw in msg


def test_other_errors_pass_through() -> None:
    """Guards against every RuntimeError (an out-of-memory, a shape bug) being reported as a network timeout."""
    assert collective_timeout(RuntimeError("CUDA out of memory"), 100.0, 2, 1) is None
    assert collective_timeout(ValueError("Timed out waiting"), 100.0, 2, 1) is None
