"""`token_shift.select_with_prev`: each selected position's row and the row before it (the carried
row before position 0), one sequence (slices) and packed sequences (index tensors) alike."""
from __future__ import annotations

import pytest
import torch

from engine.token_shift import IndexCache, Windows, select_with_prev


def _rows(s: int, t: int, tag: float) -> torch.Tensor:
    """Rows of positions [s, t): row p holds (tag, p) so every selection is checkable exactly."""
    return torch.tensor([[tag, float(p)] for p in range(s, t)])


def _expected(s: int, t: int, ns: int, tag: float, carried: torch.Tensor):
    x = _rows(s, t, tag)
    cur = x[ns - s:]
    prev = torch.stack([carried if p < 0 else x[p - s] for p in range(ns - 1, t - 1)])
    return cur, prev, x[-1:]


@pytest.mark.parametrize("s,t,ns", [(0, 6, 0), (0, 6, 3), (2, 9, 5), (4, 9, 8), (0, 1, 0)])
def test_one_sequence_and_packed_select_the_same_rows(s, t, ns):
    carried = torch.tensor([[-1.0, -1.0]])
    cur, prev, last = select_with_prev(_rows(s, t, 1.0), Windows([s], [t]), [ns], carried, IndexCache(torch.device("cpu")))
    want = _expected(s, t, ns, 1.0, carried[0])
    for got, exp in zip((cur, prev, last), want):
        assert torch.equal(got, exp)
    # the same sequence packed after another one: the index-tensor path gives the same rows
    other = (1, 5, 3)
    x = torch.cat([_rows(*other[:2], 2.0), _rows(s, t, 1.0)])
    carried2 = torch.tensor([[-2.0, -2.0], [-1.0, -1.0]])
    cur2, prev2, last2 = select_with_prev(x, Windows([other[0], s], [other[1], t]), [other[2], ns], carried2,
                                          IndexCache(torch.device("cpu")))
    n_other = other[1] - other[2]
    assert torch.equal(cur2[n_other:], want[0]) and torch.equal(prev2[n_other:], want[1])
    assert torch.equal(last2[1:], want[2])


def test_a_window_too_short_for_its_shift_is_refused():
    with pytest.raises(AssertionError, match="too short"):
        select_with_prev(_rows(2, 6, 1.0), Windows([2], [6]), [2], torch.zeros(1, 2), IndexCache(torch.device("cpu")))
