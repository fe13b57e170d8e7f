"""The stored form of a sample's routing (broker/routing.py): SGLang's int32 expert ids narrowed for Redis."""

from __future__ import annotations

import numpy as np
import pytest

from broker.routing import RoutingError, decode_routing, encode_routing


@pytest.mark.parametrize(("num_experts", "itemsize"), [(8, 1), (128, 1), (256, 1), (257, 2), (2**15, 2)])
def test_ids_are_stored_in_the_narrowest_type_and_read_back_exactly(num_experts: int, itemsize: int) -> None:
    """Guards against routing stored at SGLang's 4 bytes per id (at 128K tokens x 48 layers x top-8: 197 MB per
    sample in Redis instead of 49 MB) and against a narrowing that wraps ids (expert 256 read back as expert 0)."""
    ids = np.random.default_rng(0).integers(0, num_experts, size=(50, 3, 2), dtype=np.int32)
    ids[0, 0, 0] = num_experts - 1
    value = encode_routing(ids.tobytes())
    assert len(value) == 1 + ids.size * itemsize
    got = decode_routing(value, "k", 50, (3, 2))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, ids)


def test_ids_out_of_the_learners_range_are_refused() -> None:
    """Guards against ids that do not fit the learner's int16 (a corrupt value or a model beyond 32767 experts)
    silently wrapping to other experts: the group is dead-lettered with a reason instead."""
    ids = np.full((2, 1, 1), 40_000, dtype=np.int32)
    with pytest.raises(RoutingError, match="beyond int16"):
        decode_routing(encode_routing(ids.tobytes()), "k", 2, (1, 1))


def test_a_value_of_another_shape_or_without_its_tag_is_refused() -> None:
    """Guards against replaying routing of another shape (one token short) or bytes written by something else
    (SGLang's raw int32, no tag byte) as if they were a stored routing."""
    ids = np.arange(12, dtype=np.int32).reshape(6, 1, 2)
    with pytest.raises(RoutingError, match="do not fit 5 input tokens x 1 moe layers x top-2 uint8"):
        decode_routing(encode_routing(ids.tobytes()), "k", 5, (1, 2))
    with pytest.raises(RoutingError, match="missing"):
        decode_routing(None, "k", 6, (1, 2))
    with pytest.raises(RoutingError, match="not a stored routing"):
        decode_routing(b"\x07" + ids.tobytes(), "k", 6, (1, 2))
