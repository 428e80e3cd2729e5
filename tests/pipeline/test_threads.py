"""`thread_map`: results in input order whatever the workers, errors raised to the caller."""

from __future__ import annotations

import time

import pytest

from fusionrec.pipeline.threads import cores, thread_map


def test_results_come_back_in_input_order_with_any_worker_count() -> None:
    def slow_square(x: int) -> int:
        time.sleep(0.001 * (5 - x))  # the first items finish last
        return x * x

    for workers in (0, 1, 2, 7):
        assert thread_map(slow_square, range(6), workers) == [0, 1, 4, 9, 16, 25]
    assert thread_map(slow_square, [], 2) == []
    assert cores() >= 1


def test_an_error_in_a_worker_reaches_the_caller() -> None:
    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("item 3 is bad")
        return x

    with pytest.raises(ValueError, match="item 3 is bad"):
        thread_map(fail_on_three, range(5), 2)
