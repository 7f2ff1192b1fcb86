"""The CPU run's interpreter visits a launch's programs in a shuffled order (tests/program_order.py)."""

import program_order
import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(
    not program_order.installed, reason="a GPU run, or PSA_TEST_PROGRAM_ORDER=grid"
)


@triton.jit
def _record_order(order_ptr, next_ptr):
    """Each program writes its (x, y) into the next free row: the rows are the order programs ran in."""
    row = tl.atomic_add(next_ptr, 1)
    tl.store(order_ptr + 2 * row, tl.program_id(0))
    tl.store(order_ptr + 2 * row + 1, tl.program_id(1))


def test_every_program_runs_once_in_a_shuffled_order():
    orders = []
    for _ in range(2):
        order, nxt = torch.full((24, 2), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        _record_order[(6, 4)](order, nxt)
        assert int(nxt) == 24
        ran = [tuple(r) for r in order.tolist()]
        assert sorted(ran) == [(x, y) for x in range(6) for y in range(4)]  # each program exactly once
        assert ran != sorted(ran)  # not the grid order
        orders.append(ran)
    assert orders[0] != orders[1]  # a fresh permutation per launch
