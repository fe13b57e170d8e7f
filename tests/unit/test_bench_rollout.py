"""`longtrace bench rollout`'s pass order (rollout_server/bench_rollout.py ORDERS)."""

from __future__ import annotations

from rollout_server.bench_rollout import MODES, ORDERS


def test_worker_and_direct_passes_run_back_to_back_in_both_orders() -> None:
    """Guards against the noisy worker_vs_direct of issue 25: the rotation ran a 6-s no-sharing pass between the
    worker and direct passes it compared, so a neighbour's load changed in between; and the order of the two must
    flip from one rotation to the next (over ORDERS each goes first equally often), so that neither gains from
    running first (warm engines, a quiet machine). No-sharing also runs first and last equally often."""
    assert all(sorted(order) == sorted(MODES) for order in ORDERS)
    for order in ORDERS:
        assert abs(order.index("sharing") - order.index("direct")) == 1, order
    firsts = [min(("sharing", "direct"), key=order.index) for order in ORDERS]
    assert firsts.count("sharing") == firsts.count("direct")
    assert [o[0] for o in ORDERS].count("no_sharing") == [o[-1] for o in ORDERS].count("no_sharing")
